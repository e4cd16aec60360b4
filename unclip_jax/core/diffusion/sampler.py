"""The one diffusion sampler: DDPM, DDIM (η), DPM-Solver++(2M) and (3M), classifier-free
guidance and DDIM inversion, as a single ``lax.scan`` that every diffusion model (prior, decoder,
upsamplers) calls. No model has its own loop.

The denoiser contract::

    denoiser(params, x_t, t, cond) -> output
      x_t:    [B, …] float32 (``[B, D]`` embeddings or ``[B, H, W, C]`` images)
      t:      [B] int32 original training timesteps (``schedule.timesteps[i]``)
      cond:   a pytree of ``[B, …]`` arrays (or None)
      output: like x_t (ε, x₀ or v, per ``model_output``), or ``[…, 2C]`` with a learned-variance
              channel block appended on the last axis (ADM convention, see ``losses``).

Classifier-free guidance runs **one** forward per step on the batch ``[x; x]`` with conditioning
``[cond; uncond]`` (the noised input is never replaced, only the conditioning), and combines
``out = uncond + s · (cond − uncond)`` on the mean output (the variance channels come from the
conditional half). ``guidance_scale`` and ``eta`` are traced: changing them never recompiles.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.core.diffusion.losses import (
    check_model_output,
    learned_log_variance,
    output_to_x0_eps,
    split_variance,
    x0_to_eps,
)
from unclip_jax.core.diffusion.schedule import Schedule

METHODS = ("ddpm", "ddim", "dpmpp_2m", "dpmpp_3m")
VARIANCES = ("fixed_small", "fixed_large", "learned")


# ----------------------------------------------------------------------------- validation


def _check_config(method, variance, model_output, clip_x0, dynamic_threshold):
    if method not in METHODS:
        raise ValueError(f"unknown sampling method {method!r}; accepted: {', '.join(METHODS)}")
    if variance not in VARIANCES:
        raise ValueError(f"unknown variance {variance!r}; accepted: {', '.join(VARIANCES)}")
    check_model_output(model_output)
    if clip_x0 is not None:
        if len(clip_x0) != 2 or not clip_x0[0] < clip_x0[1]:
            raise ValueError(f"clip_x0 must be a (low, high) pair with low < high, got {clip_x0!r}")
    if dynamic_threshold is not None and not 0.0 < dynamic_threshold < 1.0:
        raise ValueError(f"dynamic_threshold is a quantile in (0, 1) (e.g. 0.995), got "
                         f"{dynamic_threshold!r}")


def _check_nonnegative(name: str, value, meaning: str) -> None:
    """Fail on a concrete negative ``value`` (traced values are checked by their caller)."""
    if not isinstance(value, jax.core.Tracer) and np.any(np.asarray(value) < 0):
        raise ValueError(f"{name} must be ≥ 0 ({meaning}), got {value!r}")


def _check_eta(eta):
    _check_nonnegative("eta", eta, "0 = deterministic DDIM, 1 = DDPM posterior variance")


def _check_guidance(scale):
    _check_nonnegative("guidance_scale", scale,
                       "0 = unconditional, 1 = conditional, > 1 = guided")


def _is_one(x) -> bool:
    return not isinstance(x, jax.core.Tracer) and bool(np.all(np.asarray(x) == 1))


# ----------------------------------------------------------------------------- the model call


def check_guidance_interval(interval) -> None:
    """``interval``: None (guide at every step) or ``(σ_lo, σ_hi)`` with 0 ≤ σ_lo < σ_hi."""
    if interval is None:
        return
    try:
        lo, hi = (float(v) for v in interval)
    except (TypeError, ValueError):
        raise ValueError(f"guidance_interval must be None or a (sigma_lo, sigma_hi) pair, got "
                         f"{interval!r}") from None
    if not 0.0 <= lo < hi:
        raise ValueError(f"guidance_interval (sigma_lo, sigma_hi) needs 0 ≤ sigma_lo < "
                         f"sigma_hi (σ = √((1 − ᾱ)/ᾱ); inf allowed), got {interval!r}")


def _step_scale(schedule, i, guidance_scale, interval):
    """The guidance scale at step ``i``: ``guidance_scale`` where σ_i = √((1 − ᾱ_i)/ᾱ_i) lies in
    ``interval = (σ_lo, σ_hi]``, else 1 (conditional only); everywhere when ``interval`` is None."""
    if interval is None:
        return guidance_scale
    sigma = schedule.sqrt_recipm1_alphas_cumprod[i]
    inside = (sigma > interval[0]) & (sigma <= interval[1])
    return jnp.where(inside, guidance_scale, jnp.ones_like(guidance_scale))


def _guided_model(denoiser, params, schedule, cond, uncond, guidance_scale, variance,
                  interval=None):
    """``model(x, i, self_cond=None) -> (mean_output, var_interp or None)`` with guidance
    folded in (only in the σ ``interval`` when one is given); a ``self_cond`` x₀ is passed to
    both branches as ``cond["self_cond"]``."""

    def model(x, i, self_cond=None):
        b, c = x.shape[0], x.shape[-1]
        t = jnp.full((b,), schedule.timesteps[i], jnp.int32)
        cond_i, uncond_i = cond, uncond
        if self_cond is not None:           # both branches read the same (guided) x₀
            cond_i = dict(cond, self_cond=self_cond)
            uncond_i = None if uncond is None else dict(uncond, self_cond=self_cond)
        if uncond is None:
            out = denoiser(params, x, t, cond_i)
        else:
            both = jax.tree.map(lambda a, u: jnp.concatenate([a, u], axis=0), cond_i, uncond_i)
            out = denoiser(params, jnp.concatenate([x, x], 0), jnp.concatenate([t, t], 0), both)
        n = b if uncond is None else 2 * b
        plain, with_var = (n,) + x.shape[1:], (n,) + x.shape[1:-1] + (2 * c,)
        if out.shape not in (plain, with_var):
            raise ValueError(
                f"denoiser returned shape {tuple(out.shape)}; expected {plain} "
                f"(or {with_var} with a learned-variance output)"
                + (" — the guided batch is [cond; uncond], twice the sample batch"
                   if uncond is not None else ""))
        has_var = out.shape == with_var
        if variance == "learned" and not has_var:
            raise ValueError(
                f"variance='learned' needs a denoiser with a variance output: expected shape "
                f"{with_var} (mean output and variance interpolation concatenated on the last "
                f"axis), got {tuple(out.shape)}")
        out = out.astype(jnp.float32)
        mean, var = split_variance(out, c) if has_var else (out, None)
        if uncond is not None:
            cond_m, uncond_m = mean[:b], mean[b:]
            scale = _step_scale(schedule, i, guidance_scale, interval)
            mean = uncond_m + scale * (cond_m - uncond_m)
            var = None if var is None else var[:b]
        return mean, var

    return model


def _process_x0(x0, clip_x0, dynamic_threshold):
    """Dynamic thresholding (Imagen: s = max(quantile_p |x₀|, 1), x₀ ← clip(x₀, ±s)/s), then
    clipping to ``clip_x0``."""
    if dynamic_threshold is not None:
        flat = jnp.abs(x0).reshape(x0.shape[0], -1)
        s = jnp.maximum(jnp.quantile(flat, dynamic_threshold, axis=1), 1.0)
        s = s.reshape((-1,) + (1,) * (x0.ndim - 1))
        x0 = jnp.clip(x0, -s, s) / s
    if clip_x0 is not None:
        x0 = jnp.clip(x0, clip_x0[0], clip_x0[1])
    return x0


# Multistep order control: a step more than LONG_STEP times the previous one in λ is taken at
# first order, one more than GROWING_STEP times at ≤ second order. On improved DDPM's evenly
# spaced grid (``respace(…, "25")``, which ends at t = 0) the step into t = 0 is ~4× the one
# before it (cosine, 25 steps: h ≈ 2.5 after 0.6), and a second-order step there overshot the
# data variance by +14 %; at first order it is +0.1 %. On grids whose steps change gradually
# (the reference's "dpmN", "logsnrN") 2M never meets the first threshold, so it takes the
# reference's steps; 3M's third-order term on the growing steps near clean data (h ≈ 0.3 → 0.6,
# where x₀(λ) varies like e^{−2λ}) is what the second threshold avoids (see docs/solvers.md).
LONG_STEP = 2.0
GROWING_STEP = 1.3


def _order_cap(h, h_prev):
    """The highest order a multistep step of length ``h`` after one of ``h_prev`` may take."""
    return jnp.where(h > LONG_STEP * h_prev, 1, jnp.where(h > GROWING_STEP * h_prev, 2, 3))


def _lambda(alpha_bar):
    """Half log-SNR λ = log(α/σ) of ᾱ (∞ at ᾱ = 1)."""
    return 0.5 * (jnp.log(alpha_bar) - jnp.log1p(-alpha_bar))


# ----------------------------------------------------------------------------- sampling


def sample(denoiser: Callable, params: Any, *, schedule: Schedule, rng: jax.Array,
           shape: tuple[int, ...] | None = None, x_T: jax.Array | None = None,
           cond: Any = None, uncond: Any = None, method: str = "ddim", eta=0.0,
           guidance_scale=1.0, model_output: str = "eps", variance: str = "fixed_small",
           clip_x0: tuple[float, float] | None = None, dynamic_threshold: float | None = None,
           batch_sharding: jax.sharding.Sharding | None = None,
           guidance_interval: tuple[float, float] | None = None,
           self_condition: bool = False) -> jax.Array:
    """Draw samples by running the reverse process over every step of ``schedule``.

    Pure; wrap it in ``jax.jit`` (or use :func:`make_sampler`). Static: the schedule's length,
    ``shape``, ``method``, ``model_output``, ``variance``, ``clip_x0``, ``dynamic_threshold``,
    whether ``uncond`` is given. Traced: ``eta``, ``guidance_scale``, params, cond, rng, x_T.

    Args:
      denoiser: ``f(params, x_t, t, cond) -> output`` (see module docstring).
      schedule: the (usually respaced) schedule; every step is taken, from i = N-1 down to 0.
      rng: PRNG key for x_T (when not given) and the per-step noise (a fresh key per step).
      shape / x_T: the sample shape ``[B, …]``, or the starting noise itself.
      cond: conditioning pytree of ``[B, …]`` leaves (or None).
      uncond: the unconditional conditioning (same structure as cond) or a builder
        ``cond -> uncond``; when given, guidance runs as one batched forward per step.
      method: "ddpm" (ancestral), "ddim" (η-DDIM), "dpmpp_2m" (DPM-Solver++(2M), 10–25 steps),
        "dpmpp_3m" (third-order multistep DPM-Solver++). The multistep solvers want a grid
        that does not visit t = 0: ``respace(…, "dpm25")`` (the reference's; 2M takes exactly
        diffusers' ``DPMSolverMultistepScheduler`` steps there) or ``"logsnr20"`` (3M: within
        1% of the data's variance at 20 steps on Gaussian data, ≈ 0 at 50). docs/solvers.md
        compares them with the reference.
      eta: DDIM noise scale ≥ 0 (0 deterministic; 1 on the full schedule = DDPM posterior).
      guidance_scale: s in ``uncond + s·(cond − uncond)``; needs ``uncond`` unless it is 1.
      guidance_interval: None, or ``(σ_lo, σ_hi)``: guide only at the steps whose noise level
        σ = √((1 − ᾱ)/ᾱ) lies in ``(σ_lo, σ_hi]`` and take the conditional output (s = 1)
        elsewhere (Kynkäänniemi et al. 2024, "Applying guidance in a limited interval"). Static.
      model_output: "eps" | "x0" | "v". Prefer "v" (or "x0") with the cosine schedule: its last
        step has ᾱ ≈ 2e-9, where x₀ from an ε output multiplies the output's error by σ/α ≈ 2·10⁴
        (clipped, a random ±1 pattern that DDIM then carries to the end).
      variance: DDPM's reverse variance: "fixed_small" (β̃), "fixed_large" (β) or "learned".
      clip_x0: clip every predicted x₀ to ``(low, high)``, e.g. (-1, 1) for images.
      dynamic_threshold: quantile p of Imagen's dynamic thresholding (x₀ in [-1, 1] data).
      batch_sharding: a sharding for x (batch axis); applied as a constraint at every step.
      self_condition: a self-conditioned denoiser (``training_loss(self_condition=p)``): every
        step passes the previous step's x₀ (after ``clip_x0`` / thresholding, guided) as
        ``cond["self_cond"]``, zeros on the first step; cond (and uncond) must be dicts. Static.
    Returns:
      samples ``[B, …]`` float32.
    """
    _check_config(method, variance, model_output, clip_x0, dynamic_threshold)
    _check_eta(eta)
    _check_guidance(guidance_scale)
    check_guidance_interval(guidance_interval)
    rng_init, rng_steps = jax.random.split(rng)
    if x_T is None:
        if shape is None:
            raise ValueError("pass either shape=[B, …] or x_T")
        x = jax.random.normal(rng_init, tuple(shape), jnp.float32)
    else:
        if shape is not None and tuple(shape) != tuple(x_T.shape):
            raise ValueError(f"shape {tuple(shape)} disagrees with x_T.shape {tuple(x_T.shape)}")
        x = jnp.asarray(x_T, jnp.float32)
    if callable(uncond):
        uncond = uncond(cond)
    if uncond is None and not _is_one(guidance_scale):
        raise ValueError("guidance_scale ≠ 1 asks for classifier-free guidance, which needs an "
                         "uncond (the null conditioning, or a builder cond -> uncond)")
    if uncond is not None and cond is None:
        raise ValueError("guidance needs a cond as well as an uncond")
    _check_batch(cond, x.shape[0], "cond")
    _check_batch(uncond, x.shape[0], "uncond")
    _check_self_cond_dicts(self_condition, cond, uncond)

    constrain = ((lambda v: jax.lax.with_sharding_constraint(v, batch_sharding))
                 if batch_sharding is not None else (lambda v: v))
    s = schedule
    model = _guided_model(denoiser, params, s, cond, uncond,
                          jnp.asarray(guidance_scale, jnp.float32), variance, guidance_interval)
    eta = jnp.asarray(eta, jnp.float32)
    recompute_eps = clip_x0 is not None or dynamic_threshold is not None

    # carry = (x, the previous step's x₀, …): the multistep solvers' history, and the
    # self-conditioned denoiser's input (zeros before the first step)
    def predict(x, i, x0_prev):
        mean_out, var_out = model(x, i, x0_prev if self_condition else None)
        x0, eps = output_to_x0_eps(s, x, i, mean_out, model_output)
        if recompute_eps:
            x0 = _process_x0(x0, clip_x0, dynamic_threshold)
            eps = x0_to_eps(s, x, i, x0)
        return x0, eps, var_out

    def ddpm_step(carry, i):
        x = constrain(carry[0])
        x0, _, var_out = predict(x, i, carry[1])
        mean = s.posterior_mean_coef1[i] * x0 + s.posterior_mean_coef2[i] * x
        if variance == "fixed_small":
            logvar = s.posterior_log_variance_clipped[i]
        elif variance == "fixed_large":
            logvar = s.log_betas_large[i]
        else:
            logvar = learned_log_variance(s, i, var_out, x.ndim)
        z = jax.random.normal(jax.random.fold_in(rng_steps, i), x.shape, jnp.float32)
        x = mean + jnp.where(i > 0, jnp.exp(0.5 * logvar), 0.0) * z
        return (x, x0) + carry[2:], None

    def ddim_step(carry, i):
        # DDIM (Song et al. 2010.02502, eq. 12): x_prev = √ᾱ_prev x₀ + √(1 − ᾱ_prev − σ²) ε + σ z,
        # σ = η √((1 − ᾱ_prev)/(1 − ᾱ)) √(1 − ᾱ/ᾱ_prev).
        x = constrain(carry[0])
        x0, eps, _ = predict(x, i, carry[1])
        a, a_prev = s.alphas_cumprod[i], s.alphas_cumprod_prev[i]
        sigma = eta * jnp.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
        z = jax.random.normal(jax.random.fold_in(rng_steps, i), x.shape, jnp.float32)
        x = (jnp.sqrt(a_prev) * x0 + jnp.sqrt(jnp.maximum(1 - a_prev - sigma ** 2, 0.0)) * eps
             + sigma * z)
        return (x, x0) + carry[2:], None

    def dpmpp_2m_step(carry, i):
        # DPM-Solver++(2M), data prediction (Lu et al. 2211.01095, Algorithm 2), λ = log(α/σ):
        #   h_i = λ_{t_i} − λ_{t_{i−1}},  r_i = h_{i−1}/h_i,
        #   D_i = (1 + 1/(2 r_i)) x₀(t_{i−1}) − 1/(2 r_i) x₀(t_{i−2})   (D = x₀ on the first step),
        #   x_{t_i} = (σ_{t_i}/σ_{t_{i−1}}) x_{t_{i−1}} − α_{t_i} (e^{−h_i} − 1) D_i.
        # The final step lands on clean data (ᾱ = 1, σ = 0), where the update reduces to x = x₀
        # (first order, the reference's "lower order final"). A step more than LONG_STEP times
        # the previous one in λ is also taken at first order (see ``_order_cap``).
        x, x0_prev, unused_x0, h_prev, unused_h, count = carry
        x = constrain(x)
        x0, _, _ = predict(x, i, x0_prev)
        a_s, a_t = s.alphas_cumprod[i], s.alphas_cumprod_prev[i]
        final = a_t >= 1.0
        a_t = jnp.where(final, 0.5, a_t)            # keeps the unused branch finite
        h = _lambda(a_t) - _lambda(a_s)
        second = (count > 0) & (_order_cap(h, h_prev) >= 2)
        r = h_prev / h
        d = jnp.where(second, (1 + 0.5 / r) * x0 - (0.5 / r) * x0_prev, x0)
        x_next = (jnp.sqrt((1 - a_t) / (1 - a_s)) * x
                  - jnp.sqrt(a_t) * jnp.expm1(-h) * d)
        x_next = jnp.where(final, x0, x_next)
        return (x_next, x0, unused_x0, h, unused_h, count + 1), None

    def dpmpp_3m_step(carry, i):
        # Third-order multistep DPM-Solver++ (data prediction). The exact solution from λ_s to
        # λ_t = λ_s + h (Lu et al. 2211.01095) with x₀(λ) Taylor-expanded at λ_s:
        #   x_t = (σ_t/σ_s) x_s + α_t [(1 − e^{−h}) x₀ + (h − 1 + e^{−h}) x₀'
        #                                  + (h²/2 − h + 1 − e^{−h}) x₀''],
        # (the φ-function integrals ∫₀ʰ e^{u−h} uᵏ/k! du of DPM-Solver, 2206.00927), x₀', x₀''
        # those of the quadratic through the last three predictions at λ_s, λ_s − h₀,
        # λ_s − h₀ − h₁. Warm-up: first order on the first step, second order on the second.
        # The last step (onto clean data) is x = x₀, and a step much longer in λ than the one
        # before is taken at a lower order (``_order_cap``): a polynomial through the history
        # extrapolated far past where it was measured is worse than a lower-order one there.
        x, x0_1, x0_2, h_0, h_1, count = carry
        x = constrain(x)
        x0, _, _ = predict(x, i, x0_1)
        a_s, a_t = s.alphas_cumprod[i], s.alphas_cumprod_prev[i]
        final = a_t >= 1.0
        a_t = jnp.where(final, 0.5, a_t)            # keeps the unused branch finite
        h = _lambda(a_t) - _lambda(a_s)
        order = jnp.minimum(jnp.minimum(count + 1, 3), _order_cap(h, h_0))
        d1 = (x0 - x0_1) / h_0
        dd = (d1 - (x0_1 - x0_2) / h_1) / (h_0 + h_1)
        der1 = jnp.where(order >= 3, d1 + h_0 * dd, d1)
        em = jnp.expm1(-h)
        small = h < 0.1                              # series: no cancellation at tiny h
        h2, h3 = h * h, h * h * h
        c2 = jnp.where(small, h2 / 2 - h3 / 6 + h2 * h2 / 24 - h2 * h3 / 120, h + em)
        c3 = jnp.where(small, h3 / 6 - h2 * h2 / 24 + h2 * h3 / 120 - h3 * h3 / 720,
                       h2 / 2 - h - em)
        corr = (jnp.where(order >= 2, c2 * der1, 0.0)
                + jnp.where(order >= 3, 2.0 * c3 * dd, 0.0))
        x_next = (jnp.sqrt((1 - a_t) / (1 - a_s)) * x
                  + jnp.sqrt(a_t) * (-em * x0 + corr))
        x_next = jnp.where(final, x0, x_next)
        return (x_next, x0, x0_1, h, h_0, count + 1), None

    step = {"ddpm": ddpm_step, "ddim": ddim_step, "dpmpp_2m": dpmpp_2m_step,
            "dpmpp_3m": dpmpp_3m_step}[method]
    one = jnp.ones((), jnp.float32)
    x0_2 = jnp.zeros_like(x) if method == "dpmpp_3m" else jnp.zeros((), jnp.float32)
    carry = (constrain(x), jnp.zeros_like(x), x0_2, one, one, jnp.zeros((), jnp.int32))
    steps = jnp.arange(s.num_steps - 1, -1, -1, dtype=jnp.int32)
    carry, _ = jax.lax.scan(step, carry, steps)
    return constrain(carry[0])


def _check_self_cond_dicts(self_condition, cond, uncond):
    if self_condition and not (isinstance(cond, dict)
                               and (uncond is None or isinstance(uncond, dict))):
        raise ValueError("self_condition=True passes the previous x0 as cond['self_cond']: "
                         "cond (and uncond) must be dicts")


def _check_batch(tree, batch, name):
    for leaf in jax.tree.leaves(tree):
        if not hasattr(leaf, "shape") or leaf.ndim == 0 or leaf.shape[0] != batch:
            raise ValueError(f"every {name} leaf must have the sample batch {batch} as its "
                             f"leading axis; got shape {getattr(leaf, 'shape', type(leaf))}")


# ----------------------------------------------------------------------------- DDIM inversion


def ddim_invert(denoiser: Callable, params: Any, x0: jax.Array, *, schedule: Schedule,
                cond: Any = None, uncond: Any = None, guidance_scale=1.0,
                model_output: str = "eps", fixed_point_iters: int = 2,
                batch_sharding: jax.sharding.Sharding | None = None,
                guidance_interval: tuple[float, float] | None = None,
                self_condition: bool = False) -> jax.Array:
    """Deterministic DDIM encoding x₀ → x_T, the inverse of ``sample(method="ddim", eta=0,
    x_T=…)`` with the same schedule, conditioning and guidance (``guidance_interval`` too).

    Each step solves the DDIM update for its input: x_i = √ᾱ_i (x_{i-1} − √(1−ᾱ_{i-1}) ε)/√ᾱ_{i-1}
    + √(1−ᾱ_i) ε with ε = ε(x_i, t_i). The usual inversion evaluates ε at x_{i-1} instead;
    ``fixed_point_iters`` further evaluations at the current estimate of x_i refine it (0 gives
    the usual approximate inversion; each costs one more forward per step).

    ``self_condition``: a self-conditioned denoiser reads an x₀ estimate. Sampling gives step i
    the x₀ of step i + 1, which the inversion (running from t = 0 up) has not reached; it gives
    step i the x₀ predicted at step i − 1 instead (the clean input on the first step), so the
    inversion is approximate there even with fixed-point iterations.
    Returns x_T ``[B, …]`` float32.
    """
    check_model_output(model_output)
    if fixed_point_iters < 0:
        raise ValueError(f"fixed_point_iters must be ≥ 0, got {fixed_point_iters}")
    if callable(uncond):
        uncond = uncond(cond)
    _check_guidance(guidance_scale)
    check_guidance_interval(guidance_interval)
    if uncond is None and not _is_one(guidance_scale):
        raise ValueError("guidance_scale ≠ 1 asks for classifier-free guidance, which needs an "
                         "uncond (the null conditioning, or a builder cond -> uncond)")
    x = jnp.asarray(x0, jnp.float32)
    _check_batch(cond, x.shape[0], "cond")
    _check_batch(uncond, x.shape[0], "uncond")
    _check_self_cond_dicts(self_condition, cond, uncond)
    constrain = ((lambda v: jax.lax.with_sharding_constraint(v, batch_sharding))
                 if batch_sharding is not None else (lambda v: v))
    s = schedule
    model = _guided_model(denoiser, params, s, cond, uncond,
                          jnp.asarray(guidance_scale, jnp.float32), "fixed_small",
                          guidance_interval)

    def x0_eps_at(x, i, x0_prev):
        mean_out, _ = model(x, i, x0_prev if self_condition else None)
        return output_to_x0_eps(s, x, i, mean_out, model_output)

    def step(carry, i):
        x_prev, x0_prev = carry
        x_prev = constrain(x_prev)
        a, a_prev = s.alphas_cumprod[i], s.alphas_cumprod_prev[i]

        def solve(eps):
            return (jnp.sqrt(a / a_prev) * (x_prev - jnp.sqrt(1 - a_prev) * eps)
                    + jnp.sqrt(1 - a) * eps)

        x0_i, eps = x0_eps_at(x_prev, i, x0_prev)
        x_i = solve(eps)
        for _ in range(fixed_point_iters):
            x0_i, eps = x0_eps_at(x_i, i, x0_prev)
            x_i = solve(eps)
        return (x_i, x0_i), None

    (x, _), _ = jax.lax.scan(step, (constrain(x), x),
                             jnp.arange(s.num_steps, dtype=jnp.int32))
    return constrain(x)


# ----------------------------------------------------------------------------- jitted sampler


class Sampler:
    """A jitted sampler with its static configuration fixed; reuse it across calls.

    ``sampler(params, cond, uncond, rng, guidance_scale=1.0, eta=0.0, x_T=None) -> samples``.
    ``guidance_scale`` and ``eta`` are traced: new values reuse the compiled executable.
    ``jitted`` is the underlying ``jax.jit`` function (``jitted._cache_size()`` counts compiles).
    """

    def __init__(self, denoiser, *, schedule, shape, method="ddim", model_output="eps",
                 variance="fixed_small", clip_x0=None, dynamic_threshold=None,
                 batch_sharding=None, guidance: bool = True, self_condition: bool = False):
        _check_config(method, variance, model_output, clip_x0, dynamic_threshold)
        self.shape = tuple(shape)
        self.guidance = guidance
        self.schedule = schedule

        def run(params, cond, uncond, rng, guidance_scale, eta, x_T):
            return sample(denoiser, params, schedule=schedule, rng=rng,
                          shape=None if x_T is not None else self.shape, x_T=x_T, cond=cond,
                          uncond=uncond if guidance else None, method=method, eta=eta,
                          guidance_scale=guidance_scale if guidance else 1.0,
                          model_output=model_output, variance=variance, clip_x0=clip_x0,
                          dynamic_threshold=dynamic_threshold, batch_sharding=batch_sharding,
                          self_condition=self_condition)

        self.jitted = jax.jit(run)

    def __call__(self, params, cond, uncond, rng, guidance_scale=1.0, eta=0.0, x_T=None):
        _check_eta(eta)
        _check_guidance(guidance_scale)
        if self.guidance and uncond is None:
            raise ValueError("this sampler was made with guidance=True and needs an uncond "
                             "(the null conditioning, or a builder cond -> uncond)")
        if not self.guidance:
            if uncond is not None or not _is_one(guidance_scale):
                raise ValueError("guidance was requested (an uncond or guidance_scale ≠ 1) of a "
                                 "sampler made with guidance=False; make it with guidance=True")
        if x_T is not None and tuple(x_T.shape) != self.shape:
            raise ValueError(f"x_T has shape {tuple(x_T.shape)}; this sampler was made for "
                             f"{self.shape}")
        return self.jitted(params, cond, uncond, rng, jnp.asarray(guidance_scale, jnp.float32),
                           jnp.asarray(eta, jnp.float32), x_T)


def make_sampler(denoiser: Callable, *, schedule: Schedule, shape: tuple[int, ...],
                 method: str = "ddim", model_output: str = "eps",
                 variance: str = "fixed_small", clip_x0: tuple[float, float] | None = None,
                 dynamic_threshold: float | None = None,
                 batch_sharding: jax.sharding.Sharding | None = None,
                 guidance: bool = True, self_condition: bool = False) -> Sampler:
    """A ready jitted :class:`Sampler` ``(params, cond, uncond, rng, guidance_scale, eta) ->
    samples`` for models and pipelines to share. The schedule is closed over (a constant)."""
    return Sampler(denoiser, schedule=schedule, shape=shape, method=method,
                   model_output=model_output, variance=variance, clip_x0=clip_x0,
                   dynamic_threshold=dynamic_threshold, batch_sharding=batch_sharding,
                   guidance=guidance, self_condition=self_condition)
