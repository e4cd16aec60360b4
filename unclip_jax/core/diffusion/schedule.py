"""Noise schedules: betas, ᾱ, the forward process q(x_t | x_0), its posterior, and respacing
(ours, and Karlo's / diffusers' ``UnCLIPScheduler`` grid: :func:`karlo_schedule`).

Conventions. A schedule has ``N`` steps indexed ``i = 0 … N-1`` (``N = T`` for a base schedule).
Every array of a :class:`Schedule` is indexed by that *step index*; ``timesteps[i]`` is the
original training timestep of step ``i`` (``timesteps == arange(T)`` for a base schedule, a
subset of it after :func:`respace`). Denoisers always receive ``timesteps[i]``, so a respaced
sampler shows the model the ``t`` it was trained with. ``alphas_cumprod_prev[0] == 1``: the step
below index 0 is clean data.

All arrays are computed in float64 with numpy and stored as float32 ``jnp`` arrays (timesteps as
int32). The schedule is a pytree (``flax.struct.dataclass``): it can be closed over by a jitted
function or passed into one; ``kind`` and ``base_num_timesteps`` are static metadata.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from flax import struct

KINDS = ("linear", "cosine")
COSINE_OFFSET = 0.008     # s in improved DDPM's ᾱ(t) = cos²((t/T + s)/(1 + s) · π/2)
MAX_BETA = 0.999          # improved DDPM caps cosine betas to avoid a singularity at t = T
LOGSNR_MIN = -4.0         # "logsnrN" spacing: lowest half log-SNR λ = log(α/σ) of its λ grid


@struct.dataclass
class Schedule:
    """Per-step arrays of a (possibly respaced) diffusion schedule; each is ``[N]``."""

    betas: jnp.ndarray
    alphas_cumprod: jnp.ndarray                    # ᾱ_i
    alphas_cumprod_prev: jnp.ndarray               # ᾱ_{i-1}, with ᾱ_{-1} = 1
    sqrt_alphas_cumprod: jnp.ndarray
    sqrt_one_minus_alphas_cumprod: jnp.ndarray
    log_one_minus_alphas_cumprod: jnp.ndarray
    sqrt_recip_alphas_cumprod: jnp.ndarray         # 1/√ᾱ
    sqrt_recipm1_alphas_cumprod: jnp.ndarray       # √(1/ᾱ − 1)
    posterior_variance: jnp.ndarray                # β̃_i = β_i (1 − ᾱ_{i-1}) / (1 − ᾱ_i)
    posterior_log_variance_clipped: jnp.ndarray    # log β̃ with β̃_0 replaced by β̃_1
    posterior_mean_coef1: jnp.ndarray              # multiplies x_0
    posterior_mean_coef2: jnp.ndarray              # multiplies x_t
    log_betas_large: jnp.ndarray                   # log of "fixed large" variance: β, β_0 := β̃_1
    timesteps: jnp.ndarray                         # int32 original timestep of each step
    kind: str = struct.field(pytree_node=False, default="linear")
    base_num_timesteps: int = struct.field(pytree_node=False, default=0)

    @property
    def num_steps(self) -> int:
        """N, the number of steps of this (respaced) schedule."""
        return int(self.betas.shape[0])


# ----------------------------------------------------------------------------- construction


def base_betas(kind: str, num_timesteps: int) -> np.ndarray:
    """float64 ``[T]`` betas of a named schedule.

    ``linear``: the DDPM schedule (β from 1e-4 to 0.02 at T = 1000), endpoints scaled by 1000/T
    as in improved DDPM so that any T gives a comparable amount of total noise.
    ``cosine``: improved DDPM's ᾱ(t) = cos²(((t/T) + s)/(1 + s) · π/2), s = 0.008,
    β_t = min(1 − ᾱ(t+1)/ᾱ(t), 0.999).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown schedule kind {kind!r}; accepted: {', '.join(KINDS)}")
    if not isinstance(num_timesteps, (int, np.integer)) or num_timesteps < 1:
        raise ValueError(f"num_timesteps must be a positive int, got {num_timesteps!r}")
    T = int(num_timesteps)
    if kind == "linear":
        scale = 1000.0 / T
        return np.linspace(scale * 1e-4, scale * 0.02, T, dtype=np.float64)

    def alpha_bar(t):
        return math.cos((t / T + COSINE_OFFSET) / (1 + COSINE_OFFSET) * math.pi / 2) ** 2

    return np.array([min(1.0 - alpha_bar(i + 1) / alpha_bar(i), MAX_BETA) for i in range(T)],
                    dtype=np.float64)


def from_betas(betas, timesteps=None, *, kind: str = "custom",
               base_num_timesteps: int | None = None) -> Schedule:
    """Build every derived array from float64 ``betas`` (``[N]``, each in (0, 1])."""
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or betas.size == 0:
        raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
    if np.any(betas <= 0) or np.any(betas > 1):
        raise ValueError("betas must lie in (0, 1]")
    n = betas.size
    timesteps = np.arange(n) if timesteps is None else np.asarray(timesteps)
    alphas = 1.0 - betas
    ac = np.cumprod(alphas)
    ac_prev = np.append(1.0, ac[:-1])
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    # β̃_0 = 0: the log is clipped by using β̃_1 in its place (improved DDPM).
    post_logvar = np.log(np.append(post_var[1], post_var[1:])) if n > 1 else np.log(betas)
    log_large = np.log(np.append(post_var[1], betas[1:])) if n > 1 else np.log(betas)
    f32 = lambda a: jnp.asarray(a, dtype=jnp.float32)  # noqa: E731
    return Schedule(
        betas=f32(betas),
        alphas_cumprod=f32(ac),
        alphas_cumprod_prev=f32(ac_prev),
        sqrt_alphas_cumprod=f32(np.sqrt(ac)),
        sqrt_one_minus_alphas_cumprod=f32(np.sqrt(1.0 - ac)),
        log_one_minus_alphas_cumprod=f32(np.log(1.0 - ac)),
        sqrt_recip_alphas_cumprod=f32(np.sqrt(1.0 / ac)),
        sqrt_recipm1_alphas_cumprod=f32(np.sqrt(1.0 / ac - 1.0)),
        posterior_variance=f32(post_var),
        posterior_log_variance_clipped=f32(post_logvar),
        posterior_mean_coef1=f32(betas * np.sqrt(ac_prev) / (1.0 - ac)),
        posterior_mean_coef2=f32((1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac)),
        log_betas_large=f32(log_large),
        timesteps=jnp.asarray(timesteps, dtype=jnp.int32),
        kind=kind,
        base_num_timesteps=int(base_num_timesteps if base_num_timesteps is not None else n),
    )


def make_schedule(kind: str, num_timesteps: int, respacing: str | int | None = None) -> Schedule:
    """The ``kind`` ("linear" | "cosine") schedule with ``num_timesteps`` steps, optionally
    respaced (see :func:`respace`)."""
    sched = from_betas(base_betas(kind, num_timesteps), kind=kind,
                       base_num_timesteps=num_timesteps)
    return sched if respacing is None else respace(sched, respacing)


# ----------------------------------------------------------------------------- respacing


def space_timesteps(num_timesteps: int, spec: str | int,
                    alphas_cumprod: np.ndarray | None = None) -> np.ndarray:
    """Sorted original timesteps to keep out of ``num_timesteps``.

    ``spec``:
      * ``"64"`` or ``64`` — 64 steps spread evenly over [0, T-1], both ends included;
      * ``"10,10,7"`` — T split into 3 equal sections with 10, 10 and 7 evenly spaced steps each
        (improved DDPM's section strings);
      * ``"ddim64"`` — DDIM's strided ("leading") spacing: ``0, k, 2k, …`` with ``k = T // 64``,
        exactly 64 steps (identical to improved DDPM's ``ddimN`` whenever that one exists, and to
        diffusers' DDIM ``timestep_spacing="leading"``);
      * ``"dpm25"`` — the multistep solvers' grid, diffusers' ``DPMSolverMultistepScheduler``
        default (``timestep_spacing="linspace"``): the N + 1 points ``round(k (T−1)/N)``,
        k = 0 … N, without t = 0, so the last step goes from t ≈ T/N straight to clean data
        (σ = 0). The evenly spaced "25" also visits t = 0, where a model evaluation is nearly
        the identity: the solver gets one useful step fewer and a long λ step into t = 0
        (see ``sampler._order_cap``). Needs N < T.
      * ``"logsnr20"`` — for DPM-Solver++: t = T-1 (the pure-noise start), then 19 steps evenly
        spaced in λ = log(α/σ) from λ(t=0) down to ``max(LOGSNR_MIN, λ(T-1))``, each at the
        nearest timestep (nudged apart where two coincide). Needs ``alphas_cumprod`` (``[T]``,
        float64), which :func:`respace` passes. An evenly-in-t grid makes a few huge λ steps at
        both ends (t = 53 → 0 is h ≈ 2.7 at 20 cosine steps) where multistep solvers extrapolate
        worst; this one keeps every step but the first (from the noise) the same size in λ.
    """
    T = int(num_timesteps)
    if isinstance(spec, (int, np.integer)):
        spec = str(int(spec))
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"respacing must be a step count, 'ddimN', 'dpmN', 'logsnrN' or a "
                         f"section string like '10,10,7'; got {spec!r}")
    spec = spec.strip()
    if spec.startswith("dpm"):
        try:
            n = int(spec[len("dpm"):])
        except ValueError:
            raise ValueError(f"respacing {spec!r}: expected 'dpm' followed by a step count, "
                             f"e.g. 'dpm25'") from None
        _check_count(n, T, spec)
        if n > T - 1:
            raise ValueError(f"respacing {spec!r}: the 'dpmN' grid leaves out t = 0, so it has "
                             f"at most T − 1 = {T - 1} steps")
        return np.round(np.linspace(0, T - 1, n + 1))[1:].astype(np.int64)
    if spec.startswith("logsnr"):
        try:
            n = int(spec[len("logsnr"):])
        except ValueError:
            raise ValueError(f"respacing {spec!r}: expected 'logsnr' followed by a step count, "
                             f"e.g. 'logsnr20'") from None
        _check_count(n, T, spec)
        if alphas_cumprod is None:
            raise ValueError(f"respacing {spec!r} spaces steps by log-SNR and needs the "
                             f"schedule's alphas_cumprod; use respace(schedule, {spec!r})")
        return _logsnr_steps(np.asarray(alphas_cumprod, np.float64), n)
    if spec.startswith("ddim"):
        try:
            n = int(spec[len("ddim"):])
        except ValueError:
            raise ValueError(f"respacing {spec!r}: expected 'ddim' followed by a step count, "
                             f"e.g. 'ddim50'") from None
        _check_count(n, T, spec)
        return np.arange(n) * (T // n)
    try:
        counts = [int(c) for c in spec.split(",")]
    except ValueError:
        raise ValueError(f"respacing {spec!r}: expected a step count ('64'), 'ddimN' or "
                         f"comma-separated section counts ('10,10,7')") from None
    _check_count(sum(counts), T, spec)
    size_per, extra = divmod(T, len(counts))
    start, taken = 0, []
    for k, count in enumerate(counts):
        size = size_per + (1 if k < extra else 0)
        if count < 1 or count > size:
            raise ValueError(f"respacing {spec!r}: section {k} has {size} timesteps but asks for "
                             f"{count} steps (each section needs 1 … {size})")
        stride = (size - 1) / (count - 1) if count > 1 else 0.0
        taken += [start + int(round(stride * j)) for j in range(count)]
        start += size
    return np.array(sorted(set(taken)))


def _logsnr_steps(ac: np.ndarray, n: int) -> np.ndarray:
    """Indices into ``ac`` for the "logsnrN" spacing (see :func:`space_timesteps`)."""
    T = ac.size
    if n == 1:
        return np.array([T - 1])
    lam = 0.5 * (np.log(ac) - np.log1p(-ac))               # decreasing in t
    targets = np.linspace(lam[0], max(LOGSNR_MIN, lam[-1]), n - 1)
    idx = np.array([int(np.argmin(np.abs(lam - v))) for v in targets] + [T - 1])
    for k in range(1, n):                                   # strictly increasing, in range
        idx[k] = max(idx[k], idx[k - 1] + 1)
    return np.minimum(idx, np.arange(T - n, T))           # still strictly increasing


def _check_count(n: int, T: int, spec: str) -> None:
    if n < 1:
        raise ValueError(f"respacing {spec!r}: the number of sampling steps must be ≥ 1")
    if n > T:
        raise ValueError(f"respacing {spec!r} asks for {n} sampling steps, more than the "
                         f"schedule's T = {T} timesteps")


def respace(schedule: Schedule, spec: str | int) -> Schedule:
    """A schedule over a subset of the timesteps of ``schedule``.

    The kept timesteps t_0 < t_1 < … get betas β'_i = 1 − ᾱ_{t_i}/ᾱ_{t_{i-1}} (ᾱ_{t_{-1}} = 1),
    so ᾱ at every kept step equals the original ᾱ; where t_i = t_{i-1} + 1 the original β is
    kept as is, so respacing to all T steps reproduces the schedule exactly. ``timesteps`` keeps
    the original (base) t of each step. Respacing a respaced schedule picks among its steps.
    """
    ts_here = np.asarray(schedule.timesteps, dtype=np.int64)
    n_here = ts_here.size
    if schedule.kind in KINDS:
        base = base_betas(schedule.kind, schedule.base_num_timesteps)
    else:  # custom: recover float64 betas of the base from this schedule (only if unrespaced)
        if n_here != schedule.base_num_timesteps:
            raise ValueError("respacing an already respaced custom schedule is not supported; "
                             "respace the base schedule instead")
        base = np.asarray(schedule.betas, dtype=np.float64)
    ac_here = np.cumprod(1.0 - base)[ts_here]
    keep_idx = space_timesteps(n_here, spec, alphas_cumprod=ac_here)
    kept = ts_here[keep_idx]
    ac = np.cumprod(1.0 - base)
    new_betas = np.empty(kept.size, dtype=np.float64)
    prev = -1
    for i, t in enumerate(kept):
        if t == prev + 1:
            new_betas[i] = base[t]
        else:
            new_betas[i] = 1.0 - ac[t] / (ac[prev] if prev >= 0 else 1.0)
        prev = t
    return from_betas(new_betas, kept, kind=schedule.kind,
                      base_num_timesteps=schedule.base_num_timesteps)


def karlo_timesteps(num_steps: int, num_timesteps: int = 1000) -> np.ndarray:
    """The increasing timesteps diffusers' ``UnCLIPScheduler.set_timesteps`` visits:
    ``round(k · (T − 1)/(n − 1))`` for k = 0 … n − 1 (both ends included; our default
    respacing spaces them differently)."""
    if num_steps < 2 or num_steps > num_timesteps:
        raise ValueError(f"num_steps must be in [2, {num_timesteps}], got {num_steps}")
    return np.unique(np.round(np.arange(num_steps) * (num_timesteps - 1) / (num_steps - 1))
                     .astype(np.int64))


def karlo_schedule(num_steps: int, num_timesteps: int = 1000,
                   kind: str = "cosine") -> Schedule:
    """Our ``kind`` :class:`Schedule` (Karlo: cosine) respaced onto Karlo's timesteps, so the
    shared sampler's ``method="ddpm"`` takes exactly ``UnCLIPScheduler``'s steps (β of a
    skip = 1 − ᾱ_t/ᾱ_prev, posterior mean and variance, x̂₀ clipping via ``clip_x0``)."""
    base = base_betas(kind, num_timesteps)
    ac = np.cumprod(1.0 - base)
    kept = karlo_timesteps(num_steps, num_timesteps)
    betas, prev = [], -1
    for t in kept:
        betas.append(base[t] if t == prev + 1 else 1.0 - ac[t] / (ac[prev] if prev >= 0 else 1))
        prev = t
    return from_betas(np.array(betas), kept, kind="custom", base_num_timesteps=num_timesteps)


# ----------------------------------------------------------------------------- forward process


def extract(arr: jnp.ndarray, i: jnp.ndarray, ndim: int) -> jnp.ndarray:
    """``arr[i]`` reshaped to ``[B, 1, …, 1]`` (rank ``ndim``) to broadcast against x.

    ``i``: int step indices, ``[B]`` or a scalar (scalar broadcasts over the batch).
    """
    vals = jnp.take(arr, jnp.asarray(i), axis=0)
    return vals.reshape(vals.shape + (1,) * (ndim - vals.ndim))


def q_sample(schedule: Schedule, x0: jnp.ndarray, i: jnp.ndarray, noise: jnp.ndarray):
    """x_t = √ᾱ_i x_0 + √(1 − ᾱ_i) ε. ``x0``, ``noise``: ``[B, …]``; ``i``: ``[B]`` step indices."""
    return (extract(schedule.sqrt_alphas_cumprod, i, x0.ndim) * x0
            + extract(schedule.sqrt_one_minus_alphas_cumprod, i, x0.ndim) * noise)


def q_posterior(schedule: Schedule, x0: jnp.ndarray, x_t: jnp.ndarray, i: jnp.ndarray):
    """Mean, variance and clipped log-variance of q(x_{i-1} | x_i, x_0), each broadcastable to
    ``[B, …]``."""
    nd = x_t.ndim
    mean = (extract(schedule.posterior_mean_coef1, i, nd) * x0
            + extract(schedule.posterior_mean_coef2, i, nd) * x_t)
    return (mean, extract(schedule.posterior_variance, i, nd),
            extract(schedule.posterior_log_variance_clipped, i, nd))
