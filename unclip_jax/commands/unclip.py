"""`unclip-jax sample|variations|interpolate|text-diff`: the unCLIP pipeline from the shell.

Every command loads the chain (CLIP, tokenizer, prior, decoder, upsamplers; defaults: the
`runs/demo/…` layout of `make demo`) and writes a PNG grid:

    unclip-jax sample --prompt "a big red circle" --prompt "a small blue square" --out grid.png
    unclip-jax variations --image photo.jpg --num 8 --out var.png
    unclip-jax interpolate --image a.png --image b.png --frames 8 --out interp.png
    unclip-jax text-diff --image a.png --from "a red circle" --to "a blue circle" --out diff.png

`sample` also writes the judge's scores beside the grid (`.json`) when every prompt is a
captioned-shapes caption. Imported models (`unclip-jax convert clip|karlo`) run the same way;
an OpenAI/open_clip CLIP takes its BPE vocabulary instead of a sentencepiece model, and Karlo's
two super-resolution networks are given in order (the second runs only the last step):

    unclip-jax sample --clip vitl14 --bpe-vocab bpe_simple_vocab_16e6.txt.gz \
        --prior karlo/prior --decoder karlo/decoder \
        --upsampler karlo/super_res_first --upsampler karlo/super_res_last \
        --prompt "a high-resolution photograph of a big red frog" --out frog.png

The manipulations take the same model flags (Karlo's decoder embeds images with the converted
ViT-L/14 image tower of `--clip`):

    unclip-jax variations --clip vitl14 --bpe-vocab bpe_simple_vocab_16e6.txt.gz \
        --prior karlo/prior --decoder karlo/decoder \
        --upsampler karlo/super_res_first --upsampler karlo/super_res_last \
        --image photo.jpg --num 4 --fresh-noise --out var.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


class _Workdirs(argparse.Action):
    """A repeatable list option: its first use replaces the default, later uses extend it
    (``--upsampler A --upsampler B`` → ``[A, B]``; the flag alone → ``[]``)."""

    def __call__(self, parser, namespace, values, option_string=None):
        items = getattr(namespace, self.dest)
        items = [] if items is self.default or items is None else list(items)
        setattr(namespace, self.dest, items + list(values))


def _add_model_args(q, out_help: str = "PNG grid path") -> None:
    q.add_argument("--clip", default="runs/demo/clip", help="CLIP workdir")
    q.add_argument("--tokenizer", default=None,
                   help="sentencepiece model (default: the CLIP run's, e.g. "
                        "runs/demo/tokenizer.model) or a CLIP BPE vocabulary (.txt[.gz])")
    q.add_argument("--bpe-vocab", default=None,
                   help="CLIP BPE vocabulary (bpe_simple_vocab_16e6.txt.gz) of a CLIP "
                        "imported from OpenAI/open_clip")
    q.add_argument("--prior", default="runs/demo/prior", help="diffusion prior workdir")
    q.add_argument("--decoder", default="runs/demo/decoder", help="decoder workdir")
    q.add_argument("--upsampler", nargs="*", action=_Workdirs,
                   default=["runs/demo/upsampler"],
                   help="upsampler workdirs in order, repeatable (Karlo: super_res_first, "
                        "then super_res_last); give the flag alone for none")
    q.add_argument("--decoder-guidance", type=float, default=None,
                   help="decoder guidance scale (config default)")
    q.add_argument("--upsampler-steps", type=int, nargs="*", default=None)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--out", required=True, help=out_help)


def _add_manipulation_args(q) -> None:
    q.add_argument("--steps", type=int, default=50,
                   help="strided DDIM steps of inversion and decoding")
    q.add_argument("--fixed-point-iters", type=int, default=2)
    q.add_argument("--decoder-steps", type=int, default=None,
                   help="steps of the decoder's own sampler for variations from fresh noise "
                        "(config default; Karlo: 25)")


def add_commands(subparsers) -> None:
    q = subparsers.add_parser("sample", help="unCLIP text → image (prior, decoder, upsamplers)")
    _add_model_args(q)
    q.add_argument("--prompt", action="append", required=True, help="a caption (repeatable)")
    q.add_argument("--num", type=int, default=1, help="images per prompt")
    q.add_argument("--prior-guidance", type=float, default=None)
    q.add_argument("--prior-steps", type=int, default=None)
    q.add_argument("--decoder-steps", type=int, default=None)
    q.add_argument("--candidates", type=int, default=None,
                   help="prior draws per caption, best by dot product kept (paper: 2)")
    q.set_defaults(fn=_sample)

    q = subparsers.add_parser("variations", help="variations of an image (fixed z_i, η > 0)")
    _add_model_args(q)
    _add_manipulation_args(q)
    q.add_argument("--image", required=True)
    q.add_argument("--num", type=int, default=8)
    q.add_argument("--eta", type=float, default=1.0)
    q.add_argument("--fresh-noise", action="store_true",
                   help="the decoder's own sampler from fresh noise (Karlo: diffusers' "
                        "UnCLIPImageVariationPipeline) instead of DDIM from the inverted x_T")
    q.set_defaults(fn=_variations)

    q = subparsers.add_parser("interpolate", help="slerp between two images' latents")
    _add_model_args(q)
    _add_manipulation_args(q)
    q.add_argument("--image", action="append", required=True, help="give exactly two")
    q.add_argument("--frames", type=int, default=8)
    q.add_argument("--fix-noise", action="store_true",
                   help="one random x_T for every frame instead of slerped inversions")
    q.set_defaults(fn=_interpolate)

    q = subparsers.add_parser("text-diff", help="move an image along a caption difference")
    _add_model_args(q)
    _add_manipulation_args(q)
    q.add_argument("--image", required=True)
    q.add_argument("--from", dest="caption_from", required=True)
    q.add_argument("--to", dest="caption_to", required=True)
    q.add_argument("--frames", type=int, default=6)
    q.add_argument("--max-angle", type=float, default=0.5,
                   help="largest slerp fraction toward the direction (paper: 0.25–0.5)")
    q.set_defaults(fn=_text_diff)


def _load(args):
    from unclip_jax.pipelines import unclip as U

    if args.tokenizer and args.bpe_vocab:
        raise ValueError(f"give either --tokenizer ({args.tokenizer}) or --bpe-vocab "
                         f"({args.bpe_vocab}), not both")
    if args.bpe_vocab and not str(args.bpe_vocab).endswith(U.BPE_SUFFIXES):
        raise ValueError(f"--bpe-vocab {args.bpe_vocab!r} is not a BPE merges file; accepted: "
                         f"a {' or '.join(U.BPE_SUFFIXES)} file such as "
                         f"bpe_simple_vocab_16e6.txt.gz")
    return U.load_unclip(args.clip, args.bpe_vocab or args.tokenizer, args.prior, args.decoder,
                         args.upsampler)


def _manipulation_options(args) -> dict:
    return dict(steps=args.steps, fixed_point_iters=args.fixed_point_iters,
                guidance_scale=args.decoder_guidance, upsampler_steps=args.upsampler_steps,
                decoder_steps=args.decoder_steps)


def _done(path, images) -> None:
    print(f"wrote {path} ({len(images)} images, {images.shape[1]}×{images.shape[2]})")


def _run_manipulation(fn):
    """Undecodable images become ValueErrors (the CLI prints them as errors)."""
    from unclip_jax.core.images import ImageLoadError

    try:
        return fn()
    except ImageLoadError as e:
        raise ValueError(str(e)) from None


def _sample(args) -> None:
    from unclip_jax.core import shapes
    from unclip_jax.core.images import save_grid
    from unclip_jax.pipelines import unclip as U

    prompts = U.check_prompts(args.prompt)
    if args.num < 1:
        raise ValueError(f"--num must be ≥ 1, got {args.num}")
    model = _load(args)
    settings = dict(prior_steps=args.prior_steps, decoder_steps=args.decoder_steps,
                    num_candidates=args.candidates,
                    upsampler_steps=tuple(args.upsampler_steps) if args.upsampler_steps
                    else None)
    batch = [p for p in prompts for _ in range(args.num)]
    images = U.generate(model, batch, args.seed, prior_guidance=args.prior_guidance,
                        decoder_guidance=args.decoder_guidance, **settings)
    save_grid(images, args.out, columns=args.num if args.num > 1 else min(8, len(batch)))
    _done(args.out, images)
    try:
        for p in batch:
            shapes.parse_caption(p)
    except ValueError:
        return
    scores = [shapes.score_caption(im, p) for im, p in zip(images, batch)]
    report = {"prompts": batch, "exact": [bool(s["exact"]) for s in scores],
              "colour_shape_correct": [list(map(bool, s["colour_shape_correct"]))
                                       for s in scores]}
    import jax

    if jax.process_index() == 0:           # several processes: one writer
        Path(args.out).with_suffix(".json").write_text(json.dumps(report, indent=2))


def _variations(args) -> None:
    from unclip_jax.core.images import save_grid
    from unclip_jax.pipelines import manipulate as M

    model = _load(args)
    images = _run_manipulation(lambda: M.variations(
        model, args.image, args.num, args.eta, args.seed, from_inversion=not args.fresh_noise,
        **_manipulation_options(args)))
    save_grid(images, args.out, columns=min(8, len(images)))
    _done(args.out, images)


def _interpolate(args) -> None:
    from unclip_jax.core.images import save_grid
    from unclip_jax.pipelines import manipulate as M

    if len(args.image) != 2:
        raise ValueError(f"interpolate takes exactly two --image, got {len(args.image)}")
    model = _load(args)
    images = _run_manipulation(lambda: M.interpolate(
        model, args.image[0], args.image[1], args.frames, args.seed, args.fix_noise,
        **_manipulation_options(args)))
    save_grid(images, args.out)
    _done(args.out, images)


def _text_diff(args) -> None:
    from unclip_jax.core.images import save_grid
    from unclip_jax.pipelines import manipulate as M

    model = _load(args)
    images = _run_manipulation(lambda: M.text_diff(
        model, args.image, args.caption_from, args.caption_to, args.frames, args.max_angle,
        **_manipulation_options(args)))
    save_grid(images, args.out)
    _done(args.out, images)
