"""Converters from published (PyTorch) checkpoints into this package's params and workdirs.

Torch is never imported at module level: torch files are read lazily with
``weights_only=True``; ``.safetensors`` files need no torch at all.

A converted model is written as a training run would leave it (:func:`save_workdir`):
``<out>/config.json`` with the model config under ``model`` and ``checkpoints/<step>/`` holding
``{state: {params}, data, config}``, so every loader of trained runs reads it unchanged.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from unclip_jax.pipelines.convert.weights import read_state_dict  # noqa: F401  (the one weights reader)


def save_workdir(model_cfg: Any, params: Mapping, out_dir: str | os.PathLike, *,
                 source: str = "", step: int = 0, extra: Mapping | None = None) -> Path:
    """Write ``<out_dir>/config.json`` and ``checkpoints/<step>`` like a training run.

    ``model_cfg`` is the model's config dataclass (saved with its ``__type__``); the run has no
    EMA (``train.ema_decay = 0``) so loaders restore ``params``. ``extra`` adds top-level
    entries to the run config. Refuses an ``out_dir`` that already holds checkpoints.
    """
    import jax
    import jax.numpy as jnp

    from unclip_jax.core import config as config_lib
    from unclip_jax.train.checkpoint import Checkpointer

    out = Path(out_dir)
    if (out / "checkpoints").exists() and any((out / "checkpoints").iterdir()):
        raise FileExistsError(f"{str(out)!r} already holds checkpoints; pick an empty --out")
    out.mkdir(parents=True, exist_ok=True)
    run_cfg = {"model": config_lib.to_dict(model_cfg), "train": {"ema_decay": 0.0},
               "converted_from": str(source), **dict(extra or {})}
    tmp = out / f".config.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(run_cfg, indent=2, sort_keys=True))
    os.replace(tmp, out / "config.json")
    state = {"params": jax.tree_util.tree_map(jnp.asarray, dict(params))}
    ckpt = Checkpointer(out, keep=1, async_save=False)
    try:
        ckpt.save(step, state, data={}, config=run_cfg)
        ckpt.wait()
    finally:
        ckpt.close()
    return out
