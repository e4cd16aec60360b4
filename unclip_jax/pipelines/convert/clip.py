"""Convert OpenAI / open_clip CLIP (ViT) weights into this package's ``CLIP`` params.

Input: a state dict with OpenAI's key names (``visual.conv1.weight``, ``visual.transformer.
resblocks.N.attn.in_proj_weight``, ``token_embedding.weight``, ``text_projection``, ...), as in
open_clip's ``open_clip_pytorch_model.bin`` / ``open_clip_model.safetensors`` files. Read with
:func:`load_state_dict` (safetensors, or ``torch.load(..., weights_only=True)``; never pickle).
OpenAI's own ``ViT-*.pt`` downloads are TorchScript archives, which ``weights_only`` refuses;
use the open_clip copies of the same weights (identical tensors, plain state dicts).

Two differences between the reference model and ours are absorbed here, exactly:

* **Image normalisation.** The reference takes ``(x01 - mean) / std`` images; ours takes
  ``x = 2 * x01 - 1`` in [-1, 1]. The map ``x -> (x + 1) / 2 / std - mean / std`` is affine per
  channel, so it folds into the (linear, VALID-padded) patch convolution: the kernel is scaled
  per input channel and the constant term — a per-width bias that our bias-free patch conv
  cannot hold — is added to the patch rows (not the class row) of the positional embedding,
  which is added right after the conv. Pass ``image_mean=None`` to skip folding (then feed our
  model the reference's normalised images).
* **Text pooling.** OpenAI reads the feature at ``argmax(tokens)`` (the end-of-text id 49407 is
  the largest id); ours reads it at the first ``eos_id``. With ``eos_id = vocab_size - 1`` the
  two agree on every tokenizer output (exactly one end-of-text, the largest id).

The activation cannot be read from the weights: OpenAI's models use quick-GELU (default);
open_clip's LAION-trained models (names without ``-quickgelu``, e.g. ViT-H-14) use ``gelu``.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from unclip_jax.pipelines.convert import save_workdir  # noqa: F401  (re-exported: a CLIP workdir)
from unclip_jax.models.clip import CLIPConfig
# The one weights reader lives in unclip_jax.pipelines.convert.weights; re-exported from here.
from unclip_jax.pipelines.convert.weights import (ConversionError, load_state_dict,  # noqa: F401
                                normalize_state_dict)

# OpenAI CLIP's preprocessing constants (also open_clip's OPENAI_DATASET_MEAN/STD).
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

# Non-parameter entries found in some checkpoints (OpenAI's JIT-exported state dicts carry the
# first three; open_clip keeps the causal mask as a buffer in older versions).
IGNORED_KEYS = frozenset({"input_resolution", "context_length", "vocab_size", "attn_mask"})

_BLOCK = re.compile(r"^(visual\.transformer|transformer)\.resblocks\.(\d+)\.")


# ----------------------------------------------------------------------------- config


def _depth(sd: Mapping[str, np.ndarray], prefix: str) -> int:
    layers = {int(m.group(2)) for k in sd if (m := _BLOCK.match(k)) and m.group(1) == prefix}
    if not layers:
        return 0
    if layers != set(range(max(layers) + 1)):
        raise ConversionError(f"{prefix}.resblocks has gaps: layers {sorted(layers)}")
    return max(layers) + 1


def _need(sd: Mapping[str, np.ndarray], key: str, ndim: int) -> np.ndarray:
    if key not in sd:
        raise ConversionError(f"cannot infer the config: {key!r} is missing")
    arr = sd[key]
    if arr.ndim != ndim:
        raise ConversionError(f"cannot infer the config: {key!r} has shape {arr.shape}, "
                              f"expected {ndim} dimensions")
    return arr


def infer_config(sd: Mapping[str, np.ndarray], **overrides) -> CLIPConfig:
    """The :class:`CLIPConfig` of an OpenAI-layout ViT CLIP state dict, from tensor shapes.

    Heads are ``width // 64`` in both towers (OpenAI's rule); ``eos_id`` is the last vocab id,
    ``pad_id`` 0, ``act`` quick-GELU. ``overrides`` replace any field (e.g. ``act="gelu"``).
    """
    if any(k.startswith(("vision_model.", "text_model.")) for k in sd):
        raise ConversionError("this is a Hugging Face transformers CLIP state dict; convert "
                              "the OpenAI / open_clip checkpoint of the same model instead")
    if any(k.startswith("visual.trunk.") for k in sd):
        raise ConversionError("this open_clip model has a timm image tower (visual.trunk.*); "
                              "only OpenAI-style ViT towers are supported")
    if any(k.startswith("visual.layer1.") for k in sd):
        raise ConversionError("this is a ResNet CLIP (visual.layer1.*); only ViT image towers "
                              "are supported")
    conv = _need(sd, "visual.conv1.weight", 4)
    vision_width, _, patch, _ = conv.shape
    n_pos = _need(sd, "visual.positional_embedding", 2).shape[0]
    grid = int(round((n_pos - 1) ** 0.5))
    if grid * grid != n_pos - 1:
        raise ConversionError(f"visual.positional_embedding has {n_pos} rows: not 1 + a "
                              "square number of patches")
    vocab, text_width = _need(sd, "token_embedding.weight", 2).shape
    context = _need(sd, "positional_embedding", 2).shape[0]
    embed_dim = _need(sd, "text_projection", 2).shape[1]
    ratios = {}
    for prefix, width in (("visual.transformer", vision_width), ("transformer", text_width)):
        key = f"{prefix}.resblocks.0.mlp.c_fc.weight"
        ratios[prefix] = _need(sd, key, 2).shape[0] / width
    if len(set(ratios.values())) != 1:
        raise ConversionError(f"the towers' MLP ratios differ ({ratios}); CLIPConfig has one "
                              "mlp_ratio")
    for name, width in (("vision", vision_width), ("text", text_width)):
        heads = overrides.get(f"{name}_heads")
        if heads is None and width % 64:
            raise ConversionError(f"{name} width {width} is not a multiple of 64; pass "
                                  f"{name}_heads=... explicitly")
        if heads is not None and (int(heads) < 1 or width % int(heads)):
            raise ConversionError(f"{name}_heads={heads} does not divide the {name} width "
                                  f"{width}")
    fields = dict(
        embed_dim=int(embed_dim), image_size=int(grid * patch), patch_size=int(patch),
        vision_width=int(vision_width), vision_layers=_depth(sd, "visual.transformer"),
        vision_heads=max(int(vision_width) // 64, 1), vocab_size=int(vocab),
        context_length=int(context), text_width=int(text_width),
        text_layers=_depth(sd, "transformer"), text_heads=max(int(text_width) // 64, 1),
        mlp_ratio=float(ratios["transformer"]), act="quick_gelu", eos_id=int(vocab) - 1,
        pad_id=0, dtype="float32")
    unknown = set(overrides) - {f.name for f in dataclasses.fields(CLIPConfig)}
    if unknown:
        raise TypeError(f"unknown CLIPConfig fields: {sorted(unknown)}")
    fields.update(overrides)
    return CLIPConfig(**fields)


# ----------------------------------------------------------------------------- mapping


def _ln(prefix: str) -> dict[str, tuple[str, Any]]:
    return {"scale": (f"{prefix}.weight", _same), "bias": (f"{prefix}.bias", _same)}


def _same(a: np.ndarray) -> np.ndarray:
    return a


def _t(a: np.ndarray) -> np.ndarray:
    return a.T


def _block_spec(prefix: str, width: int, heads: int) -> dict:
    """``{our name: (torch key, fn) | subtree}`` of one residual block (fused qkv split)."""
    hd = width // heads
    attn = f"{prefix}.attn"

    def qkv(i):
        def w(a):  # in_proj_weight [3W, W] (out, in) -> (in, H, Dh)
            return a[i * width:(i + 1) * width].T.reshape(width, heads, hd)

        def b(a):
            return a[i * width:(i + 1) * width].reshape(heads, hd)
        return {"kernel": (f"{attn}.in_proj_weight", w), "bias": (f"{attn}.in_proj_bias", b)}

    return {
        "ln_1": _ln(f"{prefix}.ln_1"),
        "attn": {
            "query": qkv(0), "key": qkv(1), "value": qkv(2),
            "out": {"kernel": (f"{attn}.out_proj.weight", lambda a: a.T.reshape(heads, hd, width)),
                    "bias": (f"{attn}.out_proj.bias", _same)},
        },
        "ln_2": _ln(f"{prefix}.ln_2"),
        "mlp": {"fc": {"kernel": (f"{prefix}.mlp.c_fc.weight", _t),
                       "bias": (f"{prefix}.mlp.c_fc.bias", _same)},
                "proj": {"kernel": (f"{prefix}.mlp.c_proj.weight", _t),
                         "bias": (f"{prefix}.mlp.c_proj.bias", _same)}},
    }


def param_spec(cfg: CLIPConfig) -> dict:
    """The mapping as a tree shaped like our params: leaves ``(torch key, fn torch -> ours)``.

    The image-normalisation folding is applied afterwards by :func:`convert`.
    """
    if cfg.scan_layers:
        raise ValueError("convert with scan_layers=False (the layers are stacked afterwards)")
    visual = {
        "patch_embed": {"kernel": ("visual.conv1.weight", lambda a: a.transpose(2, 3, 1, 0))},
        "class_embedding": ("visual.class_embedding", _same),
        "positional_embedding": ("visual.positional_embedding", _same),
        "ln_pre": _ln("visual.ln_pre"),
        "transformer": {f"block_{i}": _block_spec(f"visual.transformer.resblocks.{i}",
                                                  cfg.vision_width, cfg.vision_heads)
                        for i in range(cfg.vision_layers)},
        "ln_post": _ln("visual.ln_post"),
        "proj": ("visual.proj", _same),
    }
    text = {
        "token_embedding": {"embedding": ("token_embedding.weight", _same)},
        "positional_embedding": ("positional_embedding", _same),
        "transformer": {f"block_{i}": _block_spec(f"transformer.resblocks.{i}",
                                                  cfg.text_width, cfg.text_heads)
                        for i in range(cfg.text_layers)},
        "ln_final": _ln("ln_final"),
        "text_projection": ("text_projection", _same),
    }
    return {"visual": visual, "text": text, "logit_scale": ("logit_scale", np.squeeze)}


def spec_leaves(tree: dict, path: tuple = ()):
    """``(path, entry)`` of every leaf of a nested conversion spec (or params) dict, in order;
    ``path`` is the tuple of keys, ``entry`` the leaf (a spec's ``(their key, map)``)."""
    for name, node in tree.items():
        if isinstance(node, dict):
            yield from spec_leaves(node, path + (name,))
        else:
            yield path + (name,), node


def _set(tree: dict, path: tuple, value) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def expected_shapes(cfg: CLIPConfig) -> dict[tuple, tuple]:
    """``{param path: shape}`` of ``CLIP(cfg)`` (from ``jax.eval_shape``, nothing allocated)."""
    import flax.linen as nn
    import jax

    from unclip_jax.models.clip import CLIP, dummy_inputs

    dummy = dummy_inputs(cfg)
    abstract = jax.eval_shape(lambda: nn.meta.unbox(CLIP(cfg).init(
        jax.random.key(0), dummy["image"], dummy["tokens"])["params"]))
    return {tuple(str(getattr(k, "key", k)) for k in path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]}


def convert(sd: Mapping[str, Any], cfg: CLIPConfig | None = None, *,
            image_mean: tuple[float, ...] | None = OPENAI_MEAN,
            image_std: tuple[float, ...] = OPENAI_STD, **overrides) -> tuple[CLIPConfig, dict]:
    """``(CLIPConfig, params)`` (nested dict of float32 numpy arrays) from a state dict.

    Every key must be used and every param filled with the right shape: otherwise a
    :class:`ConversionError` lists the missing, unknown and mis-shaped keys (no partial load).
    ``cfg`` defaults to :func:`infer_config` (``overrides`` go to it). ``image_mean``/
    ``image_std``: the reference's input normalisation, folded in so that our model takes
    [-1, 1] images (``image_mean=None``: no folding).
    """
    sd = normalize_state_dict(sd)
    cfg = infer_config(sd, **overrides) if cfg is None else cfg
    spec = param_spec(cfg)
    want = expected_shapes(cfg)
    params: dict = {}
    used, missing, misshaped, problems = set(), [], [], []
    for path, (key, fn) in spec_leaves(spec):
        if key not in sd:
            missing.append(key)
            continue
        used.add(key)
        try:
            value = np.asarray(fn(sd[key]), np.float32)
        except ValueError as e:  # a reshape that does not fit
            misshaped.append(f"{key} {tuple(sd[key].shape)} -> {'/'.join(path)}: {e}")
            continue
        if tuple(value.shape) != want.get(path):
            misshaped.append(f"{key} {tuple(sd[key].shape)} -> {'/'.join(path)} "
                             f"{tuple(value.shape)}, model wants {want.get(path)}")
            continue
        _set(params, path, value)
    unknown = sorted(set(sd) - used - IGNORED_KEYS)
    unfilled = sorted("/".join(p) for p in set(want) - {p for p, _ in spec_leaves(spec)})
    for title, items in (("missing keys", sorted(set(missing))), ("unknown keys", unknown),
                         ("mis-shaped keys", misshaped), ("params with no source", unfilled)):
        if items:
            problems.append(f"{title} ({len(items)}):\n" + "\n".join(f"  {k}" for k in items))
    if problems:
        raise ConversionError("the state dict does not match CLIP("
                              f"{_short(cfg)}):\n" + "\n".join(problems))
    if image_mean is not None:
        _fold_normalisation(params["visual"], image_mean, image_std)
    return cfg, params


def _short(cfg: CLIPConfig) -> str:
    return (f"vision {cfg.vision_width}x{cfg.vision_layers}/p{cfg.patch_size}@{cfg.image_size}"
            f", text {cfg.text_width}x{cfg.text_layers}, vocab {cfg.vocab_size}, "
            f"context {cfg.context_length}, embed {cfg.embed_dim}")


def _fold_normalisation(visual: dict, mean, std) -> None:
    """Make the patch conv on ``x`` in [-1, 1] equal the reference conv on ``(x01-mean)/std``.

    ``(x01 - m) / s`` with ``x01 = (x + 1) / 2`` is ``a * x + b``, ``a = 1 / (2 s)``,
    ``b = (0.5 - m) / s`` per channel. conv(a x + b) = conv_{W a}(x) + sum_{ij c} W b: the
    kernel is scaled on its input-channel axis and the constant goes to the patch positions.
    """
    mean, std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
    kernel = visual["patch_embed"]["kernel"].astype(np.float64)  # [p, p, 3, W]
    if mean.shape != (kernel.shape[2],) or std.shape != mean.shape:
        raise ValueError(f"image_mean/image_std need {kernel.shape[2]} channels")
    a, b = 1.0 / (2.0 * std), (0.5 - mean) / std
    bias = np.einsum("ijcw,c->w", kernel, b)
    visual["patch_embed"]["kernel"] = (kernel * a[None, None, :, None]).astype(np.float32)
    pos = visual["positional_embedding"].astype(np.float64)
    pos[1:] += bias
    visual["positional_embedding"] = pos.astype(np.float32)


# ----------------------------------------------------------------------------- inverse


def to_state_dict(params: Mapping, cfg: CLIPConfig) -> dict[str, np.ndarray]:
    """The inverse mapping (no normalisation folding): our params → OpenAI-layout arrays.

    Used by the tests and to export a model for the reference implementations.
    """
    import jax

    params = jax.tree_util.tree_map(np.asarray, dict(params))
    sd: dict[str, np.ndarray] = {}
    for prefix, tower, width, layers in (("visual.", params["visual"], cfg.vision_width,
                                          cfg.vision_layers),
                                         ("", params["text"], cfg.text_width, cfg.text_layers)):
        for i in range(layers):
            blk = tower["transformer"][f"block_{i}"]
            p = f"{prefix}transformer.resblocks.{i}."
            att = blk["attn"]
            sd[p + "attn.in_proj_weight"] = np.concatenate(
                [att[n]["kernel"].reshape(width, width).T for n in ("query", "key", "value")])
            sd[p + "attn.in_proj_bias"] = np.concatenate(
                [att[n]["bias"].reshape(width) for n in ("query", "key", "value")])
            sd[p + "attn.out_proj.weight"] = att["out"]["kernel"].reshape(width, width).T
            sd[p + "attn.out_proj.bias"] = att["out"]["bias"]
            for ln in ("ln_1", "ln_2"):
                sd[p + ln + ".weight"], sd[p + ln + ".bias"] = (blk[ln]["scale"],
                                                                blk[ln]["bias"])
            for ours, theirs in (("fc", "c_fc"), ("proj", "c_proj")):
                sd[p + f"mlp.{theirs}.weight"] = blk["mlp"][ours]["kernel"].T
                sd[p + f"mlp.{theirs}.bias"] = blk["mlp"][ours]["bias"]
    v, t = params["visual"], params["text"]
    sd["visual.conv1.weight"] = v["patch_embed"]["kernel"].transpose(3, 2, 0, 1)
    sd["visual.class_embedding"] = v["class_embedding"]
    sd["visual.positional_embedding"] = v["positional_embedding"]
    for ours, theirs in (("ln_pre", "ln_pre"), ("ln_post", "ln_post")):
        sd[f"visual.{theirs}.weight"], sd[f"visual.{theirs}.bias"] = (v[ours]["scale"],
                                                                      v[ours]["bias"])
    sd["visual.proj"] = v["proj"]
    sd["token_embedding.weight"] = t["token_embedding"]["embedding"]
    sd["positional_embedding"] = t["positional_embedding"]
    sd["ln_final.weight"], sd["ln_final.bias"] = t["ln_final"]["scale"], t["ln_final"]["bias"]
    sd["text_projection"] = t["text_projection"]
    sd["logit_scale"] = np.asarray(params["logit_scale"]).reshape(())
    return {k: np.ascontiguousarray(a, np.float32) for k, a in sd.items()}


# ----------------------------------------------------------------------------- workdir


def convert_checkpoint(source: str | os.PathLike, out_dir: str | os.PathLike,
                       **options) -> Path:
    """The ``unclip-jax convert clip`` entry point (every converter has this signature): read
    (:func:`unclip_jax.pipelines.convert.read_state_dict`: ``.npz``, ``.safetensors``, torch files),
    convert, and write a workdir that :func:`unclip_jax.train.runs.load_clip` reads."""
    from unclip_jax.pipelines.convert import read_state_dict

    cfg, params = convert(read_state_dict(source), **options)
    return save_workdir(cfg, params, out_dir, source=str(source))
