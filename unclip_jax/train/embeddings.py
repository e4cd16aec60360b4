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

import jax
import numpy as np

from unclip_jax.core import sharding
from unclip_jax.core.config import DataConfig
from unclip_jax.core.text import Tokenizer
from unclip_jax.data import input_pipeline
from unclip_jax.models.clip import CLIPConfig, FrozenCLIP
from unclip_jax.train import runs
from unclip_jax.train.tasks.common import ensure_dataset

SHARD_RE = re.compile(r"shard_(\d{5})\.npz")
ATTRIBUTES = ("colour", "shape", "size", "num_objects", "relation")


def shard_name(k: int) -> str:
    return f"shard_{k:05d}.npz"


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
    if shard_size <= 0 or batch_size <= 0 or shard_size % batch_size:
        raise ValueError(f"shard_size ({shard_size}) must be a positive multiple of batch_size "
                         f"({batch_size})")
    # one process: as many devices as split the batch evenly; several: every device
    split_over = math.gcd(batch_size, jax.device_count()) if jax.process_count() == 1 else -1
    mesh = sharding.make_mesh(sharding.MeshConfig(data=split_over))
    sharding.check_batch_size(batch_size, mesh)
    run = runs.load_run(clip_workdir, CLIPConfig)
    clip_cfg = run.model
    tokenizer = Tokenizer.load(tokenizer_path or runs.tokenizer_path(clip_workdir))
    # the params copied onto every device once; each batch split over the mesh
    clip = sharding.from_host(FrozenCLIP(clip_cfg, run.params), sharding.replicated(mesh))

    def encode(c, images, tokens):
        text = c.encode_text(tokens)
        return {"text_states": text["states"], "text_emb": text["emb"],
                "image_emb": c.embed_images(images)}

    rows = sharding.batch_sharding(mesh, 2)
    encode = jax.jit(encode, out_shardings={"text_states": sharding.batch_sharding(mesh, 3),
                                            "text_emb": rows, "image_emb": rows})
    if data_cfg is None:
        data_cfg = run.config.data
    data_cfg = dataclasses.replace(data_cfg, image_size=clip_cfg.image_size,
                                   context_length=clip_cfg.context_length, num_workers=0)
    batches = input_pipeline.make_batches(data_cfg, split, batch_size=batch_size,
                                          tokenizer=tokenizer, train=False)
    n_total = batches.num_examples
    num_shards = -(-n_total // shard_size)
    out_dir = Path(out_dir)
    split_dir = out_dir / split
    main = sharding.is_main_process()
    if main:
        split_dir.mkdir(parents=True, exist_ok=True)
    meta = {"clip_workdir": str(Path(clip_workdir).absolute()), "clip_step": run.step,
            "embed_dim": clip_cfg.embed_dim, "context_length": clip_cfg.context_length,
            "text_width": clip_cfg.text_width, "pad_id": clip_cfg.pad_id,
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
            out = sharding.fetch(encode(clip, placed["image"], placed["tokens"]))
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


def ensure_cache(cache_dir, clip_workdir: str, data_cfg, splits=("train",)) -> dict:
    """Build the missing splits of the embedding cache ``cache_dir`` from ``clip_workdir`` (the
    priors' and the decoder's ``model.embeddings_dir``); return its meta."""
    for split in splits:
        try:
            load_split(cache_dir, split)
            continue
        except FileNotFoundError as e:
            if not clip_workdir:
                raise FileNotFoundError(f"{e}; or set model.clip_workdir so the prior builds "
                                        f"the cache itself") from None
        ensure_dataset(data_cfg)
        print(f"caching CLIP embeddings of {data_cfg.name}/{split} → {cache_dir}", flush=True)
        cache_embeddings(clip_workdir, data_cfg, split, cache_dir)
    return read_meta(cache_dir)
