"""`unclip-jax sample-decoder`: decode CLIP image embeddings of dataset images into images.

Training goes through `unclip-jax train experiments/shapes/decoder.py --workdir …` (and
`…/upsampler.py`). This command takes validation images, embeds them with the decoder's frozen
CLIP, samples the decoder (and optionally an upsampler on top), writes a PNG grid (row pairs:
references, samples) and, on captioned shapes, the judge's scores of the samples against the
captions.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from unclip_jax.core.images import save_grid, to_uint8  # noqa: F401  (also re-exported: old home)


def add_commands(subparsers) -> None:
    q = subparsers.add_parser("sample-decoder",
                              help="sample the unCLIP decoder from CLIP embeddings of images")
    q.add_argument("--workdir", required=True, help="the decoder's training workdir")
    q.add_argument("--upsampler", default="", help="an upsampler workdir to apply on top")
    q.add_argument("--num", type=int, default=16)
    q.add_argument("--steps", type=int, default=None, help="sampling steps (config default)")
    q.add_argument("--upsampler-steps", type=int, default=None)
    q.add_argument("--method", default="ddim", choices=("ddim", "ddpm", "dpmpp_2m"))
    q.add_argument("--eta", type=float, default=0.0)
    q.add_argument("--guidance", type=float, default=None, help="guidance scale (config)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--raw-params", action="store_true",
                   help="use the raw params, not the EMA (short runs: the EMA still lags)")
    q.add_argument("--out", required=True, help="PNG grid path (a JSON of scores beside it)")
    q.set_defaults(fn=_sample_decoder)


def _sample_decoder(args) -> None:
    import jax
    import jax.numpy as jnp

    from unclip_jax.core import shapes
    from unclip_jax.core.text import Tokenizer
    from unclip_jax.data import input_pipeline
    from unclip_jax.models import decoder as D
    from unclip_jax.models import sampling as S
    from unclip_jax.train import runs

    run = runs.load_run(args.workdir, D.DecoderConfig, ema=False if args.raw_params else None)
    params, cfg = jax.tree.map(jnp.asarray, run.params), run.model
    data_cfg = run.config.data
    tok = Tokenizer.load(data_cfg.tokenizer) if data_cfg.tokenizer else None
    batch = input_pipeline.make_batches(data_cfg, "validation", batch_size=args.num,
                                        tokenizer=tok, train=False).local_numpy(
                                            0, captions=True)
    clip = runs.load_clip(cfg.clip_workdir)
    emb = jax.jit(type(clip).embed_images)(clip, jnp.asarray(batch["image"]))
    rng = jax.random.PRNGKey(args.seed)
    text = {}
    if cfg.clip_text_width > 0:      # reads the frozen CLIP's text features; uncond: ""
        text = {"clip_text": D.decoder_text_features(clip.encode_text(batch["tokens"])),
                "uncond_clip_text": D.batched(D.empty_caption_features(
                    clip, tok, cfg.context_length), len(emb))}
    out = S.sample_images(params, cfg, emb, batch.get("tokens") if cfg.use_text else None,
                          rng, guidance_scale=args.guidance, steps=args.steps,
                          method=args.method, eta=args.eta, **text)
    rows_ref, rows_out = [to_uint8(batch["image"])], [to_uint8(out)]
    if args.upsampler:
        up_params, up_cfg = runs.load_upsampler(args.upsampler,
                                                ema=False if args.raw_params else None)
        out = S.upsample_images(up_params, up_cfg, out, jax.random.fold_in(rng, 1),
                                steps=args.upsampler_steps)
        ref = D.resize_to(jnp.asarray(batch["image"]), out.shape[1], "nearest")
        rows_ref, rows_out = [to_uint8(ref)], [to_uint8(out)]
    images = rows_out[0]
    per_row = 8
    rows = []
    for k in range(0, len(images), per_row):
        rows += [rows_ref[0][k:k + per_row], images[k:k + per_row]]
    save_grid(rows, args.out)
    report = {"num": len(images), "resolution": int(images.shape[1])}
    if data_cfg.name.startswith("captioned_shapes"):
        scores = [shapes.score_caption(im, c) for im, c in zip(images, batch["caption"])]
        for key in ("num_objects_correct", "all_objects_correct", "exact"):
            report[key] = float(np.mean([s[key] for s in scores]))
        report["colour_shape_correct"] = float(np.mean(
            [np.mean(s["colour_shape_correct"]) for s in scores]))
    if jax.process_index() == 0:
        Path(args.out).with_suffix(".json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report))
