"""Forward speed of converted models against their PyTorch references, same weights and inputs.

For each model: a randomly initialised reference (torch, CPU, float32, ``torch.inference_mode``,
``torch.set_num_threads(THREADS)``) is converted with ``unclip_jax.pipelines.convert``; both run
the same
inputs. Ours is one ``jax.jit`` of the forward (float32), timed after its compile. The two are
timed alternately (reference, ours, reference, …) so that load from other processes hits both
alike; the table gives the medians and ratio = reference ÷ ours (goal ≥ 1.0), plus the max
relative difference of the outputs (the conversion is exact up to float32 rounding).

Needs torch and the reference packages, so it runs with the parity python
(``.venv-parity/bin/python``; ``benchmarks/run_all.py`` switches to it, see ``PYTHON``). Run
alone: ``.venv-parity/bin/python benchmarks/bench_convert.py [--quick] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PYTHON = ROOT / ".venv-parity" / "bin" / "python"   # run_all.py runs this script with it
THREADS = 2
REPEATS = {"small": 7, "large": 3}
GPU_REPEATS = {"small": 20, "large": 10}   # GPU calls take milliseconds
DEVICE = "cpu"          # "cuda": both sides on the GPU (``--device cuda``), strict float32


def _t(torch, a):
    """A numpy array as a torch tensor on ``DEVICE``."""
    return torch.from_numpy(np.ascontiguousarray(a)).to(DEVICE)


def _np(t):
    return t.detach().cpu().numpy()


def _load_test_module(name: str):
    """A test module by file (its reference-layout helpers: no copies of the mappings here)."""
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", ROOT / "tests" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


def _race(ref_fn, ours_fn, repeats: int) -> dict:
    """Median seconds of the reference at ``THREADS`` and at 1 torch thread and of ours
    (alternating, one warm-up each; ours is compiled by its warm-up), plus the last outputs.

    The 1-thread reference is timed too because on a machine whose cores are oversubscribed
    by other jobs, torch's 2-thread parallel regions stall waiting for a descheduled thread
    (measured here: a 1.4 M-parameter conv net took 0.29 s at 2 threads vs 0.017 s at 1), so
    the ratio is taken against the faster of the two reference timings.
    """
    import jax
    import torch

    def threaded(n):
        def fn():
            torch.set_num_threads(n)
            return ref_fn()
        return fn

    fns = {"ref": threaded(THREADS), "ref1": threaded(1),
           "ours": lambda: np.asarray(jax.block_until_ready(ours_fn()))}
    if DEVICE != "cpu":                 # torch's CPU threads do not matter on the GPU
        del fns["ref1"]
    out = {name: fn() for name, fn in fns.items()}          # warm-up (and compile)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            out[name] = fn()
            times[name].append(time.perf_counter() - t0)
    torch.set_num_threads(THREADS)
    res = {name: statistics.median(t) for name, t in times.items()}
    res.setdefault("ref1", res["ref"])
    res["ref_out"], res["ours_out"] = out["ref"], np.asarray(out["ours"])
    return res


def _randomise(torch, module, seed: int, scale: float = 0.02):
    """Every tensor gets a random part (biases included), so all of them matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return module.eval()


def _on_device(module):
    """The module on ``DEVICE``; dall_e's convs run float16 on CUDA unless told not to."""
    for m in module.modules():
        if hasattr(m, "use_float16"):
            m.use_float16 = False
    return module.to(DEVICE)


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------- CLIP


CLIP_SIZES = {
    # name: (vision width, layers, patch, image, text width, layers, vocab, context, embed)
    "ViT-B/32": (768, 12, 32, 224, 512, 12, 49408, 77, 512),
    "small (ViT 256×4/16@64, text 256×4)": (256, 4, 16, 64, 256, 4, 4096, 32, 128),
}


def bench_clip(name: str, batch: int, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp
    import torch
    import transformers

    from unclip_jax.models.clip import CLIP
    from unclip_jax.pipelines.convert import clip as convert_clip
    from unclip_jax.pipelines.convert.clip import OPENAI_MEAN, OPENAI_STD

    vw, vl, patch, image, tw, tl, vocab, ctx, embed = CLIP_SIZES[name]
    common = dict(hidden_act="quick_gelu", layer_norm_eps=1e-5)
    hf_cfg = transformers.CLIPConfig(
        text_config=dict(common, vocab_size=vocab, hidden_size=tw, intermediate_size=4 * tw,
                         num_hidden_layers=tl, num_attention_heads=tw // 64,
                         max_position_embeddings=ctx, eos_token_id=vocab - 1,
                         bos_token_id=vocab - 2, pad_token_id=0),
        vision_config=dict(common, hidden_size=vw, intermediate_size=4 * vw,
                           num_hidden_layers=vl, num_attention_heads=vw // 64,
                           image_size=image, patch_size=patch),
        projection_dim=embed)
    torch.manual_seed(0)
    ref = _randomise(torch, transformers.CLIPModel(hf_cfg), 0)
    helpers = _load_test_module("test_convert_clip")
    sd = helpers._hf_to_openai(ref.state_dict(), vl, tl)
    cfg, params = convert_clip.convert(sd)
    params = jax.tree_util.tree_map(jnp.asarray, params)
    model = CLIP(cfg)

    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (batch, image, image, 3)).astype(np.float32)
    normalised = (((x + 1) / 2 - np.array(OPENAI_MEAN)) / np.array(OPENAI_STD))
    pix = _t(torch, normalised.transpose(0, 3, 1, 2).astype(np.float32))
    tokens = helpers._tokens(cfg, rng, batch=batch)
    ids = _t(torch, tokens.astype(np.int64))
    _on_device(ref)

    def ref_fn():
        with torch.inference_mode():
            out = ref(input_ids=ids, pixel_values=pix)
            return np.concatenate([_np(out.image_embeds), _np(out.text_embeds)])

    @jax.jit
    def forward(p, images, toks):
        v = {"params": p}
        return jnp.concatenate([model.apply(v, images, method=model.encode_image),
                                model.apply(v, toks, method=model.encode_text)])

    xs, ts = jnp.asarray(x), jnp.asarray(tokens)
    r = _race(ref_fn, lambda: forward(params, xs, ts), repeats)
    return dict(r, model=f"CLIP {name}: image + text embeddings", params=_params(ref),
                inputs=f"{batch} images {image} px + {batch} captions of {ctx}",
                diff=_rel(r["ours_out"], r["ref_out"]), repeats=repeats)


# ----------------------------------------------------------------------------- dVAE


def bench_dvae(size: int, repeats: int, n_hid: int = 256, vocab: int = 8192,
               blocks: int = 2, n_init: int = 128, label: str = "paper-shaped") -> list[dict]:
    import dall_e
    import jax
    import jax.numpy as jnp
    import torch

    from unclip_jax.models import dvae
    from unclip_jax.pipelines.convert import dvae as convert_dvae

    enc = _randomise(torch, dall_e.Encoder(n_hid=n_hid, n_blk_per_group=blocks,
                                           vocab_size=vocab), 0)
    dec = _randomise(torch, dall_e.Decoder(n_init=n_init, n_hid=n_hid, n_blk_per_group=blocks,
                                           vocab_size=vocab), 1)
    to_np = lambda sd: {k: v.detach().numpy() for k, v in sd.items()}  # noqa: E731
    cfg, params = convert_dvae.convert(to_np(enc.state_dict()), to_np(dec.state_dict()),
                                       image_size=size)
    params = jax.tree_util.tree_map(jnp.asarray, params)
    model = dvae.DVAE(cfg)
    rng = np.random.default_rng(0)
    x01 = rng.uniform(0, 1, (1, size, size, 3)).astype(np.float32)
    x_ref = dall_e.map_pixels(_t(torch, x01.transpose(0, 3, 1, 2)))
    grid = size // cfg.downsample
    codes = rng.integers(0, vocab, (1, grid, grid))
    z = np.eye(vocab, dtype=np.float32)[codes]
    z_ref = _t(torch, z.transpose(0, 3, 1, 2))
    _on_device(enc), _on_device(dec)

    def run_ref(module, inp):
        def fn():
            with torch.inference_mode():
                return _np(module(inp)).transpose(0, 2, 3, 1)
        return fn

    encode = dvae.jit(lambda p, im: model.apply({"params": p}, im,
                                                method=dvae.DVAE.encode_logits))
    decode = dvae.jit(lambda p, codes: model.apply({"params": p}, codes,
                                                   method=dvae.DVAE.decode_stats))
    images, zs = jnp.asarray(2 * x01 - 1), jnp.asarray(z)
    rows = []
    for part, module, ref_fn, ours_fn, inputs in (
            ("encoder → logits", enc, run_ref(enc, x_ref), lambda: encode(params, images),
             f"1 image {size} px"),
            ("decoder → 6-channel stats", dec, run_ref(dec, z_ref), lambda: decode(params, zs),
             f"1 one-hot {grid}×{grid}×{vocab} grid")):
        r = _race(ref_fn, ours_fn, repeats)
        rows.append(dict(r, model=f"dVAE {label} {part}", params=_params(module),
                         inputs=inputs, diff=_rel(r["ours_out"], r["ref_out"]),
                         repeats=repeats))
    return rows


# ----------------------------------------------------------------------------- Karlo


def bench_karlo(repeats: int) -> list[dict] | str:
    """Karlo-shaped diffusers models (a scaled-down width/depth; the real prior alone is
    ~1B parameters) converted by ``unclip_jax.pipelines.convert.karlo``."""
    try:
        from unclip_jax.pipelines.convert import karlo
    except ImportError as e:
        return f"skipped: unclip_jax.pipelines.convert.karlo is not importable ({e})"
    import jax
    import jax.numpy as jnp
    import torch
    import torch.nn.functional as F
    from diffusers import PriorTransformer, UNet2DConditionModel, UNet2DModel
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel

    from unclip_jax.models.decoder import Decoder, Upsampler
    from unclip_jax.models.prior import DiffusionPrior

    state = lambda m: {k: v.detach().numpy() for k, v in m.state_dict().items()}  # noqa
    T = lambda a: _t(torch, a)  # noqa: E731
    rng = np.random.default_rng(0)
    rows = []
    b, emb_dim, ctx = 4, 256, 77

    # prior: Karlo's layout (77 token states, 4 extra tokens), width 512 × 6 layers
    prior = _randomise(torch, PriorTransformer(
        num_attention_heads=8, attention_head_dim=64, num_layers=6, embedding_dim=emb_dim,
        num_embeddings=ctx, additional_embeddings=4), 0)
    pcfg, pparams = karlo.convert_prior(dict(prior.config), state(prior))
    pparams = jax.tree_util.tree_map(jnp.asarray, pparams)
    _on_device(prior)
    x_t = rng.normal(size=(b, emb_dim)).astype(np.float32)
    t = np.array([0, 250, 500, 999][:b])
    emb = rng.normal(size=(b, emb_dim)).astype(np.float32)
    states = rng.normal(size=(b, ctx, emb_dim)).astype(np.float32)
    mask = np.arange(ctx)[None] < rng.integers(5, ctx, b)[:, None]
    pmodel = DiffusionPrior(pcfg)
    prior_fwd = jax.jit(lambda p, x, tt, c: pmodel.apply({"params": p}, x, tt, c))
    pcond = {"text_emb": jnp.asarray(emb), "text_states": jnp.asarray(states),
             "text_mask": jnp.asarray(mask)}

    def prior_ref():
        with torch.inference_mode():
            out = prior(T(x_t), T(t), proj_embedding=T(emb), encoder_hidden_states=T(states),
                        attention_mask=T(mask))
            return _np(out.predicted_image_embedding)

    r = _race(prior_ref, lambda: prior_fwd(pparams, jnp.asarray(x_t), jnp.asarray(t), pcond),
              repeats)
    rows.append(dict(r, model="Karlo prior (width 512 × 6 layers, 77 tokens)",
                     params=_params(prior), inputs=f"batch {b}",
                     diff=_rel(r["ours_out"], r["ref_out"]), repeats=repeats))

    # decoder 64 px with text_proj: Karlo's block types, widths 64/128/192
    unet = _randomise(torch, UNet2DConditionModel(
        sample_size=64, layers_per_block=1,
        down_block_types=["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D",
                          "SimpleCrossAttnDownBlock2D"],
        up_block_types=["SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D",
                        "ResnetUpsampleBlock2D"],
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", block_out_channels=[64, 128, 192],
        in_channels=3, out_channels=6, cross_attention_dim=256, class_embed_type="identity",
        attention_head_dim=64, resnet_time_scale_shift="scale_shift", norm_num_groups=32), 1)
    tp = _randomise(torch, UnCLIPTextProjModel(
        clip_extra_context_tokens=4, clip_embeddings_dim=emb_dim, time_embed_dim=256,
        cross_attention_dim=256), 2)
    dcfg, dparams = karlo.convert_decoder(dict(unet.config), state(unet), dict(tp.config),
                                          state(tp), context_length=ctx)
    dparams = jax.tree_util.tree_map(jnp.asarray, dparams)
    _on_device(unet), _on_device(tp)
    x64 = rng.normal(size=(b, 3, 64, 64)).astype(np.float32)
    img = rng.normal(size=(b, emb_dim)).astype(np.float32)

    def decoder_ref():
        with torch.inference_mode():
            hidden, additive = tp(image_embeddings=T(img), prompt_embeds=T(emb),
                                  text_encoder_hidden_states=T(states),
                                  do_classifier_free_guidance=False)
            return _np(unet(T(x64), T(t), encoder_hidden_states=hidden, class_labels=additive,
                            attention_mask=F.pad(T(mask), (4, 0), value=True)).sample)

    dmodel = Decoder(dcfg)
    dec_fwd = jax.jit(lambda p, x, tt, c: dmodel.apply({"params": p}, x, tt, c))
    dcond = {"image_emb": jnp.asarray(img), "clip_text": {
        "emb": jnp.asarray(emb), "states": jnp.asarray(states), "valid": jnp.asarray(mask)}}
    x64_ours = jnp.asarray(x64.transpose(0, 2, 3, 1))
    r = _race(decoder_ref, lambda: dec_fwd(dparams, x64_ours, jnp.asarray(t), dcond), repeats)
    rows.append(dict(r, model="Karlo decoder 64 px + text_proj (widths 64/128/192)",
                     params=_params(unet) + _params(tp), inputs=f"batch {b}",
                     diff=_rel(r["ours_out"].transpose(0, 3, 1, 2), r["ref_out"]),
                     repeats=repeats))

    # super-resolution 64 → 256 px U-Net (Karlo's resnet-only blocks), widths 32/64/96/128
    sr = _randomise(torch, UNet2DModel(
        sample_size=256, in_channels=6, out_channels=3, layers_per_block=1,
        block_out_channels=[32, 64, 96, 128],
        down_block_types=["ResnetDownsampleBlock2D"] * 4,
        up_block_types=["ResnetUpsampleBlock2D"] * 4, add_attention=False,
        norm_num_groups=32), 3)
    scfg, sparams = karlo.convert_upsampler(dict(sr.config), state(sr))
    sparams = jax.tree_util.tree_map(jnp.asarray, sparams)
    _on_device(sr)
    bs = 1
    x256 = rng.normal(size=(bs, 256, 256, 3)).astype(np.float32)
    low = rng.uniform(-1, 1, size=(bs, 64, 64, 3)).astype(np.float32)
    ts = t[:bs]
    # The reference takes the enlarged image; ours enlarges inside with the converted config's
    # method (Karlo: antialiased bicubic), so feed the reference the same enlargement.
    up = np.asarray(jax.image.resize(jnp.asarray(low), (bs, 256, 256, 3),
                                     method=scfg.low_res_resize))
    inp = T(np.concatenate([x256, up], -1).transpose(0, 3, 1, 2))

    def sr_ref():
        with torch.inference_mode():
            return _np(sr(inp, T(ts)).sample)

    smodel = Upsampler(scfg)
    sr_fwd = jax.jit(lambda p, x, tt, lo: smodel.apply({"params": p}, x, tt, {"low_res": lo}))
    r = _race(sr_ref, lambda: sr_fwd(sparams, jnp.asarray(x256), jnp.asarray(ts),
                                     jnp.asarray(low)), repeats)
    rows.append(dict(r, model="Karlo super-res 64→256 px (widths 32/64/96/128)",
                     params=_params(sr), inputs=f"batch {bs}",
                     diff=_rel(r["ours_out"].transpose(0, 3, 1, 2), r["ref_out"]),
                     repeats=repeats))
    return rows


# ----------------------------------------------------------------------------- report


def run(quick: bool = False, device: str = "cpu") -> str:
    import jax
    import torch

    global DEVICE
    DEVICE = device
    if device != "cpu":
        # strict float32 on both sides (no TF32 in cuBLAS/cuDNN nor in XLA's dots and convs)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        jax.config.update("jax_default_matmul_precision", "highest")
        return _run_gpu(quick)
    torch.set_num_threads(THREADS)
    load_start = os.getloadavg()[0]
    rows, notes = _rows(quick)
    lines = [
        "## Converted models: forward time vs the PyTorch reference",
        "",
        f"Same random weights (converted by `unclip_jax.pipelines.convert`), same inputs, "
        f"float32, CPU. "
        f"Reference: torch {torch.__version__} with `torch.inference_mode()` and "
        f"{THREADS} threads (`torch.set_num_threads`); ours: one `jax.jit` of the forward "
        f"(jax {jax.__version__}, XLA CPU), timed after compile. Runs alternate between the "
        f"two; medians of the repeats shown. Ratio = reference ÷ ours (goal ≥ 1.0), against the "
        "faster of the reference's 2-thread and 1-thread timings: on these oversubscribed "
        "cores torch's 2-thread parallel regions stall on descheduled threads. References: "
        "transformers' `CLIPModel` (the CLIP parity reference), `dall_e`'s Encoder/Decoder, "
        "diffusers' `PriorTransformer`, `UNet2DConditionModel` + `UnCLIPTextProjModel`, "
        "`UNet2DModel`. The machine's cores are shared with other jobs, so absolute times are "
        "noisy; both sides of a row ran interleaved under the same load (1-minute load "
        f"average {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end, on "
        f"{os.cpu_count()} cores). The heavier the load, the more the 2-thread reference "
        "stalls and the more the 1-thread one sets the ratio.",
        "",
        "| model | params | inputs | reference, 2 threads (s) | reference, 1 thread (s) | "
        "ours (s) | ratio: faster reference ÷ ours | max rel diff | repeats |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        best = min(r["ref"], r["ref1"])
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.1f} M | {r['inputs']} | "
                     f"{r['ref']:.4f} | {r['ref1']:.4f} | {r['ours']:.4f} | "
                     f"**{best / r['ours']:.2f}** | {r['diff']:.1e} | {r['repeats']} |")
    lines += [""] + notes if notes else []
    if quick:
        lines.append("(quick run: small models only)")
    return "\n".join(lines) + "\n"


def _rows(quick: bool, repeats: dict = REPEATS) -> tuple[list[dict], list[str]]:
    """Every benchmarked model's row (each logged to stderr as it is measured) and notes."""
    small, large = (2, 2) if quick else (repeats["small"], repeats["large"])
    rows, notes = [], []

    def add(new):
        for r in new:
            print(f"[bench_convert] {r['model']}: reference {r['ref']:.4f} s, ours "
                  f"{r['ours']:.4f} s", file=sys.stderr, flush=True)
        rows.extend(new)

    add([bench_clip("small (ViT 256×4/16@64, text 256×4)", 8, small)])
    if not quick:
        add([bench_clip("ViT-B/32", 4, large)])
        add(bench_dvae(256, large))
    else:
        add(bench_dvae(32, small, n_hid=64, vocab=512, blocks=1, n_init=32, label="small"))
    karlo_rows = bench_karlo(large)
    if isinstance(karlo_rows, str):
        notes.append(f"Karlo: {karlo_rows}")
    else:
        add(karlo_rows)
    return rows, notes


def _run_gpu(quick: bool) -> str:
    """The same rows with both sides on the GPU (one device), strict float32."""
    import jax
    import torch

    rows, notes = _rows(quick, GPU_REPEATS)
    lines = [
        "## Converted models on a GPU: forward time vs the PyTorch reference",
        "",
        f"The rows of the CPU table above, both sides on one **{torch.cuda.get_device_name()}**"
        f": torch {torch.__version__} (CUDA, eager, `torch.inference_mode()`) vs one "
        f"`jax.jit` of ours (jax {jax.__version__}), same random weights and inputs, strict "
        "float32 on both sides (TF32 off in cuBLAS/cuDNN, `jax_default_matmul_precision="
        "highest`). Each timed call includes the copy of the output to the host on both "
        "sides; calls alternate, one warm-up (ours: the compile) each, medians shown.",
        "",
        "| model | params | inputs | reference (ms) | ours (ms) | ratio: reference ÷ ours | "
        "max rel diff | repeats |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.1f} M | {r['inputs']} | "
                     f"{r['ref'] * 1e3:.2f} | {r['ours'] * 1e3:.2f} | "
                     f"**{r['ref'] / r['ours']:.2f}** | {r['diff']:.1e} | {r['repeats']} |")
    lines += [""] + notes if notes else []
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small models only (a smoke run)")
    p.add_argument("--out", default=None, help="write the markdown section here too")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                   help="cuda: both sides on the GPU (a separate section)")
    args = p.parse_args(argv)
    section = run(quick=args.quick, device=args.device)
    print(section)
    if args.out:
        Path(args.out).write_text(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
