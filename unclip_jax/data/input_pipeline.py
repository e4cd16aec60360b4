"""TFDS data source → seeded random-access index stream → global batches sharded over (data, fsdp).

Position model (what makes resumption exact): the stream is random access. Flat example
``k`` of a training stream is source index ``perm_e[k mod N]`` with epoch ``e = k // N`` and
``perm_e = np.random.default_rng((seed, e)).permutation(N)`` (a fresh permutation every
epoch); an evaluation stream is ``0 .. N-1`` once. (grain's ``MapDataset.shuffle`` gives the
same kind of stream, but its per-index lookup costs ~100 µs in grain 0.2.18, 6 ms per
64-example batch, so the permutation is numpy's.) Global batch ``i`` is flat examples
``[i·B, (i+1)·B)``; process ``p`` of ``P`` loads rows ``[p·B/P, (p+1)·B/P)`` of it. Random
augmentation for flat example ``k`` uses ``np.random.default_rng((seed, k))``, so it too is a
pure function of the position. A run's data position is therefore one integer,
``Batches.position`` (batches already produced): save it in the checkpoint and resume with
``start=position``.

A batch is a dict of arrays:

* ``image``  ``[B, S, S, 3]`` float32 in [-1, 1] (NHWC). Evaluation, and training without
  ``random_crop``: shorter side resized to ``S`` then centre-cropped (no work when the stored
  images are already ``S×S``). Training with ``random_crop``: a square crop of side
  uniform in [``RANDOM_CROP_MIN``, 1] × the shorter side at a uniform position, resized to
  ``S``. No flips (captions say "left of").
* ``tokens`` ``[B, L]`` int32 (when a tokenizer is given): BOS … EOS, padded.
* ``mask``   ``[B]`` bool: False on the padding rows of the last evaluation batch (their
  content is a copy of a real example), True everywhere else.
* every numeric feature of the source passed through, integers (and bools) as int32, floats as
  float32: e.g. captioned_shapes' ``colour``, ``shape``, ``size`` ``[B, 2]``, ``num_objects``,
  ``relation``, ``index`` ``[B]`` and ``position`` ``[B, 2, 2]``;
* every ``row_features`` array (``{name: [N, …]}``, row ``k`` belonging to source example
  ``k``) at the batch's source rows, e.g. the decoder's cached CLIP image embeddings.

Raw caption strings never go to the device: ``Batches.captions(i)`` returns them.
"""

from __future__ import annotations

import collections
import concurrent.futures
import io
import logging
import threading
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from unclip_jax.core import sharding
from unclip_jax.data import shards
from unclip_jax.core.images import resize_center_crop

log = logging.getLogger(__name__)

RANDOM_CROP_MIN = 0.8     # smallest random-crop side, as a fraction of the shorter image side
_SKIP_KEYS = ("image", "caption", "ok")


# ----------------------------------------------------------------------------- the source


def _version_key(name: str) -> tuple:
    try:
        return tuple(int(p) for p in name.split("."))
    except ValueError:
        return (-1,)


def dataset_dir(name: str, data_dir: str | Path) -> Path:
    """``<data_dir>/<name>[/<version>]`` of a prepared dataset (latest version when unnamed)."""
    root = Path(data_dir).expanduser() / name
    if (root / "dataset_info.json").is_file():
        return root
    versions = [d for d in root.iterdir() if (d / "dataset_info.json").is_file()] \
        if root.is_dir() else []
    if not versions:
        family = name.split("/")[0]
        raise FileNotFoundError(
            f"dataset {name!r} has not been built: no prepared dataset under {str(root)!r}. "
            f"Build it first: `unclip-jax data shapes --resolution R --data-dir {data_dir}` "
            f"for captioned_shapes, `unclip-jax data captions --source SRC --name NAME "
            f"--data-dir {data_dir}` for your own image–caption pairs ({family!r} was asked "
            f"for), or point data.data_dir at the folder that holds it")
    return max(versions, key=lambda d: _version_key(d.name))


def open_source(data_cfg: Any, split: str):
    """A random-access source (``len``, ``[i]`` / ``__getitems__`` → dict of numpy) of a
    prepared TFDS dataset.

    ``data_cfg.name`` is ``family[/config][/version]`` under ``data_cfg.data_dir``. The builder
    code is not needed (the dataset is read from its files). With ``data_cfg.shards`` set, a
    :class:`~unclip_jax.data.shards.ShardIndex` of the split's webdataset shards (random
    access: evaluation sets, embedding caches). Datasets whose features are all
    images, texts and numeric tensors are decoded by ``FastExamples`` (about 5× faster than
    TFDS's generic decoder); others by ``tfds``'s own data source.
    """
    if getattr(data_cfg, "shards", ""):
        return shards.ShardIndex(shard_urls(data_cfg, split))
    path = dataset_dir(data_cfg.name, data_cfg.data_dir)
    builder = tfds.builder_from_directory(str(path))
    splits = sorted(builder.info.splits.keys())
    if split not in splits:
        raise ValueError(f"dataset {data_cfg.name!r} ({path}) has no split {split!r}; "
                         f"available: {', '.join(splits)}")
    source = builder.as_data_source(split=split)
    return FastExamples.wrap(source) or source


class FastExamples:
    """Decodes a TFDS data source's serialized ``tf.train.Example`` records directly.

    Same output as the TFDS source (``image`` uint8 ``[H, W, C]``, ``Text`` as bytes, numeric
    tensors with their declared dtype and shape) for flat feature dicts of ``Image`` (uint8),
    ``Text`` and un-encoded numeric ``Tensor``/``Scalar`` features; ``wrap`` returns None for
    anything else.
    """

    def __init__(self, source, kinds: dict[str, tuple[str, Any, tuple]]):
        self.source = source
        self.records = source.data_source
        self.kinds = kinds

    @classmethod
    def wrap(cls, source) -> "FastExamples | None":
        from tensorflow_datasets.core.features.tensor_feature import Encoding

        records = getattr(source, "data_source", None)
        features = getattr(getattr(source, "dataset_info", None), "features", None)
        if records is None or features is None or not hasattr(records, "__getitems__"):
            return None
        if getattr(source, "decoders", None):
            return None
        kinds = {}
        for key, feat in features.items():
            if isinstance(feat, tfds.features.Image):
                if np.dtype(feat.np_dtype) != np.uint8 or getattr(feat, "_use_colormap", False):
                    return None
                kinds[key] = ("image", np.uint8, tuple(feat.shape))
            elif isinstance(feat, tfds.features.Text):
                kinds[key] = ("text", None, ())
            elif type(feat) in (tfds.features.Tensor, tfds.features.Scalar):
                dtype = np.dtype(feat.np_dtype)
                if (getattr(feat, "_encoding", Encoding.NONE) != Encoding.NONE
                        or dtype.kind not in "iubf" or None in feat.shape):
                    return None
                kinds[key] = ("float" if dtype.kind == "f" else "int", dtype, tuple(feat.shape))
            else:
                return None
        return cls(source, kinds)

    def __len__(self) -> int:
        return len(self.source)

    def _decode(self, record: bytes) -> dict:
        from tensorflow_datasets.proto import tf_example_pb2

        fmap = tf_example_pb2.Example.FromString(record).features.feature
        out = {}
        for key, (kind, dtype, shape) in self.kinds.items():
            f = fmap[key]
            if kind == "image":
                with Image.open(io.BytesIO(f.bytes_list.value[0])) as im:
                    arr = np.asarray(im)
                out[key] = arr if arr.ndim == 3 else arr[..., None]
            elif kind == "text":
                out[key] = f.bytes_list.value[0]
            else:
                vals = f.float_list.value if kind == "float" else f.int64_list.value
                out[key] = np.asarray(vals, dtype=dtype).reshape(shape)
        return out

    def __getitem__(self, i) -> dict:
        return self._decode(self.records[int(i)])

    def __getitems__(self, keys) -> list[dict]:
        return [self._decode(r) for r in self.records.__getitems__(list(keys))]


# ----------------------------------------------------------------------------- preprocessing


def _as_rgb_array(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img)
    if img.ndim == 2:
        img = img[..., None]
    if img.shape[-1] == 1:
        img = np.repeat(img, 3, axis=-1)
    elif img.shape[-1] == 4:
        img = img[..., :3]
    return img


def random_crop(img: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A random square crop (side in [RANDOM_CROP_MIN, 1] × shorter side) resized to ``size``."""
    h, w = img.shape[:2]
    side = max(1, int(round(min(h, w) * rng.uniform(RANDOM_CROP_MIN, 1.0))))
    top = int(rng.integers(0, h - side + 1))
    left = int(rng.integers(0, w - side + 1))
    crop = img[top:top + side, left:left + side]
    if side == size:
        return crop
    return np.asarray(Image.fromarray(crop).resize((size, size), Image.BICUBIC))


def center(img: np.ndarray, size: int) -> np.ndarray:
    if img.shape[0] == size and img.shape[1] == size:
        return img
    return np.asarray(resize_center_crop(Image.fromarray(img), size))


def image_text_batch(images: list[np.ndarray], texts: list[str], valid: np.ndarray,
                     tokenizer=None, context_length: int = 32) -> dict[str, np.ndarray]:
    """``{"image": [B, S, S, 3] float32 in [-1, 1], "mask": [B] bool, "tokens": [B, L] int32}``
    of ``B`` uint8 ``[S, S, 3]`` images and their captions (``tokens`` when a tokenizer is
    given): the model inputs every stream produces."""
    batch = {"image": np.stack(images).astype(np.float32) * np.float32(2 / 255) - 1.0,
             "mask": np.asarray(valid, bool)}
    if tokenizer is not None:
        batch["tokens"] = tokenizer.encode(texts, context_length)
    return batch


# ----------------------------------------------------------------------------- batches


class Batches:
    """Iterator over global batches; ``position`` = batches produced so far (checkpoint it).

    ``next(it)`` returns this process's slice placed on ``mesh`` as global ``jax.Array``s
    sharded over (data, fsdp) when a mesh is given, else the process-local numpy dict.
    Training streams are infinite; evaluation streams stop after ``num_batches``.
    """

    def __init__(self, source, *, batch_size: int, image_size: int, tokenizer=None,
                 context_length: int = 32, seed: int = 0, train: bool = True,
                 random_crop: bool = False, mesh=None, start: int = 0,
                 process_index: int | None = None, process_count: int | None = None,
                 num_workers: int = 0, caption_fn=None, example_fn=None,
                 row_features: dict[str, np.ndarray] | None = None):
        self.source = source
        # example_fn(example, rng) -> example rewrites a stored example before anything else
        # (training only), e.g. the captioned-shapes colour drop (image and caption together);
        # its rng is keyed by (seed, flat position, 2).
        self.example_fn = example_fn if train else None
        # caption_fn(example, rng) -> str replaces the stored caption (training only), e.g. the
        # captioned-shapes attribute dropout; its rng is keyed by (seed, flat position).
        self.caption_fn = caption_fn if train else None
        self.num_examples = len(source)
        if self.num_examples == 0:
            raise ValueError("the data source is empty")
        self.row_features = dict(row_features or {})
        for name, arr in self.row_features.items():
            if len(arr) != self.num_examples:
                raise ValueError(f"row feature {name!r} has {len(arr)} rows; the data source "
                                 f"has {self.num_examples} examples (one row per example, in "
                                 f"source order)")
        pc = jax.process_count() if process_count is None else process_count
        pi = jax.process_index() if process_index is None else process_index
        if batch_size <= 0:
            raise ValueError(f"batch size must be positive, got {batch_size}")
        if batch_size % pc:
            raise ValueError(f"global batch size {batch_size} is not divisible by the process "
                             f"count {pc}; choose a multiple of {pc}")
        if not 0 <= pi < pc:
            raise ValueError(f"process_index {pi} is outside [0, {pc})")
        if mesh is not None:
            sharding.check_batch_size(batch_size, mesh)
            if pc != jax.process_count():
                raise ValueError(f"process_count={pc} is simulated but jax runs "
                                 f"{jax.process_count()} process(es); pass mesh=None to get "
                                 f"numpy slices")
        self.batch_size = batch_size
        self.local_batch_size = batch_size // pc
        self.process_index, self.process_count = pi, pc
        self.image_size = image_size
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.seed = seed
        self.train = train
        self.random_crop = random_crop and train
        self.mesh = mesh
        self.position = int(start)
        self._perms: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
        self.num_batches = None if train else -(-self.num_examples // batch_size)
        self.num_workers = num_workers
        self._lock = threading.Lock()
        self._pool = (concurrent.futures.ThreadPoolExecutor(num_workers)
                      if num_workers > 0 else None)
        self._pending: collections.OrderedDict[int, concurrent.futures.Future] = \
            collections.OrderedDict()

    # -- pure functions of the batch number

    def _flat(self, i: int) -> np.ndarray:
        """Flat stream positions of this process's rows of global batch ``i``."""
        lo = i * self.batch_size + self.process_index * self.local_batch_size
        return np.arange(lo, lo + self.local_batch_size, dtype=np.int64)

    def _indices(self, flat: np.ndarray) -> tuple[list[int], np.ndarray]:
        """Source indices and validity mask of flat stream positions."""
        if self.train:
            n = self.num_examples
            epochs, pos = np.divmod(flat, n)
            idx = np.empty_like(flat)
            for e in np.unique(epochs):
                sel = epochs == e
                idx[sel] = self.permutation(int(e))[pos[sel]]
            return idx.tolist(), np.ones(len(flat), bool)
        valid = flat < self.num_examples
        idx = np.where(valid, flat, self.num_examples - 1)
        return idx.tolist(), valid

    def permutation(self, epoch: int) -> np.ndarray:
        """The order of the source in training epoch ``epoch`` (a pure function of seed, epoch)."""
        with self._lock:
            perm = self._perms.get(epoch)
            if perm is None:
                perm = np.random.default_rng((self.seed, epoch)).permutation(self.num_examples)
                self._perms[epoch] = perm
                while len(self._perms) > 4:
                    self._perms.popitem(last=False)
            return perm

    def _read(self, idx: list[int]) -> list[dict]:
        getitems = getattr(self.source, "__getitems__", None)
        return list(getitems(idx)) if getitems is not None else [self.source[j] for j in idx]

    def local_numpy(self, i: int, *, captions: bool = False) -> dict[str, np.ndarray]:
        """This process's slice of global batch ``i`` as numpy (``captions`` adds a ``caption``
        object array of str)."""
        if self.num_batches is not None and not 0 <= i < self.num_batches:
            raise IndexError(f"evaluation batch {i} out of range [0, {self.num_batches})")
        flat = self._flat(i)
        idx, valid = self._indices(flat)
        examples = self._read(idx)
        if self.example_fn is not None:
            examples = [self.example_fn(ex, np.random.default_rng((self.seed, int(k), 2)))
                        for ex, k in zip(examples, flat)]
        s = self.image_size
        imgs = [_as_rgb_array(ex["image"]) for ex in examples]
        if self.random_crop:
            imgs = [random_crop(im, s, np.random.default_rng((self.seed, int(k))))
                    for im, k in zip(imgs, flat)]
        else:
            imgs = [center(im, s) for im in imgs]
        if "ok" in examples[0]:        # shard samples whose image did not decode: masked out
            valid = valid & np.array([bool(ex["ok"]) for ex in examples])
        if self.caption_fn is not None:
            texts = [self.caption_fn(ex, np.random.default_rng((self.seed, int(k), 1)))
                     for ex, k in zip(examples, flat)]
        else:
            texts = [_text(ex.get("caption", b"")) for ex in examples]
        batch = image_text_batch(imgs, texts, valid, self.tokenizer, self.context_length)
        for key, value in examples[0].items():
            kind = np.asarray(value).dtype.kind
            if key in _SKIP_KEYS or kind not in "iubf":
                continue
            dtype = np.float32 if kind == "f" else np.int32
            batch[key] = np.stack([np.asarray(ex[key]) for ex in examples]).astype(dtype)
        for name, arr in self.row_features.items():
            batch[name] = np.asarray(arr[idx])
        if captions:
            batch["caption"] = np.array(texts, dtype=object)
        return batch

    def captions(self, i: int) -> list[str]:
        """This process's raw caption strings of global batch ``i``."""
        flat = self._flat(i)
        idx, valid = self._indices(flat)
        return [_text(ex.get("caption", b"")) if v else ""
                for ex, v in zip(self._read(idx), valid)]

    # -- iteration

    def _get(self, i: int) -> dict:
        if self._pool is None:
            return self.local_numpy(i)
        for stale in [j for j in self._pending if j < i]:
            self._pending.pop(stale).cancel()
        ahead = i + self.num_workers
        if self.num_batches is not None:
            ahead = min(ahead, self.num_batches - 1)
        for j in range(i, ahead + 1):
            if j not in self._pending:
                self._pending[j] = self._pool.submit(self.local_numpy, j)
        return self._pending.pop(i).result()

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.num_batches is not None and self.position >= self.num_batches:
            raise StopIteration
        batch = self._get(self.position)
        self.position += 1
        if self.mesh is not None:
            return sharding.shard_batch(batch, self.mesh)
        return batch

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("a training stream is infinite; it has no len()")
        return self.num_batches

    def seek(self, position: int) -> None:
        """Continue from batch ``position`` (what a checkpoint saved)."""
        self.position = int(position)

    def close(self) -> None:
        if self._pool is not None:
            for f in self._pending.values():
                f.cancel()
            self._pending.clear()
            self._pool.shutdown(wait=False)
            self._pool = None


class MappedBatches:
    """A batch stream transformed per batch: ``fn(position, batch) -> batch`` on the wrapped
    stream's process-local numpy batches (``position`` = the batch's index in the stream, i.e.
    the update it feeds), placed on ``mesh`` when given. ``position`` is the wrapped stream's,
    so the data position a checkpoint stores is unchanged. Used by models whose inputs are
    derived from the images (dVAE codes for DALL·E, the annealing step for the dVAE)."""

    def __init__(self, stream, fn, mesh=None):
        self.stream, self.fn, self.mesh = stream, fn, mesh

    @property
    def position(self) -> int:
        return self.stream.position

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        position = self.stream.position
        batch = self.fn(position, next(self.stream))
        return sharding.shard_batch(batch, self.mesh) if self.mesh is not None else batch

    def __getattr__(self, name: str):
        # the wrapped stream's state()/restore()/skipped_samples()/close(), where it has them
        if name in ("state", "restore", "skipped_samples", "close"):
            return getattr(self.stream, name)
        raise AttributeError(name)


class EmbeddingBatches:
    """Training batches of in-memory arrays (the cached CLIP embeddings the priors train on),
    the embedding counterpart of :class:`Batches`: batch ``i`` is a pure function of
    ``(seed, i)``. Flat example ``k`` is row ``perm_e[k mod N]``, ``perm_e`` a fresh permutation
    seeded by ``(seed, e)`` for epoch ``e = k // N``; process ``p`` of ``P`` takes its ``B/P``
    rows of every global batch. ``position`` = batches produced so far (the data position a
    checkpoint stores). ``keys``: the arrays batched (default all); float16 arrays (the
    cache's token states) come out as float32. Placed on ``mesh`` when one is given."""

    def __init__(self, arrays: dict[str, np.ndarray], batch_size: int, *, seed: int = 0,
                 start: int = 0, mesh=None, keys: Sequence[str] | None = None):
        keys = list(arrays) if keys is None else list(keys)
        self.arrays = {k: arrays[k] for k in keys}
        self.n = len(self.arrays[keys[0]])
        pc = jax.process_count()
        if batch_size % pc:
            raise ValueError(f"batch size {batch_size} does not split over {pc} processes")
        self.batch_size, self.local = batch_size, batch_size // pc
        self.offset = jax.process_index() * self.local
        self.seed, self.position, self.mesh = seed, int(start), mesh
        self._perms: dict[int, np.ndarray] = {}

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) >= 4:
                self._perms.pop(next(iter(self._perms)))
            self._perms[epoch] = np.random.default_rng((self.seed, epoch)).permutation(self.n)
        return self._perms[epoch]

    def batch(self, i: int) -> dict[str, np.ndarray]:
        """This process's rows of global batch ``i``."""
        flat = i * self.batch_size + self.offset + np.arange(self.local)
        epochs, pos = np.divmod(flat, self.n)
        idx = np.concatenate([self.permutation(int(e))[pos[epochs == e]]
                              for e in np.unique(epochs)])
        return {k: v[idx].astype(np.float32) if v.dtype == np.float16 else v[idx]
                for k, v in self.arrays.items()}

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        b = self.batch(self.position)
        self.position += 1
        return sharding.shard_batch(b, self.mesh) if self.mesh is not None else b


# ----------------------------------------------------------------------------- shard streams

# The state of one reader, saved in checkpoints as one row of ints (``ShardStream.state``):
STREAM_FIELDS = ("epoch", "shard", "offset", "window", "index") + tuple(
    f"skipped_{r}" for r in shards.SKIP_REASONS)


class ShardStream:
    """The deterministic sample sequence of reader ``stream`` of ``num_streams`` over shards.

    Position model. Epoch ``e`` visits the shards in the order ``perm_e =
    default_rng((seed, e)).permutation(num_shards)``; reader ``r`` reads ``perm_e[r::R]``
    (so every shard is read by exactly one reader per epoch, and readers go through epochs at
    their own pace). Its usable samples, in shard then tar order, fill a shuffle buffer of
    ``buffer`` samples (raw bytes), which is emitted in the seeded order
    ``default_rng((seed, r, window)).permutation(buffer)`` before it is refilled — a windowed
    shuffle, whose position is a handful of integers: where the current window started
    (epoch, shard of the epoch's list, sample group in the shard), the window number and the
    index in it (``state``). A reader resumed from that state re-reads the window (at most
    ``buffer`` samples plus the part of one shard before it) and emits what the uninterrupted
    reader would have. (webdataset's own reservoir shuffle cannot be restored without
    replaying the whole stream, so the order is ours and the library reads the tar format.)

    ``next()`` returns ``(image [H, W, 3] uint8, caption str, shard, offset, n)`` with ``n`` the
    sample's number in this reader's sequence (its augmentation key); unusable samples are
    skipped and counted by reason in ``skipped``.
    """

    def __init__(self, urls: list[str], stream: int, num_streams: int, *, seed: int = 0,
                 buffer: int = 1000, decode_size: int | None = None, state=None):
        self.urls, self.stream, self.num_streams = urls, stream, num_streams
        self.seed, self.buffer, self.decode_size = seed, max(1, int(buffer)), decode_size
        state = [0] * len(STREAM_FIELDS) if state is None else [int(v) for v in state]
        self._cursor = tuple(state[:3])            # (epoch, shard of the list, group) of window
        self.window, self.index = state[3], state[4]
        self.skipped = dict(zip(shards.SKIP_REASONS, state[5:]))
        self._reader = self._read_from(*self._cursor)
        self._items: list = []
        # a restored state's counts already include the skips of reading its window
        self._fill(count=self.window == 0 and self.index == 0)

    def shard_order(self, epoch: int) -> list[int]:
        perm = np.random.default_rng((self.seed, epoch)).permutation(len(self.urls))
        return perm[self.stream::self.num_streams].tolist()

    def _read_from(self, epoch: int, pos: int, offset: int):
        """Raw samples from the cursor on: ``(next cursor, sample | reason str)``."""
        while True:
            order = self.shard_order(epoch)
            usable_in_epoch = 0
            for j in range(pos, len(order)):
                shard = order[j]
                for k, sample in shards.read_shard(self.urls[shard], skip=offset):
                    if sample is None:
                        yield (epoch, j + 1, 0), "bad_shard"
                        break
                    why = shards.problem(sample)
                    usable_in_epoch += why is None
                    yield (epoch, j, k + 1), why or (shard, k, sample)
                offset = 0
            if pos == 0 and usable_in_epoch == 0:
                names = ", ".join(self.urls[i] for i in order[:3])
                raise ValueError(f"reader {self.stream} of {self.num_streams} found no usable "
                                 f"sample in a whole epoch of its {len(order)} shard(s) ({names}"
                                 f"{' …' if len(order) > 3 else ''}): every sample lacks an "
                                 f"image (jpg/png/webp) or a caption (txt), or the shards are "
                                 f"not tar files")
            epoch, pos = epoch + 1, 0

    def _fill(self, count: bool = True) -> None:
        """Read the next window (``buffer`` usable samples) from the cursor, in emit order."""
        items = []
        cursor = self._cursor
        while len(items) < self.buffer:
            cursor, got = next(self._reader)
            if isinstance(got, str):
                if count:
                    self.skipped[got] += 1
                continue
            items.append(got)
        order = np.random.default_rng((self.seed, self.stream, self.window)).permutation(
            len(items))
        self._items = [items[i] for i in order]
        self._next_cursor = cursor

    def state(self) -> list[int]:
        """This reader's position (``STREAM_FIELDS``): restore it with ``state=``."""
        return [*self._cursor, self.window, self.index, *self.skipped.values()]

    def next(self) -> tuple[np.ndarray, str, int, int, int]:
        while True:
            if self.index == len(self._items):
                self._cursor, self.window, self.index = self._next_cursor, self.window + 1, 0
                self._fill()
            shard, k, sample = self._items[self.index]
            n = self.window * self.buffer + self.index
            self.index += 1
            img = shards.decode_image(shards.image_bytes(sample), self.decode_size)
            if img is None:
                self.skipped["undecodable"] += 1
                continue
            return img, shards.caption(sample), shard, k, n


class StreamBatches:
    """Training batches streamed from webdataset shards, split over processes and readers.

    Process ``p`` of ``P`` runs ``W = max(1, num_workers)`` readers (:class:`ShardStream`
    ``p·W + w`` of ``P·W``; each a thread when ``num_workers > 0``, decoding, converting to RGB
    and resizing in parallel); row ``j`` of its ``B/P`` rows of batch ``i`` comes from reader
    ``(i·B/P + j) mod W``. Each process reads only its own shards. A batch is
    ``{"image", "mask", "tokens"?, "shard", "offset"}`` (``shard``/``offset``: which sample —
    index in the sorted shard list, sample group in the tar). Augmentation (``random_crop``)
    for reader sample ``n`` uses ``default_rng((seed, reader, n))``.

    ``state()`` (a collective: every process calls it at the same step) is the JSON data
    position of every reader of every process, saved in the checkpoint; ``restore(state)``
    before the first batch resumes exactly there. ``skipped_samples()`` (also a collective)
    sums the skipped-sample counts of all readers.
    """

    def __init__(self, urls: list[str], *, batch_size: int, image_size: int, tokenizer=None,
                 context_length: int = 32, seed: int = 0, random_crop: bool = False,
                 mesh=None, start: int = 0, process_index: int | None = None,
                 process_count: int | None = None, num_workers: int = 0,
                 shuffle_buffer: int = 1000):
        pc = jax.process_count() if process_count is None else process_count
        pi = jax.process_index() if process_index is None else process_index
        if batch_size <= 0 or batch_size % pc:
            raise ValueError(f"global batch size {batch_size} is not a positive multiple of "
                             f"the process count {pc}")
        if mesh is not None:
            sharding.check_batch_size(batch_size, mesh)
        self.num_workers = num_workers
        w = max(1, num_workers)
        if len(urls) < pc * w:
            raise ValueError(
                f"{len(urls)} shard(s) for {pc} process(es) × {w} loader worker(s) = {pc * w} "
                f"readers: every reader needs at least one shard of its own; accepted: at "
                f"least {pc * w} shards, or fewer data.num_workers (readers per process)")
        self.urls = urls
        self.batch_size, self.local_batch_size = batch_size, batch_size // pc
        self.process_index, self.process_count, self.readers = pi, pc, w
        self.image_size, self.tokenizer, self.context_length = image_size, tokenizer, \
            context_length
        self.seed, self.random_crop, self.mesh = seed, random_crop, mesh
        self.shuffle_buffer = shuffle_buffer
        self.position = int(start)
        self.num_batches = None
        self.train = True
        self._states: list[list[int]] | None = None if start else \
            [[0] * len(STREAM_FIELDS) for _ in range(w)]
        self._streams: list[ShardStream] | None = None
        self._queues: list | None = None
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()

    # -- readers

    def _open(self) -> None:
        if self._states is None:
            raise ValueError(f"a shard stream started at batch {self.position} needs the "
                             f"readers' positions: call restore() with the checkpoint's data "
                             f"state")
        first = self.process_index * self.readers
        total = self.readers * self.process_count
        self._streams = [ShardStream(self.urls, first + w, total, seed=self.seed,
                                     buffer=self.shuffle_buffer, decode_size=self.image_size,
                                     state=self._states[w]) for w in range(self.readers)]
        if self.num_workers > 0:
            import queue

            depth = 2 * -(-self.local_batch_size // self.readers) + 1
            self._queues = [queue.Queue(depth) for _ in self._streams]
            self._threads = [threading.Thread(target=self._work, args=(w,), daemon=True,
                                              name=f"shard-reader-{first + w}")
                             for w in range(self.readers)]
            for t in self._threads:
                t.start()

    def _item(self, w: int):
        """Reader ``w``'s next sample, preprocessed, with its state after it."""
        stream = self._streams[w]
        img, text, shard, k, n = stream.next()
        img = _as_rgb_array(img)
        if self.random_crop:
            img = random_crop(img, self.image_size,
                              np.random.default_rng((self.seed, stream.stream, n)))
        else:
            img = center(img, self.image_size)
        return img, text, shard, k, stream.state()

    def _work(self, w: int) -> None:
        q = self._queues[w]
        while not self._stop.is_set():
            try:
                item = self._item(w)
            except BaseException as e:   # noqa: BLE001 — handed to the consumer, which raises
                item = e
            while not self._stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    break
                except Exception:   # noqa: BLE001 — queue.Full: check for stop, retry
                    continue
            if isinstance(item, BaseException):
                return

    def _take(self, w: int):
        if self._queues is None:
            return self._item(w)
        item = self._queues[w].get()
        if isinstance(item, BaseException):
            raise item
        return item

    # -- batches

    def local_numpy(self) -> dict[str, np.ndarray]:
        """This process's rows of the next global batch (advances the stream)."""
        if self._streams is None:
            self._open()
        b, first = self.local_batch_size, self.position * self.local_batch_size
        rows = [self._take((first + j) % self.readers) for j in range(b)]
        for j, row in enumerate(rows):
            self._states[(first + j) % self.readers] = row[4]
        batch = image_text_batch([r[0] for r in rows], [r[1] for r in rows], np.ones(b, bool),
                                 self.tokenizer, self.context_length)
        batch["shard"] = np.array([r[2] for r in rows], np.int32)
        batch["offset"] = np.array([r[3] for r in rows], np.int32)
        self.position += 1
        return batch

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = self.local_numpy()
        return sharding.shard_batch(batch, self.mesh) if self.mesh is not None else batch

    # -- position

    def state(self) -> dict:
        """``{"position", "readers": [P, W], "num_shards", "streams": [[…] × P·W]}`` (every
        process's readers, in order; the same on every process). A collective."""
        if self._states is None:
            raise ValueError("the stream has no reader state yet (restore() was not called)")
        every = sharding.gather_process_rows(np.array(self._states, np.int64))
        return {"position": int(self.position), "num_shards": len(self.urls),
                "readers": [self.process_count, self.readers],
                "fields": list(STREAM_FIELDS), "streams": np.asarray(every).tolist()}

    def restore(self, state: dict) -> None:
        """Continue from a checkpoint's data state (before the first batch)."""
        if self._streams is not None:
            raise ValueError("restore() must be called before the first batch")
        if "streams" not in state:
            raise ValueError("the checkpoint's data position is a batch number of a "
                             "random-access dataset (ArrayRecord), not shard readers' "
                             "positions: it was trained on data.name, not data.shards; "
                             "resume it with the same data settings")
        saved = tuple(state["readers"])
        if saved != (self.process_count, self.readers) or state["num_shards"] != len(self.urls):
            raise ValueError(
                f"the checkpoint's shard readers were {saved[0]} process(es) × {saved[1]} "
                f"loader worker(s) over {state['num_shards']} shards; this run has "
                f"{self.process_count} × {self.readers} over {len(self.urls)}: a shard stream "
                f"resumes exactly only with the same shards, process count and "
                f"data.num_workers")
        first = self.process_index * self.readers
        self._states = [list(map(int, row))
                        for row in state["streams"][first:first + self.readers]]
        self.position = int(state["position"])

    def skipped_samples(self) -> dict[str, int]:
        """Samples skipped so far by reason, summed over every reader of every process, as of
        the last batch produced (a collective)."""
        states = self._states or [[0] * len(STREAM_FIELDS)] * self.readers
        local = np.array([row[5:] for row in states], np.int64).sum(0)[None]
        total = np.asarray(sharding.gather_process_rows(local)).sum(0)
        return dict(zip(shards.SKIP_REASONS, map(int, total)))

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=5)
        self._threads = []


def _text(value: Any) -> str:
    if isinstance(value, (bytes, np.bytes_)):
        return bytes(value).decode("utf-8", errors="replace")
    return str(value)


def shard_urls(data_cfg: Any, split: str) -> list[str]:
    """The shards of ``split`` when the data comes from webdataset shards (``data.shards`` for
    "train", ``data.eval_shards`` for any other split)."""
    if split == "train":
        return shards.expand_shards(data_cfg.shards)
    if not data_cfg.eval_shards:
        raise ValueError(f"the {split!r} split of webdataset data is read from data.eval_shards, "
                         f"which is empty; set data.eval_shards to shards held out from "
                         f"data.shards, or turn the evaluation off (train.eval_every=0 "
                         f"train.eval_at_end=false)")
    return shards.expand_shards(data_cfg.eval_shards)


def make_batches(data_cfg: Any, split: str, *, batch_size: int, tokenizer=None, mesh=None,
                 train: bool, start: int = 0, process_index: int | None = None,
                 process_count: int | None = None, caption_fn=None,
                 example_fn=None, row_features: dict[str, np.ndarray] | None = None
                 ) -> Batches | StreamBatches:
    """The batches of ``split`` of the data a ``DataConfig`` names.

    ``data.shards`` set: training streams the shards (:class:`StreamBatches`; resume with
    ``restore(checkpoint data state)``), evaluation reads ``split``'s shards by random access
    (:class:`Batches` over a :class:`~unclip_jax.data.shards.ShardIndex`). Otherwise the
    prepared TFDS dataset ``data.name`` (:class:`Batches`).
    """
    if data_cfg.shards and train:
        if split != "train":
            raise ValueError(f"a training stream reads the train split, not {split!r}")
        if caption_fn is not None or example_fn is not None or row_features:
            raise ValueError("caption/example rewrites and row features (cached embeddings "
                             "joined by source row) need a random-access dataset; with "
                             "data.shards turn them off (data.caption_augment=0, "
                             "data.colour_drop=0, model.embeddings_dir='')")
        return StreamBatches(shard_urls(data_cfg, split), batch_size=batch_size,
                             image_size=data_cfg.image_size, tokenizer=tokenizer,
                             context_length=data_cfg.context_length,
                             seed=data_cfg.shuffle_seed, random_crop=data_cfg.random_crop,
                             mesh=mesh, start=start, process_index=process_index,
                             process_count=process_count, num_workers=data_cfg.num_workers,
                             shuffle_buffer=data_cfg.shuffle_buffer)
    return Batches(open_source(data_cfg, split), batch_size=batch_size,
                   image_size=data_cfg.image_size, tokenizer=tokenizer,
                   context_length=data_cfg.context_length, seed=data_cfg.shuffle_seed,
                   train=train, random_crop=data_cfg.random_crop, mesh=mesh, start=start,
                   process_index=process_index, process_count=process_count,
                   num_workers=data_cfg.num_workers, caption_fn=caption_fn,
                   example_fn=example_fn, row_features=row_features)
