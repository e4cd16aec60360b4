"""Objectives: what a denoiser predicts (ε, x₀ or v), the exact conversions, and the losses.

Shapes: ``x0``, ``x_t``, ``eps`` are ``[B, …]`` (``[B, D]`` embeddings or ``[B, H, W, C]``
images); ``i`` is ``[B]`` int32 *step indices* into a
:class:`~unclip_jax.core.diffusion.schedule.Schedule` (for a training schedule these equal the
timesteps). All arithmetic is float32.

Parameterisations (α = √ᾱ_i, σ = √(1 − ᾱ_i), x_t = α x₀ + σ ε):
  * ``eps``: ε;  ``x0``: x₀;  ``v`` = α ε − σ x₀ (Salimans & Ho), so x₀ = α x_t − σ v and
    ε = σ x_t + α v.

Learned variance (improved DDPM): the denoiser's output has twice the channels: the first half
is the mean output, the second ``v_var ∈ [-1, 1]``; frac = (v_var + 1)/2 and
log σ² = frac · log β_i + (1 − frac) · log β̃_i — interpolated in *log* space. It is trained with
the hybrid loss L_simple + λ·L_vlb, where the VLB term sees the mean output through a
stop-gradient, so only the variance learns from it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.core.diffusion.schedule import Schedule, extract, q_posterior, q_sample

MODEL_OUTPUTS = ("eps", "x0", "v")


def check_model_output(model_output: str) -> None:
    if model_output not in MODEL_OUTPUTS:
        raise ValueError(f"unknown model_output {model_output!r}; accepted: "
                         f"{', '.join(MODEL_OUTPUTS)}")


# ----------------------------------------------------------------------------- conversions


def _ab(schedule: Schedule, i, ndim):
    return (extract(schedule.sqrt_alphas_cumprod, i, ndim),
            extract(schedule.sqrt_one_minus_alphas_cumprod, i, ndim))


def eps_to_x0(schedule: Schedule, x_t, i, eps):
    """x₀ = (x_t − σ ε)/α."""
    nd = x_t.ndim
    return (extract(schedule.sqrt_recip_alphas_cumprod, i, nd) * x_t
            - extract(schedule.sqrt_recipm1_alphas_cumprod, i, nd) * eps)


def x0_to_eps(schedule: Schedule, x_t, i, x0):
    """ε = (x_t − α x₀)/σ."""
    nd = x_t.ndim
    return ((extract(schedule.sqrt_recip_alphas_cumprod, i, nd) * x_t - x0)
            / extract(schedule.sqrt_recipm1_alphas_cumprod, i, nd))


def v_to_x0(schedule: Schedule, x_t, i, v):
    a, s = _ab(schedule, i, x_t.ndim)
    return a * x_t - s * v


def v_to_eps(schedule: Schedule, x_t, i, v):
    a, s = _ab(schedule, i, x_t.ndim)
    return s * x_t + a * v


def v_target(schedule: Schedule, x0, i, eps):
    """v = α ε − σ x₀."""
    a, s = _ab(schedule, i, x0.ndim)
    return a * eps - s * x0


def output_to_x0_eps(schedule: Schedule, x_t, i, output, model_output: str):
    """(x₀, ε) implied by a denoiser output of kind ``model_output``."""
    if model_output == "eps":
        return eps_to_x0(schedule, x_t, i, output), output
    if model_output == "x0":
        return output, x0_to_eps(schedule, x_t, i, output)
    if model_output == "v":
        return v_to_x0(schedule, x_t, i, output), v_to_eps(schedule, x_t, i, output)
    check_model_output(model_output)


def x0_eps_to_output(schedule: Schedule, x_t, i, x0, eps, model_output: str):
    """The denoiser output of kind ``model_output`` that corresponds to (x₀, ε) at step ``i``."""
    check_model_output(model_output)
    if model_output == "eps":
        return eps
    if model_output == "x0":
        return x0
    return v_target(schedule, x0, i, eps)


# ----------------------------------------------------------------------------- variance


def learned_log_variance(schedule: Schedule, i, var_out, ndim: int | None = None):
    """log σ² = frac·log β + (1 − frac)·log β̃ (clipped), frac = (var_out + 1)/2; ``[B, …]``."""
    nd = var_out.ndim if ndim is None else ndim
    frac = (var_out + 1.0) / 2.0
    max_log = jnp.log(extract(schedule.betas, i, nd))
    min_log = extract(schedule.posterior_log_variance_clipped, i, nd)
    return frac * max_log + (1.0 - frac) * min_log


def split_variance(output, channels: int):
    """Split a learned-variance output ``[…, 2C]`` into (mean output, variance interp)."""
    return output[..., :channels], output[..., channels:]


# ----------------------------------------------------------------------------- likelihood terms


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def _approx_std_normal_cdf(x):
    # The tanh approximation of Φ used by improved DDPM's discretized likelihood.
    return 0.5 * (1.0 + jnp.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, mean, log_scale):
    """log p(x) of 8-bit data ``x ∈ [-1, 1]`` (bins of width 2/255) under
    N(mean, e^{2 log_scale})."""
    centered = x - mean
    inv_std = jnp.exp(-log_scale)
    cdf_plus = _approx_std_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    cdf_delta = cdf_plus - cdf_min
    return jnp.where(x < -0.999, log_cdf_plus,
                     jnp.where(x > 0.999, log_one_minus_cdf_min,
                               jnp.log(jnp.maximum(cdf_delta, 1e-12))))


def gaussian_log_likelihood(x, mean, logvar):
    """Continuous log N(x; mean, e^logvar), elementwise (for non-pixel data such as embeddings)."""
    return -0.5 * (np.log(2 * np.pi) + logvar + (x - mean) ** 2 * jnp.exp(-logvar))


def _mean_flat(x):
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def vlb_term(schedule: Schedule, x0, x_t, i, model_x0, model_logvar, *, discrete: bool = True):
    """The per-example VLB term L_{i} in bits per dimension, ``[B]``.

    For i > 0: KL(q(x_{i-1}|x_i, x₀) ‖ p(x_{i-1}|x_i)); for i = 0: −log p(x₀|x_1), discretized
    (8-bit images in [-1, 1]) when ``discrete`` else a continuous Gaussian density.
    """
    true_mean, _, true_logvar = q_posterior(schedule, x0, x_t, i)
    model_mean, _, _ = q_posterior(schedule, model_x0, x_t, i)
    kl = _mean_flat(normal_kl(true_mean, true_logvar, model_mean, model_logvar)) / np.log(2.0)
    if discrete:
        nll = discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_logvar)
    else:
        nll = gaussian_log_likelihood(x0, model_mean, model_logvar)
    nll = -_mean_flat(nll) / np.log(2.0)
    return jnp.where(i == 0, nll, kl)


# ----------------------------------------------------------------------------- training helpers


def min_snr_weight(schedule: Schedule, i, model_output: str, gamma: float) -> jnp.ndarray:
    """Per-example weight ``[B]`` of the Min-SNR-γ strategy (Hang et al. 2023) for L_simple.

    Each output's MSE is a fixed multiple of the x₀ error: ε-MSE = SNR·x₀-MSE, v-MSE =
    (SNR + 1)·x₀-MSE (SNR = ᾱ/(1 − ᾱ)). Min-SNR weights the x₀ error by min(SNR, γ), so the
    weight on an output's MSE is min(SNR, γ) divided by that multiple: the nearly-clean steps
    (SNR ≫ γ), whose easy gradients dominate an unweighted loss, stop crowding out the rest."""
    check_model_output(model_output)
    ac = jnp.take(schedule.alphas_cumprod, i)
    snr = ac / (1.0 - ac)
    clipped = jnp.minimum(snr, gamma)
    if model_output == "eps":
        return clipped / snr
    if model_output == "v":
        return clipped / (snr + 1.0)
    return clipped


TIMESTEP_SAMPLINGS = ("uniform", "logit_normal", "log_sigma_normal")


def check_timestep_sampling(kind: str, scale: float = 1.0) -> None:
    if kind not in TIMESTEP_SAMPLINGS:
        raise ValueError(f"unknown timestep sampling {kind!r}; accepted: "
                         f"{', '.join(TIMESTEP_SAMPLINGS)}")
    if kind != "uniform" and not scale > 0:
        raise ValueError(f"timestep sampling {kind!r} needs a scale > 0, got {scale}")


def sample_timesteps(rng, batch: int, num_steps: int, kind: str = "uniform",
                     loc: float = 0.0, scale: float = 1.0,
                     schedule: Schedule | None = None) -> jnp.ndarray:
    """int32 step indices in [0, num_steps), ``[batch]``, drawn from

    * ``"uniform"``: every step equally often (DDPM);
    * ``"logit_normal"``: ``(i + ½)/N = sigmoid(loc + scale·n)``, n ~ N(0, 1) (SD3, Esser et al.
      2024): concentrated on the middle of the schedule, ``loc > 0`` towards the noisy end;
    * ``"log_sigma_normal"``: ``log σ ~ N(loc, scale²)`` with σ = √((1 − ᾱ)/ᾱ) the
      variance-exploding noise level of the step (EDM's training distribution, Karras et al.
      2022: loc = −1.2, scale = 1.2), each draw taken to the step nearest in log σ; needs the
      ``schedule``.
    """
    check_timestep_sampling(kind, scale)
    if kind == "uniform":
        return jax.random.randint(rng, (batch,), 0, num_steps, dtype=jnp.int32)
    n = jax.random.normal(rng, (batch,), jnp.float32)
    if kind == "logit_normal":
        u = jax.nn.sigmoid(loc + scale * n)
        return jnp.clip(jnp.floor(u * num_steps), 0, num_steps - 1).astype(jnp.int32)
    if schedule is None or schedule.num_steps != num_steps:
        raise ValueError("log_sigma_normal timestep sampling needs the training schedule")
    ac = schedule.alphas_cumprod
    log_sigma = 0.5 * (jnp.log1p(-ac) - jnp.log(ac))             # increasing in the step
    target = loc + scale * n
    hi = jnp.clip(jnp.searchsorted(log_sigma, target), 1, num_steps - 1)
    nearer_lo = jnp.abs(target - log_sigma[hi - 1]) <= jnp.abs(log_sigma[hi] - target)
    return jnp.where(nearer_lo, hi - 1, hi).astype(jnp.int32)


def condition_keep_mask(rng, batch: int, drop_prob) -> jnp.ndarray:
    """Bool ``[batch]``: True where the conditioning is kept (dropped with ``drop_prob``)."""
    return jax.random.uniform(rng, (batch,)) >= drop_prob


def drop_condition(rng, cond: Any, drop_prob, null: Any = None, joint_prob: float = 0.0) -> Any:
    """Replace each example's conditioning by a null with probability ``drop_prob``.

    ``cond``: pytree (e.g. dict) of ``[B, …]`` arrays. ``drop_prob``: a float for the whole
    pytree (one draw per example, shared by all leaves), or a dict ``{key: prob}`` over the
    top-level keys of a dict ``cond`` (independent draws per key; missing keys are never
    dropped) — e.g. unCLIP's decoder drops the CLIP embedding 10% and the caption 50%.
    ``null``: ``None`` (zeros), or a pytree like ``cond`` (or, for dict probs, a dict with a
    subset of the keys) whose leaves broadcast against the cond leaves — e.g. a learned null
    embedding taken from the model's params, so it trains through this function.
    ``joint_prob`` (dict ``drop_prob`` only): with this probability an example loses every key
    of ``drop_prob`` at once, on top of the independent draws — independent drops alone leave
    the all-null input (the unconditional branch classifier-free guidance extrapolates from)
    only the product of the probabilities (unCLIP's 0.1 × 0.5 = 5 %).
    """
    def replace(c, nl, keep):
        def leaf(x, n):
            n = jnp.zeros_like(x) if n is None else jnp.broadcast_to(n, x.shape).astype(x.dtype)
            return jnp.where(keep.reshape((-1,) + (1,) * (x.ndim - 1)), x, n)
        if nl is None:
            return jax.tree.map(lambda x: leaf(x, None), c)
        return jax.tree.map(leaf, c, nl)

    leaves = jax.tree.leaves(cond)
    if not leaves:
        return cond
    batch = leaves[0].shape[0]
    if isinstance(drop_prob, dict):
        if not isinstance(cond, dict):
            raise ValueError("drop_prob given per key needs a dict cond")
        unknown = set(drop_prob) - set(cond)
        if unknown:
            raise ValueError(f"drop_prob names keys {sorted(unknown)} that cond lacks; cond has "
                             f"{sorted(cond)}")
        out = dict(cond)
        keep_any = (condition_keep_mask(jax.random.fold_in(rng, len(drop_prob)), batch,
                                        joint_prob) if joint_prob else True)
        for k, key in enumerate(sorted(drop_prob)):
            keep = condition_keep_mask(jax.random.fold_in(rng, k), batch, drop_prob[key])
            keep = keep & keep_any
            nl = None if null is None else null.get(key) if isinstance(null, dict) else null
            out[key] = replace(cond[key], nl, keep)
        return out
    if joint_prob:
        raise ValueError("joint_prob needs drop_prob given per key (one float already drops "
                         "every key at once)")
    return replace(cond, null, condition_keep_mask(rng, batch, drop_prob))


def check_self_condition(p: float) -> None:
    """ValueError unless ``p`` is a self-conditioning probability: 0 ≤ p < 1."""
    if not 0 <= p < 1:
        raise ValueError(f"self_condition {p} is not a self-conditioning probability; accepted: "
                         f"0 (off) or 0 < p < 1 (the paper's 0.5): the share of training batches "
                         f"given the model's own x0 estimate (the rest get zeros, the sampler's "
                         f"first step)")


def training_loss(params, x0, cond, rng, *, denoiser: Callable, schedule: Schedule,
                  model_output: str = "eps", learned_variance: bool = False,
                  vlb_weight: float = 0.001, discrete_data: bool = True,
                  cond_drop_prob: Any = 0.0, null_cond: Any = None,
                  cond_joint_drop_prob: float = 0.0, min_snr_gamma: float = 0.0,
                  timestep_sampling: str = "uniform", timestep_loc: float = 0.0,
                  timestep_scale: float = 1.0, self_condition: float = 0.0):
    """Diffusion training loss for one batch; pure, so any model can wrap it with ``partial``.

    Args:
      params: the denoiser's params. ``x0``: clean data ``[B, …]``. ``cond``: conditioning
        pytree (or None). ``rng``: PRNG key.
      denoiser: ``f(params, x_t, t, cond) -> output`` with ``t`` the ``[B]`` int32 original
        timesteps; output ``[B, …]`` like x0, or ``[…, 2C]`` with ``learned_variance``. It
        may return ``(output, aux)`` instead, ``aux`` a ``[B]`` auxiliary loss of the same
        forward pass (e.g. representation alignment) added to each example's loss as it is
        (metric "aux").
      model_output: "eps" | "x0" | "v" (what the mean output predicts; L_simple is MSE to it).
      learned_variance: hybrid loss L_simple + vlb_weight · T · L_t (T·L_t is the uniform-t
        estimate of L_vlb = Σ_t L_t; improved DDPM's λ = 0.001), stop-gradient on the mean.
      cond_drop_prob, null_cond, cond_joint_drop_prob: classifier-free-guidance dropout (see
        :func:`drop_condition`, whose ``joint_prob`` the last one is); ``null_cond`` may also
        be a callable ``params -> null pytree`` for a learned null.
      min_snr_gamma: > 0 weights L_simple per example by Min-SNR-γ (:func:`min_snr_weight`;
        the paper's γ = 5); 0 = unweighted (the DDPM/unCLIP L_simple).
      timestep_sampling, timestep_loc, timestep_scale: the training distribution of the step
        (:func:`sample_timesteps`; "uniform" is DDPM's). A non-uniform one reweights L_simple
        by its density; the VLB term keeps its uniform-t scale ``T·L_t`` (it trains only the
        variance output).
      self_condition: p > 0 trains a self-conditioned denoiser (Chen et al. 2022, "Analog
        Bits", §3): ``cond`` (a dict) gets ``"self_cond"``, an x₀ ``[B, …]`` like x0. With
        probability p (one coin per batch, as in the paper) it is the denoiser's own x₀ estimate
        from a first forward pass given zeros, under stop-gradient; otherwise zeros. The
        sampler's ``self_condition=True`` feeds each step the previous step's x₀.
    Returns:
      (scalar loss, dict of scalar metrics).
    """
    check_model_output(model_output)
    check_self_condition(self_condition)
    if min_snr_gamma < 0:
        raise ValueError(f"min_snr_gamma must be ≥ 0 (0 = unweighted), got {min_snr_gamma}")
    rng_t, rng_n, rng_d = jax.random.split(rng, 3)
    c = x0.shape[-1]
    batch = x0.shape[0]
    n = schedule.num_steps
    i = sample_timesteps(rng_t, batch, n, timestep_sampling, timestep_loc, timestep_scale,
                         schedule)
    noise = jax.random.normal(rng_n, x0.shape, jnp.float32)
    x0 = x0.astype(jnp.float32)
    x_t = q_sample(schedule, x0, i, noise)
    if cond is not None and not (isinstance(cond_drop_prob, (int, float)) and cond_drop_prob == 0):
        null = null_cond(params) if callable(null_cond) else null_cond
        cond = drop_condition(rng_d, cond, cond_drop_prob, null, cond_joint_drop_prob)
    t = jnp.take(schedule.timesteps, i)
    if self_condition > 0:
        if not isinstance(cond, dict):
            raise ValueError("self_condition > 0 passes the previous x0 estimate as "
                             "cond['self_cond']: cond must be a dict")
        zeros = jnp.zeros_like(x_t)

        def estimate(_):
            first = denoiser(params, x_t, t, dict(cond, self_cond=zeros))
            first = (first[0] if isinstance(first, tuple) else first).astype(jnp.float32)
            mean = split_variance(first, c)[0] if learned_variance else first
            return jax.lax.stop_gradient(
                output_to_x0_eps(schedule, x_t, i, mean, model_output)[0])

        use = jax.random.uniform(jax.random.fold_in(rng_d, 1)) < self_condition
        cond = dict(cond, self_cond=jax.lax.cond(use, estimate, lambda _: zeros, None))
    out = denoiser(params, x_t, t, cond)
    out, aux = out if isinstance(out, tuple) else (out, None)
    out = out.astype(jnp.float32)
    expected = x0.shape[:-1] + ((2 * c,) if learned_variance else (c,))
    if out.shape != expected:
        what = "mean output and variance interpolation" if learned_variance else "one output"
        raise ValueError(f"denoiser output has shape {out.shape}; expected {expected} "
                         f"({what} per channel of x0 {x0.shape})")
    if learned_variance:
        mean_out, var_out = split_variance(out, c)
    else:
        mean_out, var_out = out, None
    target = x0_eps_to_output(schedule, x_t, i, x0, noise, model_output)
    mse = _mean_flat((mean_out - target) ** 2)
    metrics = {"mse": jnp.mean(mse)}
    loss = mse
    if min_snr_gamma > 0:
        loss = loss * min_snr_weight(schedule, i, model_output, min_snr_gamma)
    if learned_variance:
        frozen_x0, _ = output_to_x0_eps(schedule, x_t, i, jax.lax.stop_gradient(mean_out),
                                        model_output)
        logvar = learned_log_variance(schedule, i, var_out)
        vb = vlb_term(schedule, x0, x_t, i, frozen_x0, logvar, discrete=discrete_data)
        loss = loss + vlb_weight * n * vb
        metrics["vlb"] = jnp.mean(vb)
    if aux is not None:
        if aux.shape != (batch,):
            raise ValueError(f"the denoiser's auxiliary loss has shape {aux.shape}; expected "
                             f"({batch},), one value per example")
        loss = loss + aux
        metrics["aux"] = jnp.mean(aux)
    loss = jnp.mean(loss)
    metrics["loss"] = loss
    return loss, metrics
