"""``unclip-jax convert clip|dvae|karlo SOURCE --out DIR``: import published PyTorch weights.

Each kind names a ``convert_checkpoint(source, out_dir, **options) -> Path`` function, imported
only when that kind runs (:data:`CONVERTERS`), so a converter under construction or with extra
needs never breaks the others. The output is what a training run leaves (``config.json`` +
``checkpoints/<step>``), read by the same loaders:

    unclip-jax convert clip open_clip_model.safetensors --out runs/clip-b32 [--act gelu]
    unclip-jax convert dvae dvae_weights/ --out runs/dvae     # encoder.pt + decoder.pt inside
    unclip-jax convert dvae encoder.pt --decoder decoder.pt --out runs/dvae
    unclip-jax convert karlo karlo-v1-alpha/ --out runs/karlo --option context_length=77

``--option KEY=VALUE`` (repeatable) passes any further keyword to the converter; VALUE is read
as JSON when it parses (numbers, true/false/null, lists), as a comma-separated list when it has
commas, else as a string.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from pathlib import Path

CONVERTERS = {
    "clip": "unclip_jax.pipelines.convert.clip:convert_checkpoint",
    "dvae": "unclip_jax.pipelines.convert.dvae:convert_checkpoint",
    "karlo": "unclip_jax.pipelines.convert.karlo:convert_checkpoint",
}


def resolve(kind: str) -> Callable[..., Path]:
    """The ``convert_checkpoint`` function of a model kind (imported now)."""
    if kind not in CONVERTERS:
        raise ValueError(f"unknown model kind {kind!r}; accepted: {', '.join(CONVERTERS)}")
    module_name, _, attr = CONVERTERS[kind].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:
            raise
        raise ValueError(f"the {kind} converter ({module_name}) is not available in this "
                         "installation") from None
    return getattr(module, attr)


def parse_option(text: str) -> tuple[str, object]:
    """``"KEY=VALUE"`` → ``(key, value)`` with VALUE as JSON, a comma list, or a string."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key.isidentifier():
        raise ValueError(f"--option {text!r} must be KEY=VALUE with KEY a Python name")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        pass
    if "," in value:
        return key, [v.strip() for v in value.split(",") if v.strip()]
    return key, value


def convert(kind: str, source: str | Path, out_dir: str | Path, **options) -> Path:
    """Run one converter: checks the source exists, then ``convert_checkpoint``."""
    fn = resolve(kind)
    if not Path(source).exists():
        raise FileNotFoundError(f"{kind} source {str(source)!r} does not exist")
    try:
        return fn(source, out_dir, **options)
    except FileExistsError as e:       # the CLI reports ValueErrors as clean messages
        raise ValueError(str(e)) from e
    except TypeError as e:             # an option the converter does not take
        raise ValueError(f"{kind} converter: {e}") from e


def _run(args) -> None:
    options = dict(parse_option(o) for o in args.option)
    if getattr(args, "act", None):
        options["act"] = args.act
    if getattr(args, "no_fold_normalization", False):
        options["image_mean"] = None
    if getattr(args, "decoder", None):
        options["decoder"] = args.decoder
    if getattr(args, "image_size", None) is not None:
        options["image_size"] = args.image_size
    out = convert(args.kind, args.source, args.out, **options)
    print(f"wrote {out} ({args.kind} from {args.source})")


def add_commands(subparsers) -> None:
    q = subparsers.add_parser("convert", help="import published PyTorch weights "
                                              f"({', '.join(CONVERTERS)})")
    ksub = q.add_subparsers(dest="kind", required=True, metavar="KIND")
    helps = {"clip": "OpenAI / open_clip ViT CLIP (.safetensors, .npz, or torch state dict)",
             "dvae": "OpenAI's DALL·E dVAE (dall_e Encoder + Decoder state dicts)",
             "karlo": "Karlo unCLIP, a diffusers pipeline folder"}
    for kind in CONVERTERS:
        k = ksub.add_parser(kind, help=helps[kind])
        k.add_argument("source", help="checkpoint file or folder")
        k.add_argument("--out", required=True, help="output workdir (must hold no checkpoints)")
        k.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                       help="extra keyword for the converter (repeatable)")
        if kind == "clip":
            k.add_argument("--act", choices=("quick_gelu", "gelu"), default=None,
                           help="MLP activation (OpenAI models: quick_gelu, the default; "
                                "open_clip LAION models: gelu)")
            k.add_argument("--no-fold-normalization", action="store_true",
                           help="keep the reference's (x - mean) / std inputs instead of "
                                "folding them into the patch conv")
        if kind == "dvae":
            k.add_argument("--decoder", default=None,
                           help="decoder state dict (then SOURCE is the encoder's)")
            k.add_argument("--image-size", type=int, default=None,
                           help="image side the workdir records (default 256, the release's)")
        k.set_defaults(fn=_run)
