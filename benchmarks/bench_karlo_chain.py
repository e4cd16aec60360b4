"""The converted Karlo chain against diffusers' unCLIP pipelines, end to end, on this CPU.

A Karlo-shaped stack at reduced widths (the real one is ~3.5 B parameters: it neither fits this
machine's time nor needs to, the layers are the same) with random weights: a CLIP (text 256 × 2
layers, ViT 128 × 2 layers / 16 px patches at 64 px), the prior (width 256 × 4 layers, 77
tokens, 256-d embeddings), the 64 px decoder + text_proj (widths 32/64/96) and the 64 → 256 px
super-resolution pair (widths 16/32/48/64). The diffusers modules are saved as a Karlo pipeline
folder and converted by ``unclip_jax.pipelines.convert.karlo`` (the CLIP through the OpenAI layout,
as
``unclip-jax convert clip`` reads it), so both sides hold the same weights.

Rows: text → image (``UnCLIPPipeline`` vs ``pipelines.unclip.make_text_to_image``) and image
variations (``UnCLIPImageVariationPipeline`` vs ``pipelines.manipulate.Manipulator``: CLIP
image tower, then the decoder's own sampler from fresh noise), each with Karlo's defaults:
prior 25 steps (guidance 4), decoder 25 (guidance 8), super-resolution 7, DDPM on
``UnCLIPScheduler``'s timesteps. Each call is one whole chain for one caption / image, its
output copied to the host; the two sides alternate (same load on both), one
warm-up each (ours: the compile), medians shown. Ratio = reference ÷ ours (goal ≥ 1.0), against
the faster of the reference at 2 torch threads and at 1 (see bench_convert: torch's 2-thread
regions stall on oversubscribed cores).

Needs torch and diffusers: runs with the parity python (``PYTHON``). Run alone:
``.venv-parity/bin/python benchmarks/bench_karlo_chain.py [--repeats N] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PYTHON = ROOT / ".venv-parity" / "bin" / "python"   # run_all.py runs this script with it
REPEATS = 3
BATCH = 1
STEPS = dict(prior=25, decoder=25, super_res=7)
GUIDANCE = dict(prior=4.0, decoder=8.0)
EMB, CTX = 256, 77


def _module(path: Path, name: str):
    if str(ROOT / "tests") not in sys.path:
        sys.path.insert(0, str(ROOT / "tests"))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build(tmp: Path):
    """``(torch modules, our UnCLIP)`` of one random reduced-width Karlo stack."""
    import torch
    import transformers
    from diffusers import PriorTransformer, UNet2DConditionModel, UNet2DModel
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel

    from unclip_jax.models.clip import CLIPConfig
    from unclip_jax.pipelines import unclip as U
    from unclip_jax.pipelines.convert import clip as convert_clip
    from unclip_jax.pipelines.convert import karlo

    bench = _module(ROOT / "benchmarks" / "bench_convert.py", "_karlo_chain_convert")
    tk = _module(ROOT / "tests" / "test_pipeline_karlo.py", "_karlo_chain_tests")
    tc = _module(ROOT / "tests" / "test_convert_clip.py", "_karlo_chain_clip")
    rnd = bench._randomise
    src = tmp / "karlo"
    mods = {
        "prior": rnd(torch, PriorTransformer(
            num_attention_heads=4, attention_head_dim=64, num_layers=4, embedding_dim=EMB,
            num_embeddings=CTX, additional_embeddings=4), 0),
        "decoder": rnd(torch, UNet2DConditionModel(
            sample_size=64, layers_per_block=1,
            down_block_types=["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D",
                              "SimpleCrossAttnDownBlock2D"],
            up_block_types=["SimpleCrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D",
                            "ResnetUpsampleBlock2D"],
            mid_block_type="UNetMidBlock2DSimpleCrossAttn", block_out_channels=[32, 64, 96],
            in_channels=3, out_channels=6, cross_attention_dim=128,
            class_embed_type="identity", attention_head_dim=32,
            resnet_time_scale_shift="scale_shift", norm_num_groups=16), 1),
        "text_proj": rnd(torch, UnCLIPTextProjModel(
            clip_extra_context_tokens=4, clip_embeddings_dim=EMB, time_embed_dim=128,
            cross_attention_dim=128), 2),
    }
    for i, name in enumerate(("super_res_first", "super_res_last")):
        mods[name] = rnd(torch, UNet2DModel(
            sample_size=256, in_channels=6, out_channels=3, layers_per_block=1,
            block_out_channels=[16, 32, 48, 64],
            down_block_types=["ResnetDownsampleBlock2D"] * 4,
            up_block_types=["ResnetUpsampleBlock2D"] * 4, add_attention=False,
            norm_num_groups=16), 3 + i)
    for name, m in mods.items():
        m.save_pretrained(src / name)
    (src / "prior_scheduler").mkdir()
    (src / "prior_scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"clip_sample": True, "clip_sample_range": 5.0}))
    karlo.convert_checkpoint(src, tmp / "out", context_length=CTX)

    vocab_size = 512 + len(tk.MERGES) + 2
    cfg = CLIPConfig(embed_dim=EMB, image_size=64, patch_size=16, vision_width=128,
                     vision_layers=2, vision_heads=2, vocab_size=vocab_size, context_length=CTX,
                     text_width=EMB, text_layers=2, text_heads=4, eos_id=vocab_size - 1,
                     pad_id=0)
    common = dict(hidden_act="quick_gelu", layer_norm_eps=1e-5)
    hf_cfg = transformers.CLIPConfig(
        text_config=dict(common, vocab_size=vocab_size, hidden_size=EMB,
                         intermediate_size=4 * EMB, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=CTX, eos_token_id=vocab_size - 1,
                         bos_token_id=vocab_size - 2, pad_token_id=0),
        vision_config=dict(common, hidden_size=128, intermediate_size=512,
                           num_hidden_layers=2, num_attention_heads=2, image_size=64,
                           patch_size=16),
        projection_dim=EMB)
    torch.manual_seed(0)
    full = transformers.CLIPModel(hf_cfg).eval()
    text_cfg, vision_cfg = hf_cfg.text_config, hf_cfg.vision_config
    text_cfg.projection_dim = vision_cfg.projection_dim = EMB
    text = transformers.CLIPTextModelWithProjection(text_cfg).eval()
    vision = transformers.CLIPVisionModelWithProjection(vision_cfg).eval()
    sd = full.state_dict()
    text.load_state_dict({k: v for k, v in sd.items()
                          if k.startswith(("text_model.", "text_projection."))}, strict=False)
    vision.load_state_dict({k: v for k, v in sd.items()
                            if k.startswith(("vision_model.", "visual_projection."))},
                           strict=False)
    _, params = convert_clip.convert(tc._hf_to_openai(sd, 2, 2), cfg)
    convert_clip.save_workdir(cfg, params, tmp / "clip")
    vocab = tmp / "vocab.txt.gz"
    vocab.write_bytes(gzip.compress(("#version: 0.2\n" + "\n".join(tk.MERGES) + "\n")
                                    .encode()))
    out = tmp / "out"
    model = U.load_unclip(tmp / "clip", vocab, out / "prior", out / "decoder",
                          [out / "super_res_first", out / "super_res_last"])
    mods.update(text_encoder=text, image_encoder=vision,
                tokenizer=_Tokenizer(torch, model.tokenizer, cfg))
    return mods, model


class _Tokenizer:
    """The ``CLIPTokenizer`` calls the pipelines make, answered with our BPE rows."""

    def __init__(self, torch, tok, cfg):
        self.torch, self.tok, self.cfg, self.model_max_length = torch, tok, cfg, CTX

    def __call__(self, prompt, padding=None, max_length=None, truncation=None,
                 return_tensors=None):
        import jax.numpy as jnp

        from unclip_jax.pipelines import unclip as U

        rows = self.tok.encode([prompt] if isinstance(prompt, str) else list(prompt), CTX)
        mask = np.asarray(U.text_mask(self.cfg, jnp.asarray(rows)))
        return type("Tokens", (), dict(
            input_ids=self.torch.from_numpy(rows.astype(np.int64)),
            attention_mask=self.torch.from_numpy(mask.astype(np.int64))))()


def _pipelines(mods):
    import transformers
    from diffusers import UnCLIPImageVariationPipeline, UnCLIPPipeline, UnCLIPScheduler

    def sched(**kw):
        return UnCLIPScheduler(**kw)

    text = UnCLIPPipeline(
        prior=mods["prior"], decoder=mods["decoder"], text_encoder=mods["text_encoder"],
        tokenizer=mods["tokenizer"], text_proj=mods["text_proj"],
        super_res_first=mods["super_res_first"], super_res_last=mods["super_res_last"],
        prior_scheduler=sched(variance_type="fixed_small_log", prediction_type="sample",
                              clip_sample=True, clip_sample_range=5.0),
        decoder_scheduler=sched(variance_type="learned_range", prediction_type="epsilon"),
        super_res_scheduler=sched(variance_type="fixed_small_log", prediction_type="epsilon"))
    variation = UnCLIPImageVariationPipeline(
        decoder=mods["decoder"], text_encoder=mods["text_encoder"],
        tokenizer=mods["tokenizer"], text_proj=mods["text_proj"],
        feature_extractor=transformers.CLIPImageProcessor(),
        image_encoder=mods["image_encoder"], super_res_first=mods["super_res_first"],
        super_res_last=mods["super_res_last"],
        decoder_scheduler=sched(variance_type="learned_range", prediction_type="epsilon"),
        super_res_scheduler=sched(variance_type="fixed_small_log", prediction_type="epsilon"))
    for p in (text, variation):
        p.set_progress_bar_config(disable=True)
    return text, variation


def measure(repeats: int = REPEATS) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import torch

    from unclip_jax.pipelines import manipulate as M
    from unclip_jax.pipelines import unclip as U
    from unclip_jax.pipelines.convert.clip import OPENAI_MEAN, OPENAI_STD

    bench = _module(ROOT / "benchmarks" / "bench_convert.py", "_karlo_chain_race")
    with tempfile.TemporaryDirectory() as tmp:
        mods, model = build(Path(tmp))
    text_pipe, var_pipe = _pipelines(mods)
    prompts = ["hello the", "the hello hello"][:BATCH]
    generator = torch.Generator().manual_seed(0)

    def text_ref():
        with torch.inference_mode():
            return text_pipe(prompts, prior_num_inference_steps=STEPS["prior"],
                             decoder_num_inference_steps=STEPS["decoder"],
                             super_res_num_inference_steps=STEPS["super_res"],
                             prior_guidance_scale=GUIDANCE["prior"],
                             decoder_guidance_scale=GUIDANCE["decoder"], generator=generator,
                             output_type="np").images

    fn = U.make_text_to_image(model, U.Settings(
        prior_steps=STEPS["prior"], decoder_steps=STEPS["decoder"],
        upsampler_steps=(STEPS["super_res"],), num_candidates=1))
    tokens = jnp.asarray(model.tokenizer.encode(prompts, CTX))
    guidance = (jnp.float32(GUIDANCE["prior"]), jnp.float32(GUIDANCE["decoder"]))
    keys = iter(range(10 ** 6))

    def text_ours():
        return np.asarray(fn(model.params, tokens, jax.random.PRNGKey(next(keys)), guidance))

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (80, 72, 3), dtype=np.uint8) for _ in range(BATCH)]
    m = M.Manipulator(model, decoder_steps=STEPS["decoder"],
                      upsampler_steps=(STEPS["super_res"],), guidance_scale=GUIDANCE["decoder"])
    clip_px = np.stack([M.load_pixels(im, model.clip.image_size) for im in images])
    mean, std = np.asarray(OPENAI_MEAN, np.float32), np.asarray(OPENAI_STD, np.float32)
    pixel_values = torch.from_numpy(np.ascontiguousarray(
        (((clip_px + 1) / 2 - mean) / std).transpose(0, 3, 1, 2)))

    def var_ref():
        with torch.inference_mode():
            return var_pipe(pixel_values, decoder_num_inference_steps=STEPS["decoder"],
                            super_res_num_inference_steps=STEPS["super_res"],
                            decoder_guidance_scale=GUIDANCE["decoder"], generator=generator,
                            output_type="np").images

    def var_ours():   # from the same preprocessed pixels: CLIP image tower, then sampling
        z = m.embed(jnp.asarray(clip_px))
        return np.asarray(m.sample(z, seed=next(keys)))

    rows = []
    for name, ref, ours in (("text → image (`UnCLIPPipeline`)", text_ref, text_ours),
                            ("image variations (`UnCLIPImageVariationPipeline`)", var_ref,
                             var_ours)):
        r = bench._race(ref, ours, repeats)
        print(f"[bench_karlo_chain] {name}: reference {r['ref']:.2f} s (1 thread "
              f"{r['ref1']:.2f} s), ours {r['ours']:.2f} s", file=sys.stderr, flush=True)
        rows.append(dict(r, name=name, repeats=repeats,
                         shape=tuple(np.asarray(r["ours_out"]).shape)))
    rows.append(dict(params={k: sum(p.numel() for p in mods[k].parameters())
                             for k in ("prior", "decoder", "text_proj", "super_res_first",
                                       "text_encoder", "image_encoder")}))
    return rows


def run(repeats: int = REPEATS) -> str:
    import diffusers
    import jax
    import torch

    torch.set_num_threads(2)
    load0 = os.getloadavg()[0]
    rows = measure(repeats)
    params = rows.pop()["params"]
    load1 = os.getloadavg()[0]
    p = lambda k: f"{params[k] / 1e6:.1f} M"  # noqa: E731
    lines = [
        "## Karlo chain end to end vs diffusers' unCLIP pipelines (reduced widths, CPU)",
        "",
        f"A Karlo-shaped stack with random weights at reduced widths, converted from the "
        f"diffusers modules (same weights on both sides): CLIP text 256 × 2 ({p('text_encoder')}"
        f") and ViT 128 × 2 at 64 px ({p('image_encoder')}), prior 256 × 4, 77 tokens, 256-d "
        f"({p('prior')}), decoder 64 px widths 32/64/96 + text_proj ({p('decoder')} + "
        f"{p('text_proj')}), super-resolution 64 → 256 px widths 16/32/48/64 "
        f"({p('super_res_first')}, twice: first and last step). Karlo's sampling: prior "
        f"{STEPS['prior']} steps (guidance {GUIDANCE['prior']}), decoder {STEPS['decoder']} "
        f"(guidance {GUIDANCE['decoder']}), super-resolution {STEPS['super_res']}, DDPM on "
        f"`UnCLIPScheduler`'s timesteps; batch {BATCH}. Reference: diffusers "
        f"{diffusers.__version__}, torch {torch.__version__} CPU, `torch.inference_mode()`; "
        f"ours: one `jax.jit` per chain (jax {jax.__version__}, XLA CPU), timed after its "
        f"compile, output copied to the host. Calls alternate, medians of {repeats}. Ratio = "
        f"the faster of the reference's 2-thread and 1-thread timings ÷ ours (goal ≥ 1.0). "
        f"Measured under load (1-minute load average {load0:.1f} at the start, {load1:.1f} at "
        f"the end, {os.cpu_count()} cores shared with other jobs). No GPU was available to "
        f"this measurement: the full-width device figure is not part of it.",
        "",
        "| chain | reference, 2 threads (s) | reference, 1 thread (s) | ours (s) | "
        "ratio: faster reference ÷ ours | output | repeats |",
        "|---|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        best = min(r["ref"], r["ref1"])
        lines.append(f"| {r['name']} | {r['ref']:.2f} | {r['ref1']:.2f} | {r['ours']:.2f} | "
                     f"**{best / r['ours']:.2f}** | {r['shape'][0]} × {r['shape'][1]}² px | "
                     f"{r['repeats']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=REPEATS)
    p.add_argument("--out", default=None, help="write the markdown section here too")
    args = p.parse_args(argv)
    section = run(args.repeats)
    print(section)
    if args.out:
        Path(args.out).write_text(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
