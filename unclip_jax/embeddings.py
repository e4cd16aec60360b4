"""A frozen CLIP's embeddings of a dataset split, cached as sharded, resumable ``.npz`` files.

Layout of a cache ``<out>``::

    <out>/meta.json                 CLIP workdir and step, E, L, W, shard size, per-split counts
    <out>/<split>/shard_00000.npz   examples [0, shard_size), then [shard_size, 2·shard_size) …

Each shard holds (``n`` rows):

* ``text_emb``, ``image_emb`` ``[n, E]`` float32, unit norm (CLIP's joint embeddings);
* ``text_tokens`` ``[n, L]`` int32 (BOS … EOS, pad); ``text_states`` ``[n, L, W]`` float16 (the
  text tower's final-LN token states, what the unCLIP prior and decoder attend to);
* ``index`` ``[n]`` int64 (example index in the split); ``caption`` ``[n]`` numpy unicode;
* the dataset's integer attributes when present: captioned shapes' ``colour``, ``shape``,
  ``size`` ``[n, 2]``, ``num_objects``, ``relation`` ``[n]`` (int32).

Shards are written to a temporary name and renamed once complete, so a killed run never leaves
a half shard under the final name; re-running skips the shards that exist. Files are plain
``np.savez`` (no pickles) and are read with ``allow_pickle=False``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import jax
import numpy as np

from unclip_jax.config import DataConfig

SHARD_RE = re.compile(r"shard_(\d{5})\.npz")
ATTRIBUTES = ("colour", "shape", "size", "num_objects", "relation")


def shard_name(k: int) -> str:
    return f"shard_{k:05d}.npz"


# ----------------------------------------------------------------------------- the CLIP


def read_run_config(workdir: str | os.PathLike) -> dict:
    """The ``config.json`` a training run wrote into ``workdir`` (a clear error if absent)."""
    workdir = Path(workdir)
    if not workdir.is_dir():
        raise FileNotFoundError(f"workdir {str(workdir)!r} does not exist; pass the folder a "
                                f"training run wrote (it holds config.json and checkpoints/)")
    path = workdir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist: {str(workdir)!r} is not the "
                                f"workdir of a training run (expected config.json and "
                                f"checkpoints/)")
    return json.loads(path.read_text())


def _dataclass_from_dict(cls, d: dict):
    names = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in d.items():
        if k == "__type__" or k not in names:
            continue
        kwargs[k] = tuple(v) if isinstance(v, list) else v
    return cls(**kwargs)


def restore_run_params(workdir: str | os.PathLike, run_cfg: dict) -> tuple[Any, int]:
    """``(params, step)`` of the latest checkpoint of ``workdir``: the EMA params when the run
    kept them (``train.ema_decay > 0``), else the raw params (host arrays)."""
    from unclip_jax.train.checkpoint import Checkpointer

    ckpt_dir = Path(workdir) / "checkpoints"
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"{str(workdir)!r} has no checkpoints/ folder; train it first")
    ckpt = Checkpointer(workdir, async_save=False)
    step = ckpt.latest_step()
    if step is None:
        ckpt.close()
        raise FileNotFoundError(f"no complete checkpoint under {ckpt.directory}")
    ema = float(run_cfg.get("train", {}).get("ema_decay", 0.0)) > 0
    params = ckpt.restore_params(step, which="ema_params" if ema else "params")
    ckpt.close()
    return params, int(step)


def load_clip(clip_workdir: str | os.PathLike):
    """``(CLIP module, params, CLIPConfig)`` of a trained CLIP run (EMA params if it kept them).

    The module is rebuilt from the run's saved ``config.json`` (``model`` = CLIPConfig fields).
    """
    return _load_clip(clip_workdir)[:3]


def _load_clip(clip_workdir):
    from unclip_jax.models.clip import CLIP, CLIPConfig

    run_cfg = read_run_config(clip_workdir)
    model_cfg = run_cfg.get("model", {})
    if model_cfg.get("__type__") not in (None, "CLIPConfig"):
        raise ValueError(f"{str(clip_workdir)!r} holds a {model_cfg.get('__type__')} run, not "
                         f"a CLIP (model.__type__ should be CLIPConfig)")
    cfg = _dataclass_from_dict(CLIPConfig, model_cfg)
    params, step = restore_run_params(clip_workdir, run_cfg)
    return CLIP(cfg), params, cfg, step


def clip_tokenizer_path(clip_workdir: str | os.PathLike, run_cfg: dict | None = None) -> Path:
    """The tokenizer a CLIP run was trained with: its ``data.tokenizer``, else
    ``<workdir>/tokenizer.model``, else ``<workdir>/../tokenizer.model`` (the demo layout)."""
    run_cfg = read_run_config(clip_workdir) if run_cfg is None else run_cfg
    named = run_cfg.get("data", {}).get("tokenizer", "")
    candidates = ([Path(named)] if named else []) + [
        Path(clip_workdir) / "tokenizer.model", Path(clip_workdir).parent / "tokenizer.model"]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(f"no tokenizer for the CLIP run {str(clip_workdir)!r}; looked at "
                            f"{', '.join(map(str, candidates))}; pass tokenizer_path")


class ClipEncoder:
    """Jitted encoders of a frozen CLIP: images → ``[B, E]``; tokens → (states, embedding)."""

    def __init__(self, clip_workdir: str | os.PathLike, tokenizer_path=None):
        from unclip_jax.text import Tokenizer

        self.workdir = Path(clip_workdir)
        self.run_cfg = read_run_config(clip_workdir)
        self.model, self.params, self.cfg, self.step = _load_clip(clip_workdir)
        self.tokenizer = Tokenizer.load(tokenizer_path or clip_tokenizer_path(clip_workdir,
                                                                              self.run_cfg))
        model = self.model
        self._image = jax.jit(lambda p, x: model.apply({"params": p}, x,
                                                       method=model.encode_image))
        self._text = jax.jit(lambda p, t: model.apply({"params": p}, t,
                                                      method=model.encode_text_tokens))

    @property
    def context_length(self) -> int:
        return self.cfg.context_length

    def images(self, images: np.ndarray) -> np.ndarray:
        """``[B, H, W, 3]`` in [-1, 1] → ``[B, E]`` float32 unit norm."""
        return np.asarray(self._image(self.params, images))

    def tokens(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``[B, L]`` int32 → (``[B, L, W]`` float32 states, ``[B, E]`` float32 unit norm)."""
        states, emb = self._text(self.params, np.asarray(tokens, np.int32))
        return np.asarray(states), np.asarray(emb)

    def on_mesh(self, mesh) -> "ClipEncoder":
        """Encode global batches split over ``mesh`` (every process's devices): the params are
        copied onto every device once; then :meth:`encode_batch` takes batches placed with
        :func:`unclip_jax.sharding.shard_batch` (each process its own rows)."""
        from unclip_jax import sharding

        self.mesh = mesh
        self._mesh_params = sharding.from_host(self.params, sharding.replicated(mesh))
        model = self.model

        def encode(p, images, tokens):
            states, temb = model.apply({"params": p}, tokens, method=model.encode_text_tokens)
            return states, temb, model.apply({"params": p}, images, method=model.encode_image)

        out = sharding.batch_sharding(mesh, 2), sharding.batch_sharding(mesh, 2)
        self._encode = jax.jit(encode, out_shardings=(sharding.batch_sharding(mesh, 3), *out))
        return self

    def encode_batch(self, images: jax.Array, tokens: jax.Array) -> dict[str, np.ndarray]:
        """Global ``images [B, S, S, 3]`` and ``tokens [B, L]`` on the :meth:`on_mesh` mesh →
        ``text_states [B, L, W]``, ``text_emb``, ``image_emb [B, E]`` (float32), gathered whole
        on every process."""
        from unclip_jax import sharding

        states, temb, iemb = self._encode(self._mesh_params, images, tokens)
        return sharding.fetch({"text_states": states, "text_emb": temb, "image_emb": iemb})

    def captions(self, captions: list[str]) -> dict[str, np.ndarray]:
        """The prior's conditioning for raw captions: ``text_emb [B, E]``, ``text_states
        [B, L, W]`` (float32), ``text_tokens [B, L]`` int32."""
        tokens = self.tokenizer.encode(list(captions), self.context_length)
        states, emb = self.tokens(tokens)
        return {"text_emb": emb, "text_states": states, "text_tokens": tokens}


# ----------------------------------------------------------------------------- writing


def _write_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


def _update_meta(out_dir: Path, meta: dict, split: str, split_info: dict,
                 write: bool = True) -> None:
    path = out_dir / "meta.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    for key in ("clip_workdir", "clip_step", "embed_dim", "context_length", "text_width",
                "shard_size"):
        if key in old and old[key] != meta[key]:
            raise ValueError(f"the cache {str(out_dir)!r} was written with {key}={old[key]!r}, "
                             f"this run has {key}={meta[key]!r}; use another --out folder or "
                             f"delete the old cache")
    if not write:
        return
    new = dict(old, **meta)
    new["splits"] = dict(old.get("splits", {}), **{split: split_info})
    tmp = path.with_name(f".meta.json.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(new, indent=2, sort_keys=True))
    os.replace(tmp, path)


def cache_embeddings(clip_workdir: str | os.PathLike, data_cfg: DataConfig | None, split: str,
                     out_dir: str | os.PathLike, *, batch_size: int = 256,
                     shard_size: int = 4096, tokenizer_path: str | os.PathLike | None = None,
                     progress: bool = True) -> Path:
    """Run the frozen CLIP of ``clip_workdir`` over ``split`` and write ``<out>/<split>/`` shards.

    ``data_cfg``: the dataset (None = the CLIP run's own); its image size and context length
    are forced to the CLIP's. ``shard_size`` must be a multiple of ``batch_size``. Complete
    shards already on disk are skipped (resume). Returns ``<out>/<split>``.

    Every batch is split over all devices (a ``data`` mesh over every process's devices):
    process ``p`` of ``P`` reads and embeds only rows ``[p·B/P, (p+1)·B/P)`` of each batch
    (as training input does), the results are gathered, and process 0 writes the shards — so
    the cache is the same whatever the number of processes. All processes must call it.
    """
    from unclip_jax import input_pipeline, sharding

    if shard_size <= 0 or batch_size <= 0 or shard_size % batch_size:
        raise ValueError(f"shard_size ({shard_size}) must be a positive multiple of batch_size "
                         f"({batch_size})")
    # one process: as many devices as split the batch evenly; several: every device
    split_over = math.gcd(batch_size, jax.device_count()) if jax.process_count() == 1 else -1
    mesh = sharding.make_mesh(sharding.MeshConfig(data=split_over))
    sharding.check_batch_size(batch_size, mesh)
    enc = ClipEncoder(clip_workdir, tokenizer_path).on_mesh(mesh)
    if data_cfg is None:
        data_cfg = _dataclass_from_dict(DataConfig, enc.run_cfg.get("data", {}))
    data_cfg = dataclasses.replace(data_cfg, image_size=enc.cfg.image_size,
                                   context_length=enc.cfg.context_length, num_workers=0)
    batches = input_pipeline.make_batches(data_cfg, split, batch_size=batch_size,
                                          tokenizer=enc.tokenizer, train=False)
    n_total = batches.num_examples
    num_shards = -(-n_total // shard_size)
    out_dir = Path(out_dir)
    split_dir = out_dir / split
    main = sharding.is_main_process()
    if main:
        split_dir.mkdir(parents=True, exist_ok=True)
    meta = {"clip_workdir": str(Path(clip_workdir).absolute()), "clip_step": enc.step,
            "embed_dim": enc.cfg.embed_dim, "context_length": enc.cfg.context_length,
            "text_width": enc.cfg.text_width, "pad_id": enc.cfg.pad_id,
            "shard_size": shard_size,
            "dataset": data_cfg.name}
    split_info = {"count": n_total, "num_shards": num_shards}
    # every process checks an existing cache (and fails early when it mismatches); one writes
    _update_meta(out_dir, meta, split, split_info, write=main)
    sharding.barrier(f"embed {split} meta")
    per_shard = shard_size // batch_size
    # Which shards exist is decided by process 0's view for everyone: all processes must run
    # the same batches (each one is a collective).
    have = np.array([(split_dir / shard_name(k)).is_file() for k in range(num_shards)])
    have = sharding.gather_process_rows(have[None])[0]
    for k in range(num_shards):
        path = split_dir / shard_name(k)
        if have[k]:
            continue
        parts: list[dict] = []
        for i in range(k * per_shard, min((k + 1) * per_shard, batches.num_batches)):
            b = batches.local_numpy(i, captions=True)          # this process's rows only
            first = i * batch_size + batches.process_index * batches.local_batch_size
            host = {"mask": np.asarray(b["mask"], bool),
                    "text_tokens": b["tokens"].astype(np.int32),
                    "index": (b["index"].astype(np.int64) if "index" in b else
                              np.arange(first, first + len(b["mask"]), dtype=np.int64)),
                    "caption": np.array([str(c) for c in b["caption"]], dtype=np.str_)}
            for key in ATTRIBUTES:
                if key in b:
                    host[key] = b[key].astype(np.int32)
            placed = sharding.shard_batch({"image": b["image"], "tokens": b["tokens"]}, mesh)
            out = enc.encode_batch(placed["image"], placed["tokens"])
            host = sharding.gather_process_rows(host)           # every process's rows, in order
            keep = host.pop("mask")
            part = {"text_emb": out["text_emb"].astype(np.float32),
                    "image_emb": out["image_emb"].astype(np.float32),
                    "text_tokens": host.pop("text_tokens"),
                    "text_states": out["text_states"].astype(np.float16), **host}
            parts.append({key: v[keep] for key, v in part.items()})
        arrays = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
        if main:
            _write_atomic(path, arrays)
            if progress:
                print(f"embed {split}: wrote {path} ({len(arrays['index'])} examples)",
                      flush=True)
    sharding.barrier(f"embed {split} written")     # every process sees the finished shards
    return split_dir


# ----------------------------------------------------------------------------- reading


def read_meta(out_dir: str | os.PathLike) -> dict:
    path = Path(out_dir) / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(f"no embedding cache at {str(out_dir)!r} (missing meta.json); "
                                f"build it with `unclip-jax embed --clip CLIP_WORKDIR --split "
                                f"SPLIT --out {out_dir}`")
    return json.loads(path.read_text())


def load_split(out_dir: str | os.PathLike, split: str) -> dict[str, np.ndarray]:
    """Every array of ``<out>/<split>`` with all shards concatenated in order.

    Raises if the split was never cached or if any shard is missing (an interrupted run:
    re-run the ``embed`` command to finish it). Temporary files are never read.
    """
    meta = read_meta(out_dir)
    info = meta.get("splits", {}).get(split)
    if info is None:
        raise FileNotFoundError(f"the cache {str(out_dir)!r} has no split {split!r}; cached: "
                                f"{', '.join(sorted(meta.get('splits', {}))) or 'none'}")
    split_dir = Path(out_dir) / split
    paths = [split_dir / shard_name(k) for k in range(info["num_shards"])]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"the cache of split {split!r} under {str(out_dir)!r} is "
                                f"incomplete ({len(missing)} of {len(paths)} shards missing, "
                                f"first {missing[0]}); re-run the embed command to resume it")
    parts = []
    for p in paths:
        with np.load(p, allow_pickle=False) as z:
            parts.append({k: z[k] for k in z.files})
    out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    if len(out["index"]) != info["count"]:
        raise ValueError(f"the cache of split {split!r} has {len(out['index'])} examples, "
                         f"meta.json says {info['count']}")
    return out
