"""``image_captions``: a TFDS dataset of user image–caption pairs (no TensorFlow needed).

Sources (``ImageCaptionsConfig.source``, or ``--manual_dir`` with ``tfds build``):

* **a folder**, searched recursively: every image (``.png .jpg .jpeg .webp .bmp .gif .tif
  .tiff``) whose caption is the same-named ``.txt`` beside it (``cat.png`` + ``cat.txt``).
  Folders and files whose name starts with ``.`` are ignored; a ``.txt`` with no image is not a
  row; an image with no ``.txt`` is a row skipped as ``missing caption``.
* **a CSV manifest** (``.csv``), columns ``path,caption``. The first line is a header *only*
  when its cells include exactly ``path`` and ``caption`` (case-insensitive); a header may put
  them in any order and add other columns (ignored). Without a header, column 0 is the path and
  column 1 the caption (extra columns ignored).
* **a JSONL manifest** (``.jsonl`` / ``.json``): one object ``{"path": ..., "caption": ...}``
  per line; blank lines are ignored.

Manifest paths are relative to the manifest's folder (absolute paths are kept).

Captions: decoded as strict UTF-8 (a BOM is dropped) and whitespace collapsed to single
spaces (a multi-line ``.txt`` becomes one caption). A caption that is not valid UTF-8 is
**skipped** (``non-UTF-8 caption``), never guessed; an empty/whitespace-only one is skipped
(``empty caption``).

Images: decoded with ``unclip_jax.core.images.load_image`` (grey, palette, RGBA on white, 16-bit,
CMYK → 8-bit RGB; EXIF orientation applied; oversized images refused from the header), then
resized so the shorter side is ``resolution`` and centre-cropped: the stored feature has a
**fixed** shape ``(resolution, resolution, 3)`` (PNG-encoded). Unusable images are skipped and
counted (``missing image``, ``unreadable image``, ``too large image``).

Every source row is either written or counted under one skip reason; the build logs one line
``image_captions: 120 rows, 117 written, skipped: 2 unreadable image, 1 empty caption`` and stores
the same summary in the dataset's ``metadata.json``. A source with no usable row fails with a
``ValueError`` naming the source and the skip counts.

Splits: the usable rows are permuted with ``seed``; ``round(val_fraction * n)`` of them (at
least one when ``val_fraction > 0`` and ``n >= 2``) form ``validation``, the rest ``train``.
Images are decoded twice (a validation pass decides which rows are usable before anything is
written, so no split is ever empty; then the writing pass).
"""

from __future__ import annotations

import collections
import concurrent.futures
import csv
import dataclasses
import io
import json
import logging
import os
import re
from pathlib import Path
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds

from unclip_jax.core.images import (IMAGE_EXTENSIONS, ImageLoadError, encode_png, load_image,
                               resize_center_crop)

log = logging.getLogger(__name__)

NAME = "image_captions"
VERSION = "1.0.0"
_CONFIG_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


@dataclasses.dataclass(eq=False)
class ImageCaptionsConfig(tfds.core.BuilderConfig):
    """``source``: folder / ``.csv`` / ``.jsonl`` ("" = the ``tfds build --manual_dir`` folder);
    ``resolution``: stored square side; ``val_fraction``, ``seed``: the validation split;
    ``max_pixels``: refuse images with more pixels (0 = PIL's ``Image.MAX_IMAGE_PIXELS``)."""

    source: str = ""
    resolution: int = 64
    val_fraction: float = 0.05
    seed: int = 0
    max_pixels: int = 0


@dataclasses.dataclass
class Row:
    """One source row: where it came from, its image path and its caption (raw bytes)."""

    index: int
    where: str
    image: Path
    caption: bytes | None   # None: no caption file


# ----------------------------------------------------------------------------- reading sources


def _collapse(text: str) -> str:
    return " ".join(text.split())


def decode_caption(raw: bytes | str | None) -> tuple[str | None, str | None]:
    """``(caption, None)`` or ``(None, skip_reason)`` following the module's caption rules."""
    if raw is None:
        return None, "missing caption"
    if isinstance(raw, str):
        try:
            raw = raw.encode("utf-8", errors="surrogateescape")
        except UnicodeEncodeError:
            return None, "non-UTF-8 caption"
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        return None, "non-UTF-8 caption"
    text = _collapse(text)
    if not text:
        return None, "empty caption"
    return text, None


def _read_text(path: Path) -> str:
    # surrogateescape keeps undecodable bytes so that the caption rule can reject just that row.
    return path.read_bytes().decode("utf-8-sig", errors="surrogateescape")


def read_source(source: str | os.PathLike) -> tuple[list[Row], collections.Counter, int]:
    """Rows of a folder or manifest, the rows already skipped (by reason) and the row count."""
    src = Path(source).expanduser()
    if not src.exists():
        raise FileNotFoundError(f"image_captions source {str(src)!r} does not exist; give a "
                                f"folder of images with same-named .txt captions, a .csv or a "
                                f".jsonl manifest")
    if src.is_dir():
        return _read_folder(src)
    suffix = src.suffix.lower()
    if suffix == ".csv":
        return _read_csv(src)
    if suffix in (".jsonl", ".json"):
        return _read_jsonl(src)
    raise ValueError(f"image_captions source {str(src)!r} is neither a folder nor a manifest; "
                     f"accepted manifests end in .csv, .jsonl or .json")


def _read_folder(root: Path) -> tuple[list[Row], collections.Counter, int]:
    rows: list[Row] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fn in sorted(filenames):
            if fn.startswith(".") or not fn.lower().endswith(IMAGE_EXTENSIONS):
                continue
            img = Path(dirpath) / fn
            txt = img.with_suffix(".txt")
            try:
                caption = txt.read_bytes() if txt.is_file() else None
            except OSError:
                caption = None
            rows.append(Row(len(rows), str(img.relative_to(root)), img, caption))
    return rows, collections.Counter(), len(rows)


def _resolve(base: Path, p: str) -> Path:
    path = Path(p).expanduser()
    return path if path.is_absolute() else base / path


def _read_csv(path: Path) -> tuple[list[Row], collections.Counter, int]:
    lines = list(csv.reader(io.StringIO(_read_text(path), newline="")))
    lines = [(i + 1, r) for i, r in enumerate(lines) if any(c.strip() for c in r)]
    pi, ci = 0, 1
    if lines:
        head = [c.strip().lower() for c in lines[0][1]]
        if "path" in head and "caption" in head:
            pi, ci = head.index("path"), head.index("caption")
            lines = lines[1:]
    rows, skipped = [], collections.Counter()
    for lineno, cells in lines:
        where = f"{path.name}:{lineno}"
        if len(cells) <= max(pi, ci) or not cells[pi].strip():
            skipped["malformed row"] += 1
            log.warning("image_captions: skipping %s: malformed row %r (expected path,caption)",
                        where, cells)
            continue
        rows.append(Row(len(rows) + sum(skipped.values()), where,
                        _resolve(path.parent, cells[pi].strip()),
                        cells[ci].encode("utf-8", errors="surrogateescape")))
    return rows, skipped, len(lines)


def _read_jsonl(path: Path) -> tuple[list[Row], collections.Counter, int]:
    rows, skipped, total = [], collections.Counter(), 0
    for lineno, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        total += 1
        where = f"{path.name}:{lineno}"
        try:
            obj = json.loads(line)
            ok = (isinstance(obj, dict) and isinstance(obj.get("path"), str)
                  and obj["path"].strip() and "caption" in obj)
        except ValueError:
            ok = False
        if ok and not isinstance(obj["caption"], str):
            ok = obj["caption"] is None
        if not ok:
            skipped["malformed row"] += 1
            log.warning("image_captions: skipping %s: malformed line (expected "
                        '{"path": str, "caption": str}): %.200s', where, line)
            continue
        cap = obj["caption"]
        rows.append(Row(total - 1, where, _resolve(path.parent, obj["path"].strip()),
                        b"" if cap is None else cap.encode("utf-8", errors="surrogateescape")))
    return rows, skipped, total


# ----------------------------------------------------------------------------- examples


def _image_kind(e: ImageLoadError) -> str:
    return {"missing": "missing image", "too large": "too large image"}.get(e.kind,
                                                                           "unreadable image")


def check_row(row: Row, max_pixels: int | None) -> str | None:
    """``None`` when the row is usable, else ``"<skip reason>|<detail>"``."""
    _, why = decode_caption(row.caption)
    if why:
        return why
    try:
        load_image(row.image, max_pixels=max_pixels or None)
    except ImageLoadError as e:
        return f"{_image_kind(e)}|{e.reason}"
    return None


def make_example(row: Row, resolution: int,
                 max_pixels: int | None) -> tuple[dict | None, str | None]:
    """``({"image": png_bytes, "caption": str}, None)`` or ``(None, skip_reason)``."""
    caption, why = decode_caption(row.caption)
    if why:
        return None, why
    try:
        img = load_image(row.image, max_pixels=max_pixels or None)
    except ImageLoadError as e:
        return None, f"{_image_kind(e)}|{e.reason}"
    return {"image": encode_png(resize_center_crop(img, resolution)), "caption": caption}, None


def format_summary(summary: dict) -> str:
    """``image_captions: 120 rows, 117 written, skipped: 2 unreadable image, 1 empty caption``."""
    skipped = summary["skipped"]
    tail = ", ".join(f"{n} {k}" for k, n in sorted(skipped.items(), key=lambda kv: (-kv[1], kv[0])))
    return (f"{NAME}: {summary['rows']} rows, {summary['written']} written, "
            f"skipped: {tail or 'none'}")


class Builder(tfds.core.GeneratorBasedBuilder,
              skip_registration=NAME in getattr(tfds.core.registered, "_DATASET_REGISTRY", {})):
    """Image–caption pairs from a folder or manifest; see the module docstring."""

    name = NAME
    # TFDS's own lookup of this path needs the `importlib_resources` backport when the module
    # lives in a package; give it directly.
    code_path = Path(__file__)
    VERSION = tfds.core.Version(VERSION)
    RELEASE_NOTES = {str(VERSION): "Initial release."}
    BUILDER_CONFIGS = [ImageCaptionsConfig(name=f"r{r}", resolution=r) for r in (32, 64, 128, 256)]
    DEFAULT_CONFIG_NAME = "r64"
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put the images with same-named .txt captions in the manual folder "
        "(`tfds build data/image_captions --manual_dir=FOLDER`), or give a folder / .csv / "
        ".jsonl manifest as ImageCaptionsConfig(source=...) (see build_image_captions).")

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.summary: dict | None = None

    def _info(self) -> tfds.core.DatasetInfo:
        r = self.builder_config.resolution
        return tfds.core.DatasetInfo(
            builder=self,
            description=(f"User image–caption pairs, images resized and centre-cropped to {r}×{r}. "
                         f"Source: {self.builder_config.source or '<manual_dir>'}"),
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(r, r, 3), encoding_format="png"),
                "caption": tfds.features.Text(),
            }),
            metadata=tfds.core.MetadataDict(),
        )

    def _source(self, dl_manager) -> Path:
        if self.builder_config.source:
            return Path(self.builder_config.source).expanduser().resolve()
        try:
            return Path(dl_manager.manual_dir)
        except (AssertionError, ValueError) as e:
            raise ValueError(f"image_captions config {self.builder_config.name!r} has no source: "
                             f"set ImageCaptionsConfig(source=...) or pass --manual_dir "
                             f"({e})") from None

    def _split_generators(self, dl_manager) -> dict[str, Iterator]:
        cfg = self.builder_config
        source = self._source(dl_manager)
        rows, skipped, total = read_source(source)
        usable: list[Row] = []

        def check(row: Row):
            return row, check_row(row, cfg.max_pixels)

        with concurrent.futures.ThreadPoolExecutor(min(16, os.cpu_count() or 1)) as pool:
            for row, why in pool.map(check, rows):
                if why:
                    kind, _, detail = why.partition("|")
                    skipped[kind] += 1
                    log.warning("image_captions: skipping %s (%s): %s", row.where, row.image,
                                detail or kind)
                else:
                    usable.append(row)
        summary = {"source": str(source), "rows": total, "written": len(usable),
                   "skipped": dict(skipped)}
        if not usable:
            raise ValueError(f"image_captions source {str(source)!r} has no usable rows: "
                             f"{format_summary(summary)}")
        order = np.random.default_rng(cfg.seed).permutation(len(usable))
        n_val = 0
        if cfg.val_fraction > 0 and len(usable) >= 2:
            n_val = min(max(1, round(cfg.val_fraction * len(usable))), len(usable) - 1)
        val = [usable[i] for i in sorted(order[:n_val])]
        train = [usable[i] for i in sorted(order[n_val:])]
        summary.update(train=len(train), validation=len(val))
        self.summary = summary
        self.info.metadata["summary"] = summary
        log.log(logging.WARNING if skipped else logging.INFO, "%s", format_summary(summary))
        splits = {"train": self._generate_examples(train)}
        if val:
            splits["validation"] = self._generate_examples(val)
        return splits

    def _generate_examples(self, rows: list[Row]) -> Iterator[tuple[str, dict]]:
        cfg = self.builder_config
        for row in rows:
            ex, why = make_example(row, cfg.resolution, cfg.max_pixels)
            if why:   # the file changed since the validation pass
                log.warning("image_captions: skipping %s: %s", row.where, why.replace("|", ": "))
                continue
            yield f"{row.index:09d}", ex


def build_image_captions(source: str | os.PathLike, data_dir: str | os.PathLike, name: str, *,
                         resolution: int = 64, val_fraction: float = 0.05, seed: int = 0,
                         max_pixels: int = 0, overwrite: bool = False) -> tuple[str, dict]:
    """Build ``image_captions/<name>`` from ``source`` into ``data_dir``.

    Returns ``(data_dir, summary)``; read it with ``DataConfig(name=f"image_captions/{name}",
    data_dir=data_dir)``. ``summary`` holds ``source, rows, written, train, validation,
    skipped`` (reason → count) and ``path`` (the prepared version folder). An existing build of
    the same name is reused (its stored summary returned) unless ``overwrite``.
    """
    if not _CONFIG_NAME_RE.match(name):
        raise ValueError(f"dataset name {name!r} must be letters, digits, '_', '-' or '.'")
    if resolution < 1:
        raise ValueError(f"resolution must be positive, got {resolution}")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    src = Path(source).expanduser().resolve()
    config = ImageCaptionsConfig(name=name, source=str(src), resolution=resolution,
                                 val_fraction=val_fraction, seed=seed, max_pixels=max_pixels,
                                 description=f"built from {src}")
    data_dir = str(Path(data_dir).expanduser().resolve())
    builder = Builder(config=config, data_dir=data_dir, file_format="array_record")
    mode = (tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS if not overwrite
            else tfds.download.GenerateMode.FORCE_REDOWNLOAD)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        download_mode=mode))
    summary = builder.summary
    if summary is None:   # reused an existing build
        summary = dict(tfds.builder_from_directory(builder.data_dir).info.metadata.get(
            "summary", {}))
    summary = dict(summary, path=str(builder.data_dir))
    return data_dir, summary
