"""DALL·E autoregressive sampling speed: KV cache vs full recomputation.

The shapes-scale transformer (width 128, 4 layers, 24 text + 16×16 = 256 image tokens, random
weights — speed does not depend on them) samples the 256 image tokens of a batch of 8 captions,
either with :func:`unclip_jax.core.ar.generate` (text prefilled, one cached token per step) or with
:func:`unclip_jax.models.dalle.sample_uncached` (the whole stream recomputed every step), both
jitted, compile excluded. Reported: image tokens per second (batch × 256 / time), median of
REPEATS runs.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp

from unclip_jax.models import dalle

BATCH = 8
GRID = 16               # experiments/shapes/dalle.py's dVAE grid
REPEATS = 5


def _time(fn) -> float:
    jax.block_until_ready(fn())                      # compile
    times = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run() -> str:
    rows = []
    for attention in ("full", "paper"):
        cfg = dalle.DalleConfig(text_vocab_size=512, image_vocab_size=512, text_length=24,
                                grid_size=GRID, width=128, depth=4, num_heads=4,
                                attention=attention)
        b = dalle.dummy_inputs(cfg, 1)
        params = jax.jit(dalle.DalleTransformer(cfg).init)(
            jax.random.PRNGKey(0), dalle.stream(cfg, b["text"], b["image_tokens"])[:, :-1])
        params = jax.tree.map(lambda x: x + 0.02, params["params"])
        text = jnp.tile(jnp.array([[2, 10, 11, 12, 3] + [0] * 19], jnp.int32), (BATCH, 1))
        rng = jax.random.PRNGKey(1)
        cached = _time(lambda: dalle.sample(cfg, params, text, rng))
        full = _time(lambda: dalle.sample_uncached(cfg, params, text, rng))
        n = BATCH * cfg.image_length
        rows.append(f"| {attention} | {n / cached:,.0f} | {n / full:,.0f} | "
                    f"{full / cached:.1f}× |")
    return "\n".join([
        "## DALL·E sampling: KV cache vs full recomputation",
        "",
        f"Shapes-scale transformer (width 128, 4 layers, T = 24 + {GRID * GRID}), batch "
        f"{BATCH}, {GRID * GRID} image tokens per sample, jitted, compile excluded, median of "
        f"{REPEATS} runs ({jax.devices()[0].platform}).",
        "",
        "| attention | tokens/s, KV cache | tokens/s, recomputation | speed-up |",
        "|---|---|---|---|",
        *rows,
    ]) + "\n"


if __name__ == "__main__":
    print(run())
