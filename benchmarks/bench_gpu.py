"""Training-step MFU in bfloat16 and guided 64 px decoder sampling throughput on a GPU.

Runs only where JAX's default backend is a GPU (``run_all.py`` keeps the last section on
other backends; ``BACKEND`` below). What is measured, on one device:

* **peak**: the device's nominal dense bf16 tensor-core rate (``NOMINAL_TFLOPS``, the vendor's
  figure for the named chip) and, measured in the same process, the best jitted
  ``[n, n] @ [n, n]`` bf16 matmul for n in 4096, 8192 (2n³ FLOPs per call, best of 10);
* **training steps** of the paper-scale diffusion prior (``experiments/paper/prior.py``: width
  2048 × 24 layers, 1.2 B) and of the unCLIP decoder at the paper's widths
  (``experiments/paper/decoder.py``: 64 px, 512 channels × (1, 2, 3, 4), attention at 32/16/8,
  2048-wide caption encoder) with 1 residual block per level instead of 3 and 4 caption layers
  instead of 24 (``DECODER_OVERRIDES``: 1.5 B instead of 3.6 B, so that it compiles within a
  short lease; its layers, and so their efficiency, are the paper's). Both use their configs'
  bfloat16 compute with float32 params, AdamW state and EMA: the real update of
  ``train.loop.train_step`` on synthetic batches, median of ``STEPS`` calls after ``WARMUP``;
* **guided sampling** with that decoder: the shared DDIM ``lax.scan`` loop, one batched forward
  of cond + uncond per step, on a batch of 64 px images; images/s for ``SAMPLE_STEPS`` steps
  (the paper samples with 250; the time scales linearly).

MFU = model FLOPs per step ÷ seconds per step ÷ peak. Model FLOPs: the cost analysis of the
*lowered* update (the GPU-compiled module hides its dots and convs in cuBLAS/cuDNN custom calls,
which carry no FLOP count) and, for the prior, the analytic 6·N·tokens +
12·depth·tokens²·width (XLA counts a ``scan`` over layers once); the larger of the two is
used. Cases run in order of compile cost and ``--out`` is rewritten after each. ``--quick``
runs tiny configs on any backend (a smoke test of this script, not a measurement).

Usage: ``python benchmarks/run_all.py gpu`` on a GPU machine, or
``python benchmarks/bench_gpu.py [--quick] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import statistics
import sys
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BACKEND = "gpu"                     # run_all.py runs this script only on this backend
STEPS, WARMUP = 10, 2
PRIOR_BATCH, DECODER_BATCH = 256, 16
SAMPLE_BATCH, SAMPLE_STEPS = 16, 50
DECODER_OVERRIDES = {"num_res_blocks": 1, "text_layers": 4}
# Dense bf16 tensor-core peak by device name (vendor data sheets, SXM parts, no sparsity).
NOMINAL_TFLOPS = {"H200": 989.5, "H100": 989.5, "A100": 312.0, "B200": 2250.0}


@functools.lru_cache(maxsize=1)
def _mfu_module():
    """bench_mfu.py (its step builder and timer), loaded once."""
    spec = importlib.util.spec_from_file_location("_bench_mfu", Path(__file__).with_name(
        "bench_mfu.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _log(msg: str) -> None:
    print(f"[bench_gpu {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def nominal_peak(device) -> tuple[float | None, str]:
    kind = getattr(device, "device_kind", str(device))
    for name, tflops in NOMINAL_TFLOPS.items():
        if name in kind:
            return tflops * 1e12, kind
    return None, kind


def bf16_matmul_peak(sizes=(4096, 8192)) -> tuple[float, int]:
    import jax
    import jax.numpy as jnp

    best, best_n = 0.0, 0
    mm = jax.jit(lambda a, b: a @ b)
    for n in sizes:
        a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
        b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
        jax.block_until_ready(mm(a, b))
        for _ in range(10):
            t0 = time.perf_counter()
            jax.block_until_ready(mm(a, b))
            best_rate = 2.0 * n ** 3 / (time.perf_counter() - t0)
            if best_rate > best:
                best, best_n = best_rate, n
    return best, best_n


def prior_case(quick: bool) -> dict:
    import jax.numpy as jnp

    from unclip_jax.core import config as config_lib
    from unclip_jax.models import prior as P

    mfu = _mfu_module()
    cfg = config_lib.load_config(ROOT / "experiments/paper/prior.py")
    mcfg = cfg.model
    b = PRIOR_BATCH
    if quick:
        mcfg = dataclasses.replace(mcfg, embed_dim=64, text_width=64, width=128, depth=2,
                                   num_heads=4)
        b = 8
    r = np.random.default_rng(0)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    L = mcfg.context_length
    batch = {"image_emb": jnp.asarray(unit(r.normal(size=(b, mcfg.embed_dim))), jnp.float32),
             "text_emb": jnp.asarray(unit(r.normal(size=(b, mcfg.embed_dim))), jnp.float32),
             "text_states": jnp.asarray(r.normal(size=(b, L, mcfg.text_width)), jnp.float32),
             "text_tokens": jnp.asarray(r.integers(1, 1000, (b, L)), jnp.int32)}
    model = P.DiffusionPrior(mcfg)
    cfg = dataclasses.replace(cfg, model=mcfg)
    cond = P.condition(mcfg, batch)
    _log(f"prior: compiling the train step (batch {b})")
    compiled, state, flops, compile_s, n_params, params = mfu._step_and_state(
        lambda k: model.init(k, batch["image_emb"], jnp.zeros((b,), jnp.int32), cond),
        lambda p, bt, rng: P.loss_fn(model, p, bt, rng), batch, cfg, hlo_flops=True)
    _log(f"prior: compiled in {compile_s:.0f} s; timing")
    sec = mfu.time_step(compiled, state, batch)
    tokens = L + 4               # text tokens, text embedding, timestep, noised x, final query
    analytic = b * (6.0 * n_params * tokens + 12.0 * mcfg.depth * tokens ** 2 * mcfg.width)
    return dict(name=f"diffusion prior (`experiments/paper/prior.py`, width {mcfg.width} × "
                     f"{mcfg.depth})", batch=b, params=n_params, flops=flops,
                analytic=analytic, sec=sec, compile_s=compile_s, dtype=mcfg.dtype)


def _decoder_cfg(quick: bool):
    from unclip_jax.core import config as config_lib

    cfg = config_lib.load_config(ROOT / "experiments/paper/decoder.py")
    mcfg = dataclasses.replace(cfg.model, **DECODER_OVERRIDES)
    if quick:
        mcfg = dataclasses.replace(mcfg, base_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                                   attention_resolutions=(16,), clip_dim=64, context_dim=64,
                                   text_layers=1, text_width=64, text_heads=2, vocab_size=512,
                                   context_length=16, image_size=32)
    return dataclasses.replace(cfg, model=mcfg), mcfg


def _decoder_name(mcfg) -> str:
    return (f"unCLIP decoder (`experiments/paper/decoder.py`, {mcfg.image_size} px, "
            f"{mcfg.base_channels} ch × {mcfg.channel_mult}, {mcfg.num_res_blocks} block/level, "
            f"caption encoder {mcfg.text_layers} × {mcfg.text_width})")


def decoder_case(quick: bool) -> dict:
    import jax.numpy as jnp

    from unclip_jax.models import decoder as D

    mfu = _mfu_module()
    cfg, mcfg = _decoder_cfg(quick)
    b, s = (4 if quick else DECODER_BATCH), mcfg.image_size
    r = np.random.default_rng(0)
    emb = r.normal(size=(b, mcfg.clip_dim))
    batch = {"image": jnp.asarray(r.uniform(-1, 1, (b, s, s, 3)), jnp.float32),
             "image_emb": jnp.asarray(emb / np.linalg.norm(emb, axis=1, keepdims=True),
                                      jnp.float32),
             "tokens": jnp.asarray(r.integers(1, mcfg.vocab_size, (b, mcfg.context_length)),
                                   jnp.int32)}
    _log(f"decoder: compiling the train step (batch {b})")
    compiled, state, flops, compile_s, n_params, _ = mfu._step_and_state(
        lambda k: D.init_decoder(mcfg, k, 1),
        lambda p, bt, rng: D.decoder_loss(p, mcfg, bt["image"], bt["image_emb"],
                                          bt["tokens"], rng),
        batch, cfg, hlo_flops=True)
    _log(f"decoder: compiled in {compile_s:.0f} s; timing")
    sec = mfu.time_step(compiled, state, batch)
    return dict(name=_decoder_name(mcfg), batch=b, params=n_params, flops=flops,
                analytic=None, sec=sec, compile_s=compile_s, dtype=mcfg.dtype)


def sampler_case(quick: bool) -> dict:
    """Guided DDIM sampling with the benchmarked decoder: images/s."""
    import jax
    import jax.numpy as jnp

    from unclip_jax.models import decoder as D
    from unclip_jax.models import sampling as S

    _, mcfg = _decoder_cfg(quick)
    b, steps = (2, 4) if quick else (SAMPLE_BATCH, SAMPLE_STEPS)
    import flax.linen as nn
    params = jax.jit(lambda k: nn.meta.unbox(D.init_decoder(mcfg, k, 1))["params"])(
        jax.random.key(0))
    r = np.random.default_rng(1)
    emb = r.normal(size=(b, mcfg.clip_dim))
    emb = jnp.asarray(emb / np.linalg.norm(emb, axis=1, keepdims=True), jnp.float32)
    tokens = jnp.asarray(r.integers(1, mcfg.vocab_size, (b, mcfg.context_length)), jnp.int32)

    def run(scale):
        return S.sample_images(params, mcfg, emb, tokens, jax.random.key(2),
                               guidance_scale=scale, steps=steps, method="ddim")

    _log(f"sampler: compiling + first run ({b} images, {steps} steps)")
    t0 = time.perf_counter()
    jax.block_until_ready(run(3.0))
    first = time.perf_counter() - t0
    times = []
    for i in range(3):
        t0 = time.perf_counter()
        out = jax.block_until_ready(run(3.0 + i))      # traced scale: no recompilation
        times.append(time.perf_counter() - t0)
    sec = statistics.median(times)
    finite = bool(jnp.all(jnp.isfinite(out)))
    return dict(batch=b, steps=steps, sec=sec, first=first, finite=finite,
                size=mcfg.image_size, name=_decoder_name(mcfg))


def format_section(env: dict, rows: list[dict], samp: dict | None, notes: list[str],
                   quick: bool = False) -> str:
    """The markdown section from what was measured (``env``: device ``kind``, ``nominal`` and
    ``measured`` peak FLOP/s, matmul size ``n``, ``jax`` version); missing parts are left out."""
    nominal, measured = env["nominal"], env["measured"]
    peak = nominal or measured
    peak_txt = (f"the nominal dense bf16 peak of the {env['kind']}, **{nominal / 1e12:.0f} "
                f"TFLOP/s**" if nominal else "the measured matmul peak (no nominal one known)")
    lines = [
        "## Training-step MFU in bfloat16 and guided decoder sampling (GPU)",
        "",
        f"Device: **{env['kind']}** (1 device, JAX {env['jax']}). MFU = model FLOPs per step ÷ "
        f"s/step ÷ {peak_txt}. The best jitted {env['n']}×{env['n']} bf16 matmul measured in "
        f"the same process: {measured / 1e12:.0f} TFLOP/s ({measured / peak:.0%} of that peak). "
        f"Steps: the configs' own bfloat16 compute with float32 params, AdamW state and EMA "
        f"(`train.loop.train_step`: forward, backward, finite checks, AdamW, EMA), synthetic "
        f"batches, median of {STEPS} steps after {WARMUP} warm-ups. Model FLOPs: XLA's cost "
        f"analysis of the lowered update (before the GPU compiler turns dots and convs into "
        f"cuBLAS/cuDNN calls, which carry no FLOP count), and for the prior the analytic "
        f"6·N·tokens + 12·depth·tokens²·width (XLA counts the body of a `scan` over layers "
        f"once). Goal (issue 7): ≥ 40 % for the decoder and the prior.",
        "",
        "| training step | dtype | batch | params | XLA TFLOP/step | analytic TFLOP/step | "
        "s/step | achieved TFLOP/s (best count) | MFU (best count) | compile s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        an, sec = r["analytic"], r["sec"]
        best = max(an or 0.0, r["flops"])
        lines.append(
            f"| {r['name']} | {r['dtype']} | {r['batch']} | {r['params'] / 1e9:.2f} B | "
            f"{r['flops'] / 1e12:.2f} | {f'{an / 1e12:.1f}' if an else '—'} | {sec:.3f} | "
            f"{best / sec / 1e12:.0f} | **{best / sec / peak:.1%}** | {r['compile_s']:.0f} |")
    if samp:
        lines += [
            "",
            f"Guided sampling with the {samp['name']} (random weights: the speed does not "
            f"depend on them): {samp['batch']} images of {samp['size']} px, DDIM "
            f"{samp['steps']} steps, classifier-free guidance as one batched forward of "
            f"{2 * samp['batch']} per step: **{samp['sec']:.2f} s** per batch = "
            f"**{samp['batch'] / samp['sec']:.1f} images/s** "
            f"({samp['sec'] / samp['steps'] * 1e3:.0f} ms per guided step; at the paper's 250 "
            f"steps {samp['batch'] / samp['sec'] * samp['steps'] / 250:.2f} images/s); first "
            f"call incl. compile {samp['first']:.0f} s; the guidance scale changed between "
            f"timed calls without recompiling; outputs finite: {samp['finite']}.",
        ]
    if notes:
        lines += ["", *notes]
    if quick:
        lines += ["", "(quick run: tiny configs, not a measurement)"]
    return "\n".join(lines)


def run(quick: bool = False, out: str | None = None) -> str:
    """Measure the cases in order of compile cost (prior, sampler, decoder step), rewriting
    ``out`` after each one, so a lease that ends mid-way keeps what was measured."""
    import jax

    nominal, kind = nominal_peak(jax.devices()[0])
    _log(f"device {kind}; measuring the bf16 matmul peak")
    measured, n = bf16_matmul_peak((256, 512) if quick else (4096, 8192))
    env = dict(kind=kind, nominal=nominal, measured=measured, n=n, jax=jax.__version__)
    rows, notes, samp = [], [], None
    section = ""
    for case in (prior_case, sampler_case, decoder_case):
        try:
            result = case(quick)
            if case is sampler_case:
                samp = result
            else:
                rows.append(result)
        except Exception as e:                        # one failing case keeps the others
            traceback.print_exc()
            notes.append(f"- {case.__name__} failed: `{type(e).__name__}: {str(e)[:300]}`")
        section = format_section(env, rows, samp, notes, quick)
        _log(f"{case.__name__} done")
        if out:
            Path(out).write_text(section + "\n")
    return section


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny configs (a smoke run)")
    p.add_argument("--out", default=None, help="write the markdown section here too")
    args = p.parse_args(argv)
    print(run(quick=args.quick, out=args.out))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
