"""What every family's task shares: the dataset and tokenizer a run needs, built on first use
by process 0 while the others wait, and the uint8 picture of a sample grid.

A task fixes the pieces of the config that follow from the data (vocabulary size and special
token ids from the tokenizer, input resolution and context length from the data config), so
the config saved with the checkpoint is the one the model was really built with.
"""

from __future__ import annotations

import re
from pathlib import Path

import jax
import numpy as np

from unclip_jax.core import sharding
from unclip_jax.core.config import DataConfig
from unclip_jax.core.images import image_grid  # noqa: F401  (re-exported)
from unclip_jax.core.text import Tokenizer, train_tokenizer_from_dataset
from unclip_jax.data import input_pipeline


def ensure_dataset(data_cfg: DataConfig) -> None:
    """Build ``captioned_shapes/r<N>`` on first use (it is procedural); other datasets must
    already be prepared (``open_source`` says how when they are not). Several processes:
    process 0 builds it (into the shared ``data_dir``) while the others wait. Webdataset
    shards (``data.shards``) are read as they are: nothing to build."""
    if data_cfg.shards or data_cfg.name.partition("/")[0] != "captioned_shapes":
        return
    resolution = _shapes_to_build(data_cfg)      # every process: the same error, if any
    if resolution is not None and sharding.is_main_process():
        _build_shapes(data_cfg, resolution)
    sharding.barrier(f"dataset {data_cfg.name}")


def _shapes_to_build(data_cfg: DataConfig) -> int | None:
    """The resolution of a ``captioned_shapes/r<N>`` that is not built yet (None: nothing to
    build, or not captioned_shapes); FileNotFoundError for a missing one of another name."""
    family, _, config = data_cfg.name.partition("/")
    if family != "captioned_shapes" or data_cfg.shards:
        return None
    try:
        input_pipeline.dataset_dir(data_cfg.name, data_cfg.data_dir)
        return None
    except FileNotFoundError:
        match = re.fullmatch(r"r(\d+)", config)
        if not match:
            raise
    return int(match.group(1))


def _build_shapes(data_cfg: DataConfig, resolution: int) -> None:
    from unclip_jax.data.captioned_shapes import build_captioned_shapes

    print(f"building {data_cfg.name} into {data_cfg.data_dir} ...", flush=True)
    build_captioned_shapes(data_cfg.data_dir, resolution=resolution)


def tokenizer_path(data_cfg: DataConfig, workdir: str | Path) -> Path:
    return Path(data_cfg.tokenizer) if data_cfg.tokenizer else Path(workdir) / "tokenizer.model"


def ensure_tokenizer(data_cfg: DataConfig, workdir: str | Path) -> Tokenizer:
    """Load the configured tokenizer, training it on the train split's captions if missing.

    Several processes: process 0 trains it (into the shared workdir), the others wait."""
    path = tokenizer_path(data_cfg, workdir)
    if data_cfg.tokenizer and not path.is_file():
        raise FileNotFoundError(f"tokenizer {str(path)!r} (data.tokenizer) does not exist; "
                                "train one with `unclip-jax tokenizer train` or leave "
                                "data.tokenizer empty to train it in the workdir")
    if sharding.is_main_process() and not path.is_file():
        resolution = _shapes_to_build(data_cfg)
        if resolution is not None:
            _build_shapes(data_cfg, resolution)
        _train_tokenizer(data_cfg, path)
    sharding.barrier(f"tokenizer {path}")
    if not path.is_file():
        raise FileNotFoundError(f"process {jax.process_index()} cannot see the tokenizer "
                                f"{str(path)!r} that process 0 wrote: every process needs the "
                                f"same --workdir on a file system all hosts share (or "
                                f"data.tokenizer on one)")
    return Tokenizer.load(path)


TOKENIZER_CAPTIONS = 200_000    # captions a tokenizer is trained on (at most)


def _train_tokenizer(data_cfg: DataConfig, path: Path) -> Tokenizer:
    path.parent.mkdir(parents=True, exist_ok=True)
    if data_cfg.shards:           # the first captions of the shards, in order (no index)
        from unclip_jax.data import shards

        print(f"training a {data_cfg.vocab_size}-token BPE tokenizer on the captions of "
              f"{data_cfg.shards} → {path}", flush=True)
        urls = input_pipeline.shard_urls(data_cfg, "train")
        return Tokenizer.train(shards.iter_captions(urls, TOKENIZER_CAPTIONS), path,
                               data_cfg.vocab_size)
    print(f"training a {data_cfg.vocab_size}-token BPE tokenizer on {data_cfg.name} → {path}",
          flush=True)
    return train_tokenizer_from_dataset(input_pipeline.open_source(data_cfg, "train"), path,
                                        data_cfg.vocab_size, max_captions=TOKENIZER_CAPTIONS)


def ema_or_raw(cfg, state):
    """The params an evaluation or a sample grid reads: the EMA params when the run keeps them."""
    return state.ema_params if cfg.train.ema_decay > 0 else state.params


def sample_placer(cfg, n: int):
    """``place(tree)``: host arrays of ``n`` rows (a sample grid's, an evaluation's) split over
    the run's mesh as a training batch is, so they sample with every device; when ``n`` does not
    split over the mesh the rows are padded (the last one repeated) to the next multiple, and
    the caller keeps the first ``n`` rows of the output."""
    mesh = sharding.make_mesh(cfg.mesh)
    m = -(-n // sharding.batch_divisor(mesh)) * sharding.batch_divisor(mesh)

    def place(tree):
        tree = jax.tree.map(lambda x: np.concatenate([x, np.repeat(x[-1:], m - n, 0)])
                            if m > n else x, tree)
        return sharding.from_host(tree, lambda ndim: sharding.batch_sharding(mesh, ndim))

    return place


def validation_rows(cfg, n: int, tokenizer=None) -> dict:
    """The first ``n`` validation examples (captions included), the same rows on every
    process."""
    val = input_pipeline.make_batches(cfg.data, "validation", batch_size=n, tokenizer=tokenizer,
                                      train=False, process_index=0, process_count=1)
    return val.local_numpy(0, captions=True)
