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
from typing import Any

import jax
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from unclip_jax import sharding
from unclip_jax.images import resize_center_crop

log = logging.getLogger(__name__)

RANDOM_CROP_MIN = 0.8     # smallest random-crop side, as a fraction of the shorter image side
_SKIP_KEYS = ("image", "caption")


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
    code is not needed (the dataset is read from its files). Datasets whose features are all
    images, texts and numeric tensors are decoded by ``FastExamples`` (about 5× faster than
    TFDS's generic decoder); others by ``tfds``'s own data source.
    """
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
        batch = {"image": np.stack(imgs).astype(np.float32) * np.float32(2 / 255) - 1.0,
                 "mask": valid}
        if self.caption_fn is not None:
            texts = [self.caption_fn(ex, np.random.default_rng((self.seed, int(k), 1)))
                     for ex, k in zip(examples, flat)]
        else:
            texts = [_text(ex.get("caption", b"")) for ex in examples]
        if self.tokenizer is not None:
            batch["tokens"] = self.tokenizer.encode(texts, self.context_length)
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


def _text(value: Any) -> str:
    if isinstance(value, (bytes, np.bytes_)):
        return bytes(value).decode("utf-8", errors="replace")
    return str(value)


def make_batches(data_cfg: Any, split: str, *, batch_size: int, tokenizer=None, mesh=None,
                 train: bool, start: int = 0, process_index: int | None = None,
                 process_count: int | None = None, caption_fn=None,
                 example_fn=None, row_features: dict[str, np.ndarray] | None = None
                 ) -> Batches:
    """``Batches`` over ``split`` of the dataset named by a ``DataConfig``."""
    return Batches(open_source(data_cfg, split), batch_size=batch_size,
                   image_size=data_cfg.image_size, tokenizer=tokenizer,
                   context_length=data_cfg.context_length, seed=data_cfg.shuffle_seed,
                   train=train, random_crop=data_cfg.random_crop, mesh=mesh, start=start,
                   process_index=process_index, process_count=process_count,
                   num_workers=data_cfg.num_workers, caption_fn=caption_fn,
                   example_fn=example_fn, row_features=row_features)
