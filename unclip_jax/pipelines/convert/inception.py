"""The FID Inception-v3's weights from a user-supplied file (pytorch-fid's
``pt_inception-2015-12-05-*.pth``, or the same tensors as ``.npz`` / ``.safetensors``) as the
checked flax variables :mod:`unclip_jax.train.eval.inception` computes features with."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from unclip_jax.pipelines.convert.weights import read_state_dict as read_weights
from unclip_jax.train.eval import inception


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Tensors of a ``.pth``/``.pt`` (torch required), ``.npz`` or ``.safetensors`` file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file at {str(path)!r}; download the pytorch-fid "
                                f"weights yourself (pt_inception-2015-12-05-*.pth) and pass "
                                f"their path")
    suffix = path.suffix.lower()
    if suffix in (".npz", ".safetensors", ".pth", ".pt", ".bin"):
        return read_weights(path)   # the one weights reader (torch lazily, weights_only)
    raise ValueError(f"unknown weights format {suffix!r} of {path.name}; accepted: .pth, .pt, "
                     f".bin (torch), .npz, .safetensors")


def load_variables(path: str | os.PathLike) -> dict:
    """Checked flax variables of the FID Inception-v3 from a user-supplied weights file."""
    return inception.variables_from_state_dict(read_state_dict(path))
