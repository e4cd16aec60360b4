"""Model FLOPs utilisation of the CLIP and decoder training steps on this machine's CPU.

MFU = (model FLOPs per step ÷ seconds per step) ÷ peak FLOP/s, with:

* peak: the float32 matmul throughput measured here, in the same process: a jitted
  ``[n, n] @ [n, n]`` for n in 1024, 2048, 3072, best of 10 calls each, the best n kept
  (2n³ FLOPs per call);
* model FLOPs per step: XLA's own count for the compiled update
  (``jit(...).lower(...).compile().cost_analysis()["flops"]``: forward, backward and the
  AdamW update), and for CLIP also an analytic count (6 × matmul parameters × the tokens they
  see + 12 × L² × D per layer for attention + 6·B²·E for the similarity matrix, forward +
  backward; elementwise work and AdamW ignored);
* seconds per step: the median of 10 steps after 2 warm-up calls, batch from the config.

Configs: ``experiments/shapes/clip.py`` and ``experiments/shapes/decoder.py`` as the demo
trains them (vocabulary and context from their data configs), on synthetic batches; the
decoder's loss is fed CLIP embeddings directly (the frozen CLIP image tower that the real
task runs inside the step is left out).

Usage: ``nice -n 10 python benchmarks/bench_mfu.py`` (or through ``run_all.py mfu``).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
STEPS, WARMUP = 10, 2


def _block(x):
    import jax

    return jax.block_until_ready(x)


def matmul_peak() -> tuple[float, int]:
    """(best float32 matmul FLOP/s, the n that reached it)."""
    import jax
    import jax.numpy as jnp

    best, best_n = 0.0, 0
    mm = jax.jit(lambda a, b: a @ b)
    for n in (1024, 2048, 3072):
        a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
        b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
        _block(mm(a, b))
        for _ in range(10):
            t0 = time.perf_counter()
            _block(mm(a, b))
            rate = 2.0 * n ** 3 / (time.perf_counter() - t0)
            if rate > best:
                best, best_n = rate, n
    return best, best_n


def xla_flops(compiled) -> float:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):       # older jax: one dict per device program
        cost = cost[0]
    return float(cost["flops"])


def time_step(step, state, batch) -> float:
    """Median seconds per call of ``step(state, batch) -> (state, metrics)``."""
    for _ in range(WARMUP):
        state, m = step(state, batch)
    _block(m)
    times = []
    for _ in range(STEPS):
        t0 = time.perf_counter()
        state, m = step(state, batch)
        _block(m)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _step_and_state(init, loss, batch, cfg, hlo_flops: bool = False):
    """(compiled step, state, FLOPs per step, compile s, #params, params). FLOPs: the compiled
    module's cost analysis, or with ``hlo_flops`` the lowered (pre-optimisation) HLO's, which
    counts dots and convolutions on any backend (a GPU module's cuBLAS/cuDNN custom calls
    carry no FLOP count)."""
    import flax.linen as nn
    import jax

    from unclip_jax.train import loop
    from unclip_jax.train.optim import make_optimizer
    from unclip_jax.train.state import TrainState

    tx = make_optimizer(cfg.optim, cfg.train.steps)
    params = nn.meta.unbox(init(jax.random.key(0)))["params"]
    state = TrainState.create(params, tx, jax.random.key(1), ema=cfg.train.ema_decay > 0)
    step = jax.jit(functools.partial(loop.train_step, loss_fn=loss, tx=tx,
                                     ema_decay=cfg.train.ema_decay), donate_argnums=0)
    t0 = time.perf_counter()
    lowered = step.lower(state, batch)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    n_params = sum(x.size for x in jax.tree.leaves(params))
    flops = xla_flops(lowered if hlo_flops else compiled)
    return compiled, state, flops, compile_s, n_params, params


def clip_case():
    import jax.numpy as jnp

    from unclip_jax.core import config as config_lib
    from unclip_jax.models import clip

    cfg = config_lib.load_config(ROOT / "experiments/shapes/clip.py")
    mcfg = dataclasses.replace(cfg.model, vocab_size=cfg.data.vocab_size,
                               context_length=cfg.data.context_length,
                               image_size=cfg.data.image_size, eos_id=2, pad_id=0)
    b = cfg.train.batch_size
    r = np.random.default_rng(0)
    tokens = r.integers(3, mcfg.vocab_size, (b, mcfg.context_length)).astype(np.int32)
    tokens[:, 0], tokens[:, -1] = 1, mcfg.eos_id
    batch = {"image": jnp.asarray(r.uniform(-1, 1, (b, mcfg.image_size, mcfg.image_size, 3)),
                                  jnp.float32), "tokens": jnp.asarray(tokens)}
    model = clip.CLIP(mcfg)
    compiled, state, flops, compile_s, n_params, params = _step_and_state(
        lambda k: model.init(k, batch["image"], batch["tokens"]),
        lambda p, bt, rng: clip.loss_fn(model, p, bt, rng), batch, cfg)
    return cfg, mcfg, compiled, state, batch, flops, compile_s, n_params, params


def clip_analytic_flops(mcfg, params, batch_size: int) -> float:
    """6·(matmul params × tokens they see) + attention 12·L²·D per layer, per example."""
    import jax

    vis_tokens = (mcfg.image_size // mcfg.patch_size) ** 2 + 1
    txt_tokens = mcfg.context_length
    total = 0.0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        key = jax.tree_util.keystr(path)
        if leaf.ndim < 2 or "embedding" in key or "bias" in key:   # lookups, adds: no matmul
            continue
        tokens = vis_tokens if "visual" in key or "vision" in key else txt_tokens
        if leaf.ndim == 4:                           # patch conv: one output per patch
            tokens = vis_tokens - 1
        if key.endswith("['proj']") or "text_projection" in key:
            tokens = 1                               # pooled feature → joint embedding
        total += 6.0 * leaf.size * tokens
    attn = 12.0 * (mcfg.vision_layers * vis_tokens ** 2 * mcfg.vision_width
                   + mcfg.text_layers * txt_tokens ** 2 * mcfg.text_width)
    logits = 6.0 * batch_size * batch_size * mcfg.embed_dim   # the B×B similarity matrix
    return batch_size * (total + attn) + logits


def decoder_inputs():
    """``(cfg, mcfg, init, loss, batch)`` of the demo decoder's training step on a synthetic
    batch (CLIP embeddings fed directly)."""
    import jax.numpy as jnp

    from unclip_jax.core import config as config_lib
    from unclip_jax.models import decoder as D

    cfg = config_lib.load_config(ROOT / "experiments/shapes/decoder.py")
    mcfg = dataclasses.replace(cfg.model, image_size=cfg.data.image_size,
                               vocab_size=cfg.data.vocab_size,
                               context_length=cfg.data.context_length)
    b, s = cfg.train.batch_size, mcfg.image_size
    r = np.random.default_rng(0)
    emb = r.normal(size=(b, mcfg.clip_dim))
    batch = {"image": jnp.asarray(r.uniform(-1, 1, (b, s, s, 3)), jnp.float32),
             "image_emb": jnp.asarray(emb / np.linalg.norm(emb, axis=1, keepdims=True),
                                      jnp.float32),
             "tokens": jnp.zeros((b, mcfg.context_length), jnp.int32)}
    return (cfg, mcfg, lambda k: D.init_decoder(mcfg, k, 1),
            lambda p, bt, rng: D.decoder_loss(p, mcfg, bt["image"], bt["image_emb"],
                                              bt["tokens"] if mcfg.use_text else None, rng),
            batch)


def decoder_case():
    cfg, mcfg, init, loss, batch = decoder_inputs()
    compiled, state, flops, compile_s, n_params, _ = _step_and_state(init, loss, batch, cfg)
    return cfg, mcfg, compiled, state, batch, flops, compile_s, n_params


def run() -> str:
    import jax

    load_before = os.getloadavg()[0]
    peak, peak_n = matmul_peak()
    rows = []
    c_cfg, c_mcfg, c_step, c_state, c_batch, c_flops, c_compile, c_params, params = clip_case()
    analytic = clip_analytic_flops(c_mcfg, params, c_cfg.train.batch_size)
    c_sec = time_step(c_step, c_state, c_batch)
    rows.append(("CLIP (`experiments/shapes/clip.py`)", c_cfg.train.batch_size, c_params,
                 c_flops, analytic, c_sec, c_compile))
    d_cfg, _, d_step, d_state, d_batch, d_flops, d_compile, d_params = decoder_case()
    d_sec = time_step(d_step, d_state, d_batch)
    rows.append(("decoder (`experiments/shapes/decoder.py`)", d_cfg.train.batch_size,
                 d_params, d_flops, None, d_sec, d_compile))
    peak_after, _ = matmul_peak()       # the machine is shared: did the load change?
    load_after = os.getloadavg()[0]

    lines = [
        "## Model FLOPs utilisation of training steps (CPU)",
        "",
        f"Backend {jax.default_backend()}, {len(jax.devices())} device(s), float32. Peak: the "
        f"best jitted {peak_n}×{peak_n} float32 matmul = **{peak / 1e9:.1f} GFLOP/s** "
        f"(re-measured after the steps: {peak_after / 1e9:.1f} GFLOP/s; 1-minute load "
        f"average {load_before:.1f} before, {load_after:.1f} after). Step time: median "
        f"of {STEPS} steps after {WARMUP} warm-up calls, synthetic batches; FLOPs per step "
        f"from XLA's cost analysis of the compiled update (forward + backward + AdamW), and "
        f"an analytic 6·params·tokens + attention count where simple. The decoder step "
        f"excludes the frozen CLIP image tower the real task runs inside it.",
        "",
        "| step | batch | params | XLA GFLOP/step | analytic GFLOP/step | s/step | "
        "achieved GFLOP/s | MFU (XLA count) | MFU (analytic) | compile s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, b, n, fl, an, sec, comp in rows:
        an_s = f"{an / 1e9:.2f}" if an else "—"
        mfu_an = f"{an / sec / peak:.1%}" if an else "—"
        lines.append(f"| {name} | {b} | {n / 1e6:.2f} M | {fl / 1e9:.2f} | {an_s} | "
                     f"{sec:.3f} | {fl / sec / 1e9:.1f} | {fl / sec / peak:.1%} | {mfu_an} | "
                     f"{comp:.0f} |")
    lines += [
        "",
        "Reading: these models are small (widths 32-64), so most of a step is elementwise "
        "work, layer norms, softmax, convolutions with few channels and optimizer updates "
        "that run far below the matmul peak; MFU on a shared, loaded machine is also a lower "
        "bound (other processes take cores between the peak measurement and the steps).",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    print(run())
