"""Shared-sampler overhead and compile time on a small U-Net-like conv denoiser.

overhead = jitted sampler time for N steps ÷ (N × one jitted guided forward on the 2B batch);
the goal is ≤ 1.05. Also: compile time of the sampler, and that a second call with another
guidance scale (and η) triggers no compilation.
"""

from __future__ import annotations

import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.core.diffusion import make_sampler, make_schedule, respace

BATCH, RES, CH = 8, 32, 3
STEPS = 25
REPEATS = 5


class _ResBlock(nn.Module):
    width: int

    @nn.compact
    def __call__(self, x, temb):
        h = nn.Conv(self.width, (3, 3))(nn.silu(nn.GroupNorm(8)(x)))
        h = h + nn.Dense(self.width)(temb)[:, None, None, :]
        h = nn.Conv(self.width, (3, 3))(nn.silu(nn.GroupNorm(8)(h)))
        return h + (x if x.shape[-1] == self.width else nn.Conv(self.width, (1, 1))(x))


class TinyUNet(nn.Module):
    """Two resolutions, two res-blocks each way, sinusoidal timestep embedding + class cond."""

    width: int = 64

    @nn.compact
    def __call__(self, x, t, label):
        half = self.width // 2
        freqs = jnp.exp(-np.log(10000.0) * jnp.arange(half) / half)
        temb = jnp.concatenate([jnp.sin(t[:, None] * freqs), jnp.cos(t[:, None] * freqs)], -1)
        temb = nn.Dense(4 * self.width)(nn.silu(nn.Dense(4 * self.width)(temb)))
        temb = temb + nn.Embed(11, 4 * self.width)(label)          # label 10 = null
        h1 = _ResBlock(self.width)(nn.Conv(self.width, (3, 3))(x), temb)
        h2 = _ResBlock(2 * self.width)(nn.Conv(self.width, (3, 3), strides=2)(h1), temb)
        h2 = _ResBlock(2 * self.width)(h2, temb)
        up = jax.image.resize(h2, h1.shape[:3] + (h2.shape[-1],), "nearest")
        h = _ResBlock(self.width)(jnp.concatenate([up, h1], -1), temb)
        return nn.Conv(x.shape[-1], (3, 3))(nn.silu(nn.GroupNorm(8)(h)))


def _median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run() -> str:
    model = TinyUNet()
    x = jnp.zeros((BATCH, RES, RES, CH))
    labels = jnp.arange(BATCH) % 10
    params = model.init(jax.random.key(0), x, jnp.zeros((BATCH,), jnp.int32), labels)

    def denoiser(p, x_t, t, cond):
        return model.apply(p, x_t, t.astype(jnp.float32), cond["label"])

    schedule = respace(make_schedule("cosine", 1000), f"ddim{STEPS}")
    cond, uncond = {"label": labels}, {"label": jnp.full((BATCH,), 10)}
    sampler = make_sampler(denoiser, schedule=schedule, shape=x.shape, method="ddim")

    compiles = []

    def listener(name, duration, **_):
        if name == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    t0 = time.perf_counter()
    jax.block_until_ready(sampler(params, cond, uncond, jax.random.key(1), 3.0, 0.0))
    first_call = time.perf_counter() - t0
    n_first = len(compiles)
    t0 = time.perf_counter()
    jax.block_until_ready(sampler(params, cond, uncond, jax.random.key(2), 5.0, 0.5))
    second_call = time.perf_counter() - t0
    new_compiles = len(compiles) - n_first
    jax.monitoring.unregister_event_duration_listener(listener)

    # one guided forward: the same [x; x], [cond; uncond] batch of 2B the sampler runs per step
    both = {"label": jnp.concatenate([labels, uncond["label"]])}
    fwd = jax.jit(lambda p, xx, t: denoiser(p, xx, t, both))
    xx = jnp.concatenate([x, x])
    tt = jnp.full((2 * BATCH,), 500, jnp.int32)
    jax.block_until_ready(fwd(params, xx, tt))

    def forwards():
        out = None
        for _ in range(STEPS):
            out = fwd(params, xx, tt)
        return out

    t_fwd = _median_time(forwards, REPEATS)
    t_sample = _median_time(lambda: sampler(params, cond, uncond, jax.random.key(3), 4.0, 0.0),
                            REPEATS)
    ratio = t_sample / t_fwd
    goal = "meets" if ratio <= 1.05 else "misses"
    n_params = sum(p.size for p in jax.tree.leaves(params))
    return "\n".join([
        "## Shared sampler (`bench_sampler.py`)",
        "",
        f"Denoiser: a small U-Net-like conv net ({n_params / 1e6:.2f} M params, 2 resolutions, "
        f"5 res-blocks, timestep + class embedding) on x `[{BATCH}, {RES}, {RES}, {CH}]`; "
        f"DDIM, {STEPS} steps, classifier-free guidance (one forward on the 2B = {2 * BATCH} "
        f"batch per step). Times are the median of {REPEATS} runs.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| sampler, {STEPS} steps (jitted `lax.scan`) | {t_sample * 1e3:.1f} ms |",
        f"| {STEPS} × one jitted guided forward (2B batch) | {t_fwd * 1e3:.1f} ms |",
        f"| **overhead ratio** (goal ≤ 1.05) | **{ratio:.3f}** ({goal} the goal) |",
        f"| first call (trace + compile + run) | {first_call:.2f} s |",
        f"| backend compile time of the sampler | {sum(compiles[:n_first]):.2f} s "
        f"({n_first} compilation(s)) |",
        f"| second call, guidance 3.0 → 5.0 and η 0 → 0.5 | {second_call * 1e3:.1f} ms, "
        f"**{new_compiles} new compilations** |",
        "",
    ])


if __name__ == "__main__":
    print(run())
