"""img2dataset / webdataset tar shards: listing, streaming, random access, decoding.

An img2dataset output folder holds shards ``00000.tar``, ``00001.tar``, … Each shard is a tar of
samples whose members share a key (the member name up to the first dot of its base name):
``000000000.jpg`` (or ``.png``, ``.webp``), ``000000000.txt`` (the caption) and
``000000000.json`` (metadata, not read), in order. Shards are named by a pattern: a local
path or an fsspec URL (``gs://…``, ``s3://…``, ``file://…``, ``memory://…``) with brace ranges
(``{00000..00099}``) and/or glob characters (``*``, ``?``, ``[…]``); several patterns are
separated by whitespace or ``::``.

The tar format is read by the ``webdataset`` library (``tar_file_iterator`` + ``group_by_keys``,
streaming: the training input); evaluation sets, which need random access, are indexed once with
the standard ``tarfile`` module (member offsets) and read by seeking.

A sample is *usable* when it has an image member and a caption member; the others are skipped
and counted (``no_image``, ``no_caption``). An image that cannot be decoded is skipped and
counted (``undecodable``); a shard that is not a tar, or is truncated, ends where it breaks and
is counted (``bad_shard``): the samples before the break are read.
"""

from __future__ import annotations

import glob as globlib
import io
import os
import re
import tarfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXT = "txt"
SKIP_REASONS = ("no_image", "no_caption", "undecodable", "bad_shard")
_GLOB_CHARS = re.compile(r"[*?\[]")


# ----------------------------------------------------------------------------- listing


def _is_url(path: str) -> bool:
    return "://" in path


def expand_shards(pattern: str) -> list[str]:
    """The sorted shard paths/URLs that ``pattern`` names (braces expanded, globs matched).

    Raises ``FileNotFoundError`` naming the pattern when it matches no file, and the pieces of
    the pattern that matched nothing.
    """
    from braceexpand import braceexpand

    pieces = [p for p in re.split(r"\s+|::", pattern.strip()) if p]
    if not pieces:
        raise ValueError("data.shards is empty; accepted: a local path or fsspec URL of .tar "
                         "shards with brace ({00000..00099}) or glob (*) patterns")
    found, missing = [], []
    for piece in pieces:
        for item in braceexpand(piece):
            hits = _glob(item) if _GLOB_CHARS.search(item) else ([item] if _exists(item) else [])
            (found.extend(hits) if hits else missing.append(item))
    if not found:
        raise FileNotFoundError(
            f"the shard pattern {pattern!r} matches no file (nothing at {', '.join(missing[:3])}"
            f"{' …' if len(missing) > 3 else ''}); accepted: a local path or fsspec URL of .tar "
            f"shards with brace ({{00000..00099}}) or glob (*) patterns, e.g. "
            f"'/data/cc3m/{{00000..00331}}.tar' or 'gs://bucket/laion/*.tar'")
    if missing:
        warnings.warn(f"{len(missing)} shard(s) named by {pattern!r} do not exist and are left "
                      f"out: {', '.join(missing[:3])}{' …' if len(missing) > 3 else ''}",
                      stacklevel=2)
    return sorted(set(found))


def _glob(pattern: str) -> list[str]:
    if not _is_url(pattern):
        return [p for p in globlib.glob(os.path.expanduser(pattern)) if os.path.isfile(p)]
    from fsspec.core import url_to_fs

    fs, path = url_to_fs(pattern)
    return [fs.unstrip_protocol(p) for p in fs.glob(path) if fs.isfile(p)]


def _exists(path: str) -> bool:
    if not _is_url(path):
        return os.path.isfile(os.path.expanduser(path))
    from fsspec.core import url_to_fs

    fs, path = url_to_fs(path)
    return fs.isfile(path)


def open_shard(url: str):
    """A binary file object of a shard (local path, or any fsspec URL)."""
    if not _is_url(url):
        return open(os.path.expanduser(url), "rb")
    import fsspec

    return fsspec.open(url, "rb").open()


# ----------------------------------------------------------------------------- samples


def _key_ext(name: str) -> tuple[str | None, str | None]:
    from webdataset.tariterators import base_plus_ext

    key, ext = base_plus_ext(name)
    return key, (ext.lower() if ext is not None else None)


def problem(sample: dict) -> str | None:
    """Why a grouped sample (``{ext: bytes}``) is not usable (a ``SKIP_REASONS`` entry), or None."""
    if not any(e in sample for e in IMAGE_EXTS):
        return "no_image"
    if CAPTION_EXT not in sample:
        return "no_caption"
    return None


def image_bytes(sample: dict) -> bytes:
    return next(sample[e] for e in IMAGE_EXTS if e in sample)


def caption(sample: dict) -> str:
    return bytes(sample[CAPTION_EXT]).decode("utf-8", errors="replace").strip()


def decode_image(data: bytes, size: int | None = None) -> np.ndarray | None:
    """``[H, W, 3]`` uint8 RGB of encoded image bytes (any mode: palette, grey, alpha, CMYK,
    16-bit are converted), or None when the bytes are not a decodable image. With ``size``, a
    JPEG is decoded at the smallest DCT scale whose shorter side is still ≥ ``size``
    (``draft``: several times faster for large photos; PNG/WebP are unaffected)."""
    from unclip_jax.core.images import to_rgb

    try:
        with Image.open(io.BytesIO(data)) as im:
            if size is not None and im.format == "JPEG":
                im.draft("RGB", (size, size))
            return np.asarray(to_rgb(im))
    except Exception:   # noqa: BLE001 — any decoder failure is one undecodable sample
        return None


def read_shard(url: str, skip: int = 0) -> Iterator[tuple[int, dict | None]]:
    """Stream the samples of one shard: ``(k, sample)`` for sample groups ``k = skip, skip+1,
    …`` in tar order, ``sample`` = ``{ext: bytes}`` (lower-case extensions). When the shard is
    not a tar or breaks part way, the last item is ``(k, None)`` (the samples before the break
    come first; the one the break cuts ends with the members read)."""
    from webdataset.tariterators import group_by_keys

    broken: list[bool] = []
    k = 0
    try:
        with open_shard(url) as f:
            for sample in group_by_keys(_tar_files(f, url, broken)):
                if k >= skip:
                    yield k, {key: v for key, v in sample.items() if not key.startswith("__")}
                k += 1
    except (tarfile.TarError, OSError, EOFError, ValueError):   # opening, or a duplicate
        broken.append(True)
    if broken:
        yield k, None


def _tar_files(f, url: str, broken: list):
    """webdataset's member stream of one tar, ending quietly (``broken`` set) where it breaks."""
    from webdataset.tariterators import tar_file_iterator

    try:
        for item in tar_file_iterator(f):
            yield {**item, "__url__": url}
    except (tarfile.TarError, OSError, EOFError, ValueError):
        broken.append(True)


# ----------------------------------------------------------------------------- random access


class ShardIndex:
    """Random access to the usable samples of a list of shards (for evaluation sets).

    ``len(index)`` samples in shard order, then tar order; ``index[i]`` is ``{"image": [H, W,
    3] uint8, "caption": bytes, "shard": int, "offset": int, "ok": int}``, with ``ok = 0`` (and
    a 1×1 black image) when the image cannot be decoded. Building it reads every tar header
    once (seeking over the data); ``skipped`` counts the samples left out by reason.
    ``images=False`` leaves the images out (``{"caption", "shard", "offset"}``: tokenizers).
    """

    def __init__(self, urls: list[str], images: bool = True):
        self.urls = list(urls)
        self.images = images
        self.skipped = dict.fromkeys(SKIP_REASONS, 0)
        # one entry per usable sample:
        # (shard, group offset, (image start, size), (text start, size))
        rows: list[tuple[int, int, tuple[int, int], tuple[int, int]]] = []
        for s, url in enumerate(self.urls):
            groups, broken = _tar_members(url)
            self.skipped["bad_shard"] += int(broken)
            for k, members in enumerate(groups):
                why = problem(members)
                if why:
                    self.skipped[why] += 1
                    continue
                img = next(members[e] for e in IMAGE_EXTS if e in members)
                rows.append((s, k, img, members[CAPTION_EXT]))
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i) -> dict:
        s, k, (io_, isz), (to, tsz) = self.rows[int(i)]
        with open_shard(self.urls[s]) as f:
            f.seek(to)
            text = f.read(tsz)
            data = None
            if self.images:
                f.seek(io_)
                data = f.read(isz)
        out = {"caption": text.strip(), "shard": np.int32(s), "offset": np.int32(k)}
        if self.images:
            img = decode_image(data) if len(data) == isz else None
            out["ok"] = np.int32(img is not None)
            out["image"] = img if img is not None else np.zeros((1, 1, 3), np.uint8)
        return out

    def __getitems__(self, keys) -> list[dict]:
        return [self[i] for i in keys]


def _tar_members(url: str) -> tuple[list[dict[str, tuple[int, int]]], bool]:
    """Sample groups of a shard as ``[{ext: (data offset, size)}]`` in tar order (the grouping
    of ``read_shard``) and whether the shard is broken (not a tar, or truncated)."""
    groups: list[dict] = []
    current_key = None
    broken = False
    try:
        with open_shard(url) as f:
            size = f.seek(0, io.SEEK_END)
            f.seek(0)
            with tarfile.open(fileobj=f, mode="r:") as tar:
                for info in tar:
                    if not info.isreg():
                        continue
                    key, ext = _key_ext(info.name)
                    if key is None or Path(info.name).name.startswith("__"):
                        continue
                    if info.offset_data + info.size > size:
                        broken = True
                        break
                    if current_key != key:
                        groups.append({})
                        current_key = key
                    elif ext in groups[-1]:        # a duplicate member: broken, as streamed
                        broken = True
                        break
                    groups[-1][ext] = (info.offset_data, info.size)
    except (tarfile.TarError, OSError, EOFError, ValueError):
        broken = True
    return groups, broken


def iter_captions(urls: list[str], limit: int) -> Iterator[str]:
    """The captions of the first ``limit`` usable samples, shards in order (tokenizer training)."""
    n = 0
    for url in urls:
        for _, sample in read_shard(url):
            if sample is None or problem(sample):
                continue
            yield caption(sample)
            n += 1
            if n >= limit:
                return
