"""Reading published weight files into ``{key: numpy array}`` state dicts (core layer).

One reader for every consumer of external weights (the converters, the FID Inception): ``.npz``
(``np.savez``, read without pickles), ``.safetensors`` (no torch needed) and torch files
(``.pth``/``.pt``/``.bin``, read with ``torch.load(..., weights_only=True)``, torch imported only
then). Floating tensors come back as float32 (bf16/fp16 included); a ``{"state_dict": ...}``
wrapper and DDP's ``module.`` prefix are removed. Never pickle.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np


class ConversionError(ValueError):
    """A state dict that is not one, or that does not map onto a param tree; the converters'
    messages list every missing, unknown and mis-shaped key."""


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """``{key: float32 numpy array}`` from ``.npz`` (``np.savez``; read without pickles), or
    anything :func:`load_state_dict` reads (``.safetensors``, torch files with
    ``weights_only=True``). ``.npz`` needs neither torch nor safetensors."""
    path = Path(path)
    if path.suffix != ".npz":
        return load_state_dict(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {str(path)!r}")
    with np.load(path, allow_pickle=False) as f:
        return normalize_state_dict({k: f[k] for k in f.files})


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """``{key: float32 numpy array}`` from a ``.safetensors`` file or a torch checkpoint.

    Torch files are read with ``weights_only=True`` (torch imported only here). A
    ``{"state_dict": ...}`` wrapper and a ``module.`` prefix (DDP) are removed.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {str(path)!r}")
    if path.suffix == ".safetensors":
        try:
            from safetensors.numpy import load_file
        except ImportError as e:
            raise ImportError("reading .safetensors needs the `safetensors` package "
                              "(pip install safetensors)") from e
        raw: Mapping[str, Any] = load_file(str(path))
    else:
        try:
            import torch
        except ImportError as e:
            raise ImportError(f"{str(path)!r} is a torch checkpoint: reading it needs torch; "
                              "or convert it to .safetensors first") from e
        raw = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(raw, Mapping):
            raise ConversionError(f"{str(path)!r} holds a {type(raw).__name__}, not a state "
                                  "dict")
    return normalize_state_dict(raw)


def normalize_state_dict(raw: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Unwrap ``state_dict``, strip ``module.``, turn every tensor into a float32 array."""
    if "state_dict" in raw and isinstance(raw["state_dict"], Mapping):
        raw = raw["state_dict"]
    out = {}
    for key, value in raw.items():
        if key.startswith("module."):
            key = key[len("module."):]
        out[key] = _to_numpy(value)
    return out


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor (bf16/fp16 included)
        import torch

        return value.detach().to(torch.float32).cpu().numpy()
    arr = np.asarray(value)
    return arr.astype(np.float32) if arr.dtype.kind == "f" else arr
