"""Convert OpenAI's DALL·E dVAE (the ``dall_e`` package's Encoder / Decoder) into ``DVAE`` params.

Input: the two modules' state dicts, key names as ``dall_e`` builds them — every conv is a
``dall_e.utils.Conv2d`` with parameters ``w`` ``[out, in, k, k]`` and ``b`` ``[out]``:

* encoder: ``blocks.input`` (7×7 from 3 channels), ``blocks.group_G.block_B.id_path`` (1×1,
  only where the width changes) and ``…res_path.conv_1..conv_4`` (3×3, 3×3, 3×3, 1×1),
  ``blocks.output.conv`` (1×1 to the K logits);
* decoder: ``blocks.input`` (1×1 from the K code channels), the same block names with
  kernels 1×1, 3×3, 3×3, 3×3, ``blocks.output.conv`` (1×1 to 6 channels: μ of the three colour
  channels in logit space, then their ln b — the logit-Laplace statistics).

Our :class:`~unclip_jax.models.dvae.DVAE` is the same network — ReLU before every conv, hidden
width ``out // 4``, ``post_gain = 1 / (groups · blocks_per_group)²``, 2× max-pool after every
encoder group but the last, 2× nearest upsampling after every decoder group but the last — so
the import is a renaming plus the NCHW → NHWC kernel transpose; nothing is approximated. The
pixel map also agrees: ``dall_e.utils.map_pixels`` is ``(1 - 2ε) x + ε`` with ε = 0.1, which
our ``DVAE.encode_logits`` applies to ``[-1, 1]`` images after ``(x + 1) / 2``.

The config is read from the tensors (widths, K, groups, blocks per group); the image size is
not in the weights (the nets are fully convolutional) and defaults to the released model's 256.

OpenAI's published ``encoder.pkl`` / ``decoder.pkl`` are whole pickled modules, which
safe loading (``weights_only=True``) refuses: unpickling them would run arbitrary code. Export
their state dicts once, in an environment with ``dall_e`` installed and only for files you
trust: unpickle the module with torch (``weights_only`` off), then save its ``state_dict()``
with ``torch.save`` (or ``safetensors.torch.save_file``) as ``encoder.pt`` / ``decoder.pt``,
and convert those.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from unclip_jax.models.dvae import DVAEConfig
from unclip_jax.pipelines.convert import read_state_dict
from unclip_jax.pipelines.convert.clip import (
    ConversionError,
    _set,
    normalize_state_dict,
    spec_leaves,
)

PARTS = ("encoder", "decoder")
# Residual-path kernel sizes of dall_e's EncoderBlock / DecoderBlock (also ours).
KERNELS = {"encoder": (3, 3, 3, 1), "decoder": (1, 3, 3, 3)}
_BLOCK = re.compile(r"^blocks\.group_(\d+)\.block_(\d+)\.")
FILE_SUFFIXES = (".safetensors", ".npz", ".pt", ".pth", ".bin")


# ----------------------------------------------------------------------------- loading


def split_state_dict(sd: Mapping[str, Any]) -> tuple[dict, dict]:
    """``(encoder_sd, decoder_sd)`` of one dict whose keys start with ``encoder.``/``decoder.``
    (a ``DVAE``-like wrapper module's state dict). Any other key is an error."""
    sd = normalize_state_dict(sd)
    parts: dict[str, dict] = {p: {} for p in PARTS}
    other = []
    for key, value in sd.items():
        head, _, rest = key.partition(".")
        if head in parts and rest:
            parts[head][rest] = value
        else:
            other.append(key)
    if other or not all(parts.values()):
        raise ConversionError(
            "a single dVAE file must hold both state dicts under the prefixes 'encoder.' and "
            "'decoder.'" + (f"; keys outside them: {sorted(other)[:8]}" if other else "")
            + (f"; nothing under {[p for p in PARTS if not parts[p]]}"
               if not all(parts.values()) else "")
            + " (or pass the decoder file separately)")
    return parts["encoder"], parts["decoder"]


def _load(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """:func:`~unclip_jax.pipelines.convert.read_state_dict`, with a hint for OpenAI's pickled
    modules."""
    try:
        return read_state_dict(path)
    except pickle.UnpicklingError as e:
        raise ConversionError(
            f"{str(path)!r} is not a plain state dict (torch refused it with weights_only=True; "
            "OpenAI's encoder.pkl/decoder.pkl are pickled modules). Export it once where "
            "dall_e is installed (and only if you trust the file): unpickle the module with torch, "
            "then torch.save(module.state_dict(), 'encoder.pt')") from e


def load_state_dicts(source: str | os.PathLike, decoder: str | os.PathLike | None = None
                     ) -> tuple[dict, dict]:
    """``(encoder_sd, decoder_sd)`` from

    * ``source`` = the encoder file and ``decoder`` = the decoder file; or
    * ``source`` = a folder holding ``encoder.<ext>`` and ``decoder.<ext>`` (ext one of
      ``.safetensors .npz .pt .pth .bin``); or
    * ``source`` = one file with ``encoder.``/``decoder.``-prefixed keys.
    """
    source = Path(source)
    if decoder is not None:
        return _load(source), _load(decoder)
    if source.is_dir():
        found = []
        for part in PARTS:
            files = [source / f"{part}{s}" for s in FILE_SUFFIXES
                     if (source / f"{part}{s}").is_file()]
            if not files:
                raise FileNotFoundError(
                    f"no {part} file in {str(source)!r}: expected {part} with one of "
                    f"the suffixes {', '.join(FILE_SUFFIXES)}")
            found.append(files[0])
        return _load(found[0]), _load(found[1])
    return split_state_dict(_load(source))


# ----------------------------------------------------------------------------- config


def _groups(sd: Mapping[str, np.ndarray], part: str) -> tuple[int, int]:
    """``(groups, blocks per group)`` from the ``blocks.group_G.block_B.`` key names."""
    found: dict[int, set[int]] = {}
    for key in sd:
        if m := _BLOCK.match(key):
            found.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    if not found:
        raise ConversionError(f"cannot infer the config: the {part} has no "
                              "'blocks.group_N.block_M.' keys (is this a dall_e state dict?)")
    if set(found) != set(range(1, max(found) + 1)):
        raise ConversionError(f"{part} groups are not 1..N: found {sorted(found)}")
    blocks = {g: frozenset(b) for g, b in found.items()}
    if len(set(blocks.values())) != 1 or blocks[1] != frozenset(range(1, max(blocks[1]) + 1)):
        raise ConversionError(f"{part} groups differ in their blocks (or have gaps): "
                              f"{ {g: sorted(b) for g, b in sorted(blocks.items())} }")
    return max(found), max(blocks[1])


def _need(sd: Mapping[str, np.ndarray], part: str, key: str, ndim: int):
    if key not in sd:
        raise ConversionError(f"cannot infer the config: {part} key {key!r} is missing")
    shape = tuple(np.shape(sd[key]))
    if len(shape) != ndim:
        raise ConversionError(f"cannot infer the config: {part} key {key!r} has shape {shape},"
                              f" expected {ndim} dimensions")
    return shape


def infer_config(encoder_sd: Mapping[str, Any], decoder_sd: Mapping[str, Any], *,
                 image_size: int = 256, **overrides) -> DVAEConfig:
    """The :class:`DVAEConfig` of a dall_e encoder/decoder pair, from shapes and key names.

    Only shapes are read (the arrays may be ``np.broadcast_to`` views). ``image_size`` is not in
    the weights; ``overrides`` replace any other field (e.g. training settings).
    """
    enc_groups, enc_blocks = _groups(encoder_sd, "encoder")
    dec_groups, dec_blocks = _groups(decoder_sd, "decoder")
    if (enc_groups, enc_blocks) != (dec_groups, dec_blocks):
        raise ConversionError(
            f"encoder ({enc_groups} groups × {enc_blocks} blocks) and decoder ({dec_groups} × "
            f"{dec_blocks}) differ; DVAEConfig has one num_groups and blocks_per_group")
    enc_width, channels_in, _, _ = _need(encoder_sd, "encoder", "blocks.input.w", 4)
    vocab, _, _, _ = _need(encoder_sd, "encoder", "blocks.output.conv.w", 4)
    dec_init, dec_vocab, _, _ = _need(decoder_sd, "decoder", "blocks.input.w", 4)
    channels_out, dec_width, _, _ = _need(decoder_sd, "decoder", "blocks.output.conv.w", 4)
    if channels_in != 3 or channels_out != 6:
        raise ConversionError(f"expected 3 input channels and 6 output statistics (RGB), got "
                              f"{channels_in} and {channels_out}")
    if vocab != dec_vocab:
        raise ConversionError(f"the encoder has {vocab} codes but the decoder takes {dec_vocab}")
    fields = dict(image_size=int(image_size), num_groups=enc_groups,
                  blocks_per_group=enc_blocks, encoder_width=int(enc_width),
                  decoder_width=int(dec_width), decoder_init_width=int(dec_init),
                  vocab_size=int(vocab), dtype="float32", eps=0.1)
    unknown = set(overrides) - {f.name for f in dataclasses.fields(DVAEConfig)}
    if unknown:
        raise TypeError(f"unknown DVAEConfig fields: {sorted(unknown)}")
    fields.update(overrides)
    return DVAEConfig(**fields)


# ----------------------------------------------------------------------------- mapping


def _conv_w(a: np.ndarray) -> np.ndarray:
    return a.transpose(2, 3, 1, 0)           # torch [out, in, kh, kw] → ours [kh, kw, in, out]


def _same(a: np.ndarray) -> np.ndarray:
    return a


def _conv(key: str) -> dict:
    return {"kernel": (f"{key}.w", _conv_w), "bias": (f"{key}.b", _same)}


def _widths(cfg: DVAEConfig, part: str) -> list[tuple[int, int]]:
    """``(in, out)`` width of every block, in order (dall_e's and our width rules)."""
    out, width = [], (cfg.encoder_width if part == "encoder" else cfg.decoder_init_width)
    for g in range(cfg.num_groups):
        target = (cfg.encoder_width * 2 ** g if part == "encoder"
                  else cfg.decoder_width * 2 ** (cfg.num_groups - 1 - g))
        for _ in range(cfg.blocks_per_group):
            out.append((width, target))
            width = target
    return out


def param_spec(cfg: DVAEConfig) -> dict:
    """The mapping as a tree shaped like ``DVAE`` params; leaves ``(prefixed key, fn)`` with
    keys ``encoder.blocks…`` / ``decoder.blocks…``."""
    spec = {}
    for part in PARTS:
        tree = {"input": _conv(f"{part}.blocks.input"),
                "output": _conv(f"{part}.blocks.output.conv")}
        widths = iter(_widths(cfg, part))
        for g in range(cfg.num_groups):
            for b in range(cfg.blocks_per_group):
                n_in, n_out = next(widths)
                theirs = f"{part}.blocks.group_{g + 1}.block_{b + 1}"
                block = {f"conv_{i}": _conv(f"{theirs}.res_path.conv_{i + 1}")
                         for i in range(len(KERNELS[part]))}
                if n_in != n_out:
                    block["id_path"] = _conv(f"{theirs}.id_path")
                tree[f"group_{g}_block_{b}"] = block
        spec[part] = tree
    return spec


def expected_shapes(cfg: DVAEConfig) -> dict[tuple, tuple]:
    """``{param path: shape}`` of ``DVAE(cfg)`` (``jax.eval_shape``: nothing allocated)."""
    import flax.linen as nn
    import jax

    from unclip_jax.models.dvae import DVAE, dummy_inputs

    image = dummy_inputs(cfg)["image"]
    abstract = jax.eval_shape(lambda: nn.meta.unbox(
        DVAE(cfg).init(jax.random.key(0), image)["params"]))
    return {tuple(str(getattr(k, "key", k)) for k in path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]}


def convert(encoder_sd: Mapping[str, Any], decoder_sd: Mapping[str, Any],
            cfg: DVAEConfig | None = None, *, image_size: int = 256,
            **overrides) -> tuple[DVAEConfig, dict]:
    """``(DVAEConfig, params)`` (nested dict of float32 numpy arrays) from the two state dicts.

    All or nothing: every key must be used and every param filled with its exact shape, or a
    :class:`ConversionError` lists the missing, unknown and mis-shaped keys (named with their
    ``encoder.``/``decoder.`` prefix). ``cfg`` defaults to :func:`infer_config`.
    """
    parts = {"encoder": normalize_state_dict(encoder_sd),
             "decoder": normalize_state_dict(decoder_sd)}
    if cfg is None:
        cfg = infer_config(parts["encoder"], parts["decoder"], image_size=image_size,
                           **overrides)
    sd = {f"{part}.{k}": v for part, d in parts.items() for k, v in d.items()}
    spec = param_spec(cfg)
    want = expected_shapes(cfg)
    params: dict = {}
    used, missing, misshaped = set(), [], []
    for path, (key, fn) in spec_leaves(spec):
        if key not in sd:
            missing.append(key)
            continue
        used.add(key)
        value = np.asarray(fn(sd[key]), np.float32)
        if tuple(value.shape) != want.get(path):
            misshaped.append(f"{key} {tuple(sd[key].shape)} -> {'/'.join(path)} "
                             f"{tuple(value.shape)}, model wants {want.get(path)}")
            continue
        _set(params, path, value)
    unknown = sorted(set(sd) - used)
    unfilled = sorted("/".join(p) for p in set(want) - {p for p, _ in spec_leaves(spec)})
    problems = [f"{title} ({len(items)}):\n" + "\n".join(f"  {k}" for k in items)
                for title, items in (("missing keys", sorted(missing)),
                                     ("unknown keys", unknown),
                                     ("mis-shaped keys", misshaped),
                                     ("params with no source", unfilled)) if items]
    if problems:
        raise ConversionError(f"the state dicts do not match DVAE({_short(cfg)}):\n"
                              + "\n".join(problems))
    return cfg, params


def _short(cfg: DVAEConfig) -> str:
    return (f"{cfg.num_groups} groups × {cfg.blocks_per_group} blocks, encoder width "
            f"{cfg.encoder_width}, decoder {cfg.decoder_init_width}→{cfg.decoder_width}, "
            f"vocab {cfg.vocab_size}")


# ----------------------------------------------------------------------------- inverse


def to_state_dicts(params: Mapping, cfg: DVAEConfig) -> tuple[dict, dict]:
    """The inverse mapping: our params → dall_e ``(encoder_sd, decoder_sd)`` float32 arrays.

    Used by the tests and to export a model to the reference implementation.
    """
    import jax

    params = jax.tree_util.tree_map(np.asarray, dict(params))
    out: dict[str, dict] = {p: {} for p in PARTS}
    for path, (key, _) in spec_leaves(param_spec(cfg)):
        node = params
        for name in path:
            node = node[name]
        part, _, theirs = key.partition(".")
        value = node.transpose(3, 2, 0, 1) if path[-1] == "kernel" else node
        out[part][theirs] = np.ascontiguousarray(value, np.float32)
    return out["encoder"], out["decoder"]


# ----------------------------------------------------------------------------- workdir


def convert_checkpoint(source: str | os.PathLike, out_dir: str | os.PathLike, *,
                       decoder: str | os.PathLike | None = None, image_size: int = 256,
                       **overrides) -> Path:
    """Load, convert and save: the whole ``unclip-jax convert dvae`` job.

    ``source``/``decoder`` as in :func:`load_state_dicts`. Writes a workdir that
    :func:`unclip_jax.train.runs.load_dvae` (and a DALL·E config's ``dvae_workdir``) reads.
    """
    from unclip_jax.pipelines.convert import save_workdir

    encoder_sd, decoder_sd = load_state_dicts(source, decoder)
    cfg, params = convert(encoder_sd, decoder_sd, image_size=image_size, **overrides)
    label = str(source) if decoder is None else f"{source} + {decoder}"
    return save_workdir(cfg, params, out_dir, source=label)
