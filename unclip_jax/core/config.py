"""Configs: frozen dataclasses returned by ``get_config()`` in Python config files.

A config file (e.g. ``experiments/shapes/clip.py``) defines ``get_config() -> ExperimentConfig``.
Command-line overrides ``key.sub=value`` are parsed against the dataclass field types; an
unknown key fails naming the valid ones, a value of the wrong type fails naming the type.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import types
import typing
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from unclip_jax.core.sharding import MeshConfig


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Which dataset to read and how to turn examples into model inputs."""

    name: str = "captioned_shapes/r32"   # tfds name[/config] or "image_captions/<name>"
                                         # (with shards: only a label for the run)
    data_dir: str = "data/prepared"      # where prepared datasets live (git-ignored)
    shards: str = ""                     # webdataset/img2dataset .tar shards of the train
                                         # split (glob/brace pattern, local or fsspec URL);
                                         # set: streamed instead of the dataset `name`
    eval_shards: str = ""                # shards of the validation split (with `shards`)
    shuffle_buffer: int = 1000           # shards: samples per seeded shuffle window
    image_size: int = 32                 # model input resolution (square)
    random_crop: bool = False            # random crop (train) instead of centre crop
    tokenizer: str = ""                  # sentencepiece model path ("" = <workdir>/tokenizer.model)
    vocab_size: int = 512                # vocabulary size when training the tokenizer
    context_length: int = 32             # text tokens incl. BOS/EOS
    shuffle_seed: int = 0
    num_workers: int = 0                 # loader threads (0 = in-process)
    caption_augment: float = 0.0         # captioned_shapes: P(describe objects by a random
                                         # subset of their attributes), training only
    colour_drop: float = 0.0             # captioned_shapes: P(grayscale image + caption
                                         # without colour words), training only

    def __post_init__(self):
        if self.shuffle_buffer < 1:
            raise ValueError(f"data.shuffle_buffer is a number of samples ≥ 1, got "
                             f"{self.shuffle_buffer}")
        if not 0.0 <= self.colour_drop <= 1.0:
            raise ValueError(f"data.colour_drop is a probability in [0, 1], got "
                             f"{self.colour_drop}")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW (or Muon for the weight matrices) with linear warm-up and cosine decay,
    global-norm clipping."""

    optimizer: str = "adamw"             # "adamw" | "muon" (train/optim.py)
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    schedule: str = "cosine"             # "cosine" | "constant"
    end_lr_factor: float = 0.0           # cosine decays to learning_rate * end_lr_factor
    b1: float = 0.9
    b2: float = 0.98
    eps: float = 1e-6
    weight_decay: float = 0.1            # not applied to norms, biases, embeddings, scalars
    grad_clip: float = 1.0               # global-norm clip; 0 disables
    muon_momentum: float = 0.95          # Muon's Nesterov momentum (optimizer="muon")
    muon_adamw_modules: tuple[str, ...] = ()  # modules whose kernels stay on AdamW with Muon


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The generic loop: steps, batch, logging, evaluation, checkpoints.

    The compute dtype is not set here: each model config has its own ``dtype`` (params,
    optimizer state, norms, softmax and losses stay float32 whatever it is), so the dtype a
    checkpoint was trained with is saved with the model it shaped.
    """

    seed: int = 0
    batch_size: int = 64                 # global batch
    grad_accum_steps: int = 1            # micro-batches per update (one jitted scan)
    steps: int = 1000
    log_every: int = 50
    eval_every: int = 500                # 0 = no periodic evaluation
    eval_at_end: bool = True             # evaluate once more after the last step
    ckpt_every: int = 500
    keep_checkpoints: int = 3
    ema_decay: float = 0.0               # 0 = no EMA params
    on_nonfinite: str = "error"          # "error" stops; "skip" drops the update and counts it
    async_checkpoint: bool = True
    sample_every: int = 0                # > 0: a sample grid every N steps (and at the end),
                                         # PNG in <workdir>/samples and to the writers
    sample_count: int = 8                # samples in the grid (fixed inputs and seed)
    sample_decoder: str = ""             # priors' grids and evals: a trained decoder run
                                         # that renders the sampled image embeddings
    evals: tuple[str, ...] = ()          # evaluations every eval_every steps (train/tasks/
                                         # evals.py); empty: the task's own evaluation
    eval_count: int = 64                 # generators' evals: samples (first validation rows)
    eval_clip: str = ""                  # generators' evals: the CLIP run ("" = the model's)
    writers: tuple[str, ...] = ("tensorboard",)   # besides metrics.jsonl: tensorboard, wandb
    wandb_project: str = ""              # W&B project ("" = unclip_jax), with writers=…,wandb


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """Everything one training run needs. ``model`` is the model's own config dataclass."""

    name: str
    model: Any
    task: str = "clip"                   # which model's task the loop trains (train/tasks/)
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    mesh: MeshConfig = MeshConfig()


# ----------------------------------------------------------------------------- loading


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """Import the config file at ``path``, call its ``get_config()`` and apply overrides."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    spec = importlib.util.spec_from_file_location(f"_unclip_cfg_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"config file {str(path)!r} defines no get_config()")
    return apply_overrides(module.get_config(), overrides)


def apply_overrides(cfg: Any, overrides: list[str] | tuple[str, ...]) -> Any:
    """Apply ``key.sub=value`` strings to a frozen dataclass tree, type-checked."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        cfg = _set(cfg, key.strip().split("."), raw.strip(), key.strip())
    return cfg


def _set(node: Any, path: list[str], raw: str, full_key: str) -> Any:
    if not dataclasses.is_dataclass(node):
        raise ValueError(f"cannot set {full_key!r}: {type(node).__name__} has no sub-keys")
    fields = {f.name: f for f in dataclasses.fields(node)}
    name = path[0]
    renamed = getattr(type(node), "RENAMED", {})
    if name not in fields and name in renamed:
        warnings.warn(f"config key {full_key!r} is deprecated and will be removed after the "
                      f"next release; use {renamed[name]!r}", DeprecationWarning, stacklevel=4)
        name = renamed[name]
    if name not in fields:
        raise KeyError(f"unknown config key {full_key!r}: {type(node).__name__} has no field "
                       f"{name!r}; valid keys here: {', '.join(sorted(fields))}")
    current = getattr(node, name)
    if len(path) > 1:
        return dataclasses.replace(node, **{name: _set(current, path[1:], raw, full_key)})
    hints = typing.get_type_hints(type(node))
    value = parse_value(raw, hints.get(name, type(current)), full_key, current)
    return dataclasses.replace(node, **{name: value})


def parse_value(raw: str, typ: Any, key: str = "value", current: Any = None) -> Any:
    """Convert the string ``raw`` into ``typ`` (int, float, bool, str, tuple[...], Optional)."""
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if typ is Any:
        typ = type(current) if current is not None else str
        origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin in (typing.Union, types.UnionType):
        if raw.lower() in ("none", "null") and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return parse_value(raw, arg, key)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError("; ".join(errors))
    if origin is tuple:
        items = [s.strip() for s in raw.strip("()[] ").split(",") if s.strip()]
        elem = args[0] if args else str
        return tuple(parse_value(s, elem, key) for s in items)
    if dataclasses.is_dataclass(typ):
        raise ValueError(f"{key!r} is a group of settings; set one of its fields "
                         f"({', '.join(f.name for f in dataclasses.fields(typ))})")
    if typ is bool:
        low = raw.lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"{key!r} expects a bool (true/false), got {raw!r}")
    if typ is int:
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"{key!r} expects an int, got {raw!r}") from None
    if typ is float:
        try:
            return float(raw)
        except ValueError:
            raise ValueError(f"{key!r} expects a float, got {raw!r}") from None
    if typ is str:
        return raw
    raise ValueError(f"{key!r} has type {typ!r}, which cannot be set from the command line")


def to_dict(cfg: Any) -> dict:
    """A JSON-ready dict of a config tree (dataclass type names kept under ``__type__``)."""
    if dataclasses.is_dataclass(cfg):
        out = {"__type__": type(cfg).__name__}
        for f in dataclasses.fields(cfg):
            out[f.name] = to_dict(getattr(cfg, f.name))
        return out
    if isinstance(cfg, (tuple, list)):
        return [to_dict(v) for v in cfg]
    return cfg


def from_dict(d: Any, types: Mapping[str, type] | None = None, default: type | None = None
              ) -> Any:
    """The inverse of :func:`to_dict`: dicts carrying ``__type__`` become the named
    dataclasses (the core ones of this module, plus ``types`` — name → class — for model
    configs, which live in higher layers), lists become tuples. ``default``: the class of a
    top-level dict written without ``__type__`` (early runs). Fields a class no longer has are
    dropped (configs written by an older version still load); fields a class renamed
    (``RENAMED = {"old": "new"}`` on the class) are read under their new name."""
    known = {c.__name__: c for c in (ExperimentConfig, DataConfig, OptimConfig, TrainConfig,
                                     MeshConfig)}
    known.update(types or {})
    if isinstance(d, list):
        return tuple(from_dict(v, known) for v in d)
    if not isinstance(d, dict):
        return d
    name = d.get("__type__")
    if name is None and default is None:
        return {k: from_dict(v, known) for k, v in d.items()}
    cls = default if name is None else known.get(name)
    if cls is None:
        raise ValueError(f"unknown config type {name!r}; known: {', '.join(sorted(known))}")
    renamed = getattr(cls, "RENAMED", {})
    fields = {f.name for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for k, v in d.items():
        k = renamed.get(k, k)
        if k in fields:      # a group written without __type__ (converted runs) is its field's
            sub = hints.get(k)
            kwargs[k] = from_dict(v, known, sub if dataclasses.is_dataclass(sub) else None)
    return cls(**kwargs)


def to_json(cfg: Any) -> str:
    return json.dumps(to_dict(cfg), indent=2, sort_keys=True)


def flat_items(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """``{"train.steps": 1000, ...}``: every leaf setting of a config tree by its override key."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(v):
            out.update(flat_items(v, key + "."))
        else:
            out[key] = v
    return out
