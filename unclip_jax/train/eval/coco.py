"""Zero-shot FID on MS-COCO (unCLIP Table 2, GLIDE Table 2, Karlo's README), resumable in chunks.

The evaluation of the papers: ``N`` captions of the COCO validation set (30 000 from val2014),
one sample per caption, FID between the Inception-v3 pool3 features of the samples and those of
the captions' own images at 256 px; the CLIP score of each sample against its caption beside it.
This module is the computation; the sampler is a function handed in (``unclip-jax coco-fid``
composes it with the unCLIP pipeline), so anything that turns captions into images can be
scored the same way.

**Input** (:class:`CocoFolder`): a user-supplied COCO folder, either extracted::

    ROOT/annotations/captions_val2014.json     (or captions_val2017.json)
    ROOT/val2014/COCO_val2014_000000000042.jpg …

or the official zips as downloaded from cocodataset.org (what TFDS's ``coco`` builder fetches;
e.g. a ``tfds --manual_dir`` folder), read in place without extracting::

    ROOT/annotations_trainval2014.zip          (holds annotations/captions_val2014.json)
    ROOT/val2014.zip                           (holds val2014/…jpg)

**Selection** (:func:`select_captions`): one caption per image — the image's first caption
(lowest annotation id) —, the images in a seeded random order (``subset_seed``), the first
``N`` kept. So the ``N`` real images are distinct and each has exactly the caption its sample
was drawn from (GLIDE and unCLIP "sample 30k captions from val2014"; which ones is not
published, so numbers from other selections differ by sampling noise).

**Real images**: decoded to RGB (EXIF orientation applied), the shorter side resized to
``resolution`` (256; PIL bicubic, antialiased) and the central ``resolution``² square cropped —
the same as centre-cropping the largest square and resizing it. **Samples** of another size are
resized to ``resolution`` (PIL bicubic) so both sets reach the Inception through the same
``resolution`` → 299 bilinear resize (:mod:`unclip_jax.train.eval.inception`, pytorch-fid's).

**Chunks and resume**: the captions are processed in chunks of ``chunk_size``; each finished
chunk's features (``fake``/``real`` Inception ``[n, 2048]`` float32, per-sample CLIP scores, the
image ids) are written to ``OUT/chunk_00000.npz`` … beside ``OUT/manifest.json`` (every
setting that changes a number). A run that is killed, or stopped with ``max_chunks``, continues
from the first missing chunk when started again; the final statistics are built from the saved
features in chunk order, so the FID equals an uninterrupted run's. A run whose settings differ
from the manifest's is refused, naming each difference. Every chunk has exactly
``chunk_size`` rows (the last is padded by repeating its last caption; the padding is dropped),
so the sampler and the feature extractor compile once.

**Devices and processes**: each chunk's samples are drawn with the batch split over the mesh
(every process makes the same call with the same captions); each process decodes only its own
slice of the chunk's real images, which are then gathered; feature batches are split over the
mesh. Only process 0 writes files; every process must see ``OUT`` (a shared file system).

**Results** (``OUT/results.json``): ``fid``, ``clip_score`` (mean ``100·max(cos, 0)``,
:func:`unclip_jax.train.eval.metrics.clip_scores`), ``num_samples`` and the settings; the real and
sample statistics are saved as ``real_stats.npz`` / ``fake_stats.npz``
(:class:`~unclip_jax.train.eval.metrics.FeatureStats`).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import threading
import time
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import numpy as np
from PIL import Image

from unclip_jax.core import sharding
from unclip_jax.core.images import ImageLoadError, load_image, resize_center_crop
from unclip_jax.train.eval import metrics

SPLITS = ("val2014", "val2017")
MANIFEST = "manifest.json"
RESULTS = "results.json"
FORMAT = 1


# ============================================================================ the COCO folder


@dataclasses.dataclass(frozen=True)
class CocoCaption:
    """One caption of one validation image."""

    image_id: int
    file_name: str           # e.g. COCO_val2014_000000000042.jpg
    caption: str


class CocoFolder:
    """The captions and images of one COCO validation split, from an extracted folder or the
    official zips (see the module docstring). Raises FileNotFoundError naming what was looked
    for when neither layout is there, ValueError for an annotation file that is not COCO's."""

    def __init__(self, root: str | os.PathLike, split: str = "val2014"):
        if split not in SPLITS:
            raise ValueError(f"split {split!r} is not supported; accepted: {', '.join(SPLITS)}")
        self.root, self.split = Path(root), split
        year = split[3:]
        ann = self.root / "annotations" / f"captions_{split}.json"
        ann_zip = self.root / f"annotations_trainval{year}.zip"
        img_dir, img_zip = self.root / split, self.root / f"{split}.zip"
        if not self.root.is_dir():
            raise FileNotFoundError(f"no COCO folder at {str(self.root)!r}")
        if ann.is_file():
            self.annotations = str(ann)
            raw = ann.read_bytes()
        elif ann_zip.is_file():
            member = f"annotations/captions_{split}.json"
            with zipfile.ZipFile(ann_zip) as z:
                if member not in z.namelist():
                    raise FileNotFoundError(f"{ann_zip} holds no {member}")
                raw = z.read(member)
            self.annotations = f"{ann_zip}:{member}"
        else:
            raise FileNotFoundError(
                f"no {split} caption annotations in {str(self.root)!r}: looked for "
                f"{ann.relative_to(self.root)} (extracted) and {ann_zip.name} (the official "
                f"zip); download annotations_trainval{year}.zip from cocodataset.org")
        self._zip: zipfile.ZipFile | None = None
        self._lock = threading.Lock()
        if img_dir.is_dir():
            self.images = str(img_dir)
        elif img_zip.is_file():
            self.images = str(img_zip)
            self._zip = zipfile.ZipFile(img_zip)
            self._members = set(self._zip.namelist())
        else:
            raise FileNotFoundError(f"no {split} images in {str(self.root)!r}: looked for the "
                                    f"folder {split}/ and {img_zip.name}")
        self.captions = _parse_annotations(raw, self.annotations)

    def _member(self, file_name: str) -> str:
        return f"{self.split}/{file_name}"

    def missing(self, file_names: Sequence[str]) -> list[str]:
        """The names among ``file_names`` with no image file."""
        if self._zip is not None:
            return [f for f in file_names if self._member(f) not in self._members]
        folder = Path(self.images)
        return [f for f in file_names if not (folder / f).is_file()]

    def read(self, file_name: str) -> Image.Image:
        """One image as 8-bit RGB (ValueError naming the file if it does not decode)."""
        try:
            if self._zip is None:
                return load_image(Path(self.images) / file_name)
            with self._lock:
                data = self._zip.read(self._member(file_name))
            return load_image(data, name=f"{self.images}:{self._member(file_name)}")
        except ImageLoadError as e:
            raise ValueError(f"a COCO image cannot be used: {e}") from None


def _parse_annotations(raw: bytes, where: str) -> list[CocoCaption]:
    """The first caption (lowest annotation id) of every image, ordered by image id."""
    try:
        data = json.loads(raw)
        files = {int(im["id"]): str(im["file_name"]) for im in data["images"]}
        first: dict[int, tuple[int, str]] = {}
        for a in data["annotations"]:
            key, text = int(a["image_id"]), " ".join(str(a["caption"]).split())
            if text and (key not in first or int(a["id"]) < first[key][0]):
                first[key] = (int(a["id"]), text)
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{where} is not a COCO captions file ({type(e).__name__}: {e}); "
                         f"accepted: captions_val2014.json / captions_val2017.json with 'images' "
                         f"[{{id, file_name}}] and 'annotations' [{{id, image_id, caption}}]"
                         ) from None
    unknown = sorted(set(first) - set(files))
    if unknown:
        raise ValueError(f"{where}: {len(unknown)} caption(s) name image ids that its 'images' "
                         f"list lacks (first: {unknown[:5]})")
    return [CocoCaption(i, files[i], first[i][1]) for i in sorted(first)]


def select_captions(coco: CocoFolder, num: int, subset_seed: int = 0) -> list[CocoCaption]:
    """``num`` images' first captions in a seeded random order (module docstring), checked to
    exist: ValueError when ``num`` exceeds the captioned images or a chosen image is absent."""
    captions = coco.captions
    if not 1 <= num <= len(captions):
        raise ValueError(f"num = {num} captions asked for, but {coco.annotations} has "
                         f"{len(captions)} captioned images (one caption per image is used); "
                         f"accepted: 1 to {len(captions)}")
    order = np.random.default_rng(subset_seed).permutation(len(captions))[:num]
    chosen = [captions[i] for i in order]
    missing = coco.missing([c.file_name for c in chosen])
    if missing:
        raise ValueError(f"{coco.annotations} names {len(missing)} of the {num} chosen images "
                         f"that are not in {coco.images} (first: {', '.join(missing[:5])}); "
                         f"accepted: the complete {coco.split} images of cocodataset.org")
    return chosen


def captions_digest(chosen: Sequence[CocoCaption]) -> str:
    """sha256 of the chosen (image id, file, caption) rows (part of the manifest)."""
    h = hashlib.sha256()
    for c in chosen:
        h.update(f"{c.image_id}\t{c.file_name}\t{c.caption}\n".encode())
    return h.hexdigest()


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file (the Inception weights in the manifest)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


# ============================================================================ images


def load_real(coco: CocoFolder, items: Sequence[CocoCaption], resolution: int,
              workers: int = 8) -> np.ndarray:
    """uint8 ``[n, resolution, resolution, 3]``: shorter side → ``resolution`` (bicubic), centre
    crop; decoded in ``workers`` threads."""
    def one(item):
        return np.asarray(resize_center_crop(coco.read(item.file_name), resolution), np.uint8)

    with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool:
        return np.stack(list(pool.map(one, items)))


def to_resolution(images: np.ndarray, resolution: int) -> np.ndarray:
    """uint8 ``[n, h, w, 3]`` → ``[n, resolution, resolution, 3]`` (PIL bicubic; unchanged when
    already that size)."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"the sampler must return uint8 [n, H, W, 3] images, got "
                         f"{images.dtype} {images.shape}")
    if images.shape[1:3] == (resolution, resolution):
        return images
    return np.stack([np.asarray(resize_center_crop(Image.fromarray(im), resolution))
                     for im in images])


# ============================================================================ the run


Sampler = Callable[[Sequence[CocoCaption], int], np.ndarray]
"""``sample(items, chunk_index) -> uint8 [len(items), H, W, 3]``: one image per caption, the
same on every process (every process calls it with the same items)."""


def check_manifest(out_dir: Path, settings: dict) -> None:
    """Write ``manifest.json`` (process 0) or check the one there: ValueError naming every
    setting that differs, or chunk files without a manifest."""
    path = out_dir / MANIFEST
    want = {"format": FORMAT, "settings": settings}
    if path.is_file():
        have = json.loads(path.read_text())
        if have != want:
            old, new = have.get("settings", {}), settings
            diffs = [f"  {k}: {json.dumps(old.get(k))} there, {json.dumps(new.get(k))} now"
                     for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
            if have.get("format") != FORMAT:
                diffs.insert(0, f"  format: {have.get('format')} there, {FORMAT} now")
            raise ValueError(f"{out_dir} holds chunks of a coco-fid run with other settings:\n"
                             + "\n".join(diffs) + "\nuse another output folder, or delete "
                             "this one to start over")
        return
    if list(out_dir.glob("chunk_*.npz")):
        raise ValueError(f"{out_dir} holds chunk files but no {MANIFEST}, so their settings are "
                         f"unknown; use another output folder, or delete them")
    if sharding.is_main_process():
        _atomic_write(path, (json.dumps(want, indent=2) + "\n").encode())


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def chunk_path(out_dir: Path, k: int) -> Path:
    return out_dir / f"chunk_{k:05d}.npz"


def _chunk_done(out_dir: Path, k: int, ids: np.ndarray) -> bool:
    """A complete chunk file of exactly these image ids."""
    path = chunk_path(out_dir, k)
    if not path.is_file():
        return False
    try:
        with np.load(path, allow_pickle=False) as z:
            return np.array_equal(z["image_id"], ids) and all(
                z[name].shape[0] == len(ids) for name in ("fake", "real", "clip_score"))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return False                    # half written by a killed run: computed again


def run(coco: CocoFolder, chosen: Sequence[CocoCaption], out_dir: str | os.PathLike, *,
        sample: Sampler, inception, clip=None, settings: dict, chunk_size: int,
        resolution: int = 256, mesh=None, max_chunks: int | None = None, workers: int = 8,
        log: Callable[[str], None] = print) -> dict:
    """Score ``chosen`` (from :func:`select_captions`) chunk by chunk into ``out_dir``.

    ``sample``: a :data:`Sampler`; ``inception``: an extractor ``uint8 images -> [n, D]``
    (:class:`unclip_jax.train.eval.inception.InceptionFeatures`); ``clip``: a
    :class:`~unclip_jax.train.eval.metrics.ClipFeatures` for the CLIP score, or None;
    ``settings``: everything that changes a number (the manifest; a run with other settings is
    refused); ``mesh``: the mesh the sampler and extractors split over (``chunk_size`` must
    divide by its device count); ``max_chunks``: compute at most that many new chunks, then
    stop (the result says ``complete: False``; run again to continue).

    Returns ``{"complete", "chunks_done", "num_chunks"}`` plus, when complete, ``fid``,
    ``clip_score`` and ``num_samples`` (also written to ``results.json``).
    """
    out_dir = Path(out_dir)
    n = len(chosen)
    devices = 1 if mesh is None else mesh.size
    if chunk_size < 1 or chunk_size % devices:
        raise ValueError(f"chunk_size {chunk_size} does not split over the {devices} devices; "
                         f"accepted: a positive multiple of {devices}")
    num_chunks = -(-n // chunk_size)
    if sharding.is_main_process():
        out_dir.mkdir(parents=True, exist_ok=True)
    sharding.barrier("coco-fid mkdir")
    check_manifest(out_dir, {**settings, "num": n, "chunk_size": chunk_size,
                             "resolution": resolution})
    sharding.barrier("coco-fid manifest")

    chunks = [list(chosen[k * chunk_size:(k + 1) * chunk_size]) for k in range(num_chunks)]
    ids = [np.array([c.image_id for c in ch], np.int64) for ch in chunks]
    done = [k for k in range(num_chunks) if _chunk_done(out_dir, k, ids[k])]
    sharding.check_processes_agree(
        {"finished chunks": ",".join(map(str, done))},
        f"every process must see the same output folder {out_dir} (a shared file system)")
    todo = [k for k in range(num_chunks) if k not in set(done)]
    if done:
        log(f"coco-fid: {len(done)} of {num_chunks} chunks already in {out_dir}")
    for count, k in enumerate(todo):
        if max_chunks is not None and count >= max_chunks:
            break
        t0 = time.perf_counter()
        items = chunks[k] + [chunks[k][-1]] * (chunk_size - len(chunks[k]))   # fixed shape
        keep = len(chunks[k])
        fake = to_resolution(sample(items, k), resolution)
        if fake.shape[0] != chunk_size:
            raise ValueError(f"the sampler returned {fake.shape[0]} images for {chunk_size} "
                             f"captions")
        t1 = time.perf_counter()
        mine = np.array_split(np.arange(chunk_size), jax.process_count())[jax.process_index()]
        real = sharding.gather_process_rows(
            load_real(coco, [items[i] for i in mine], resolution, workers))
        feats = {"fake": inception(fake)[:keep], "real": inception(real)[:keep]}
        scores = (metrics.clip_scores(clip.images(fake), clip.texts([c.caption for c in items]))
                  if clip is not None else np.full(chunk_size, np.nan))
        if sharding.is_main_process():
            buf = _npz_bytes(image_id=ids[k], clip_score=scores[:keep].astype(np.float32),
                             **{name: f.astype(np.float32) for name, f in feats.items()})
            _atomic_write(chunk_path(out_dir, k), buf)
        sharding.barrier(f"coco-fid chunk {k}")
        done.append(k)
        log(f"coco-fid: chunk {k + 1}/{num_chunks} ({keep} captions) in "
            f"{time.perf_counter() - t0:.1f} s (sampling {t1 - t0:.1f} s)")
    result = {"complete": len(done) == num_chunks, "chunks_done": len(done),
              "num_chunks": num_chunks}
    if not result["complete"]:
        log(f"coco-fid: stopped with {len(done)} of {num_chunks} chunks in {out_dir}; run the "
            f"same command again to continue")
        return result
    result.update(summarize(out_dir, num_chunks))
    result["settings"] = json.loads((out_dir / MANIFEST).read_text())["settings"]
    if sharding.is_main_process():
        _atomic_write(out_dir / RESULTS, (json.dumps(result, indent=2) + "\n").encode())
    return result


def _npz_bytes(**arrays) -> bytes:
    import io

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def summarize(out_dir: str | os.PathLike, num_chunks: int) -> dict:
    """FID and mean CLIP score from the saved chunks, in chunk order (the real and sample
    :class:`~unclip_jax.train.eval.metrics.FeatureStats` are saved beside them by process 0)."""
    out_dir = Path(out_dir)
    real, fake, scores = [], [], []
    for k in range(num_chunks):
        with np.load(chunk_path(out_dir, k), allow_pickle=False) as z:
            real.append(z["real"])
            fake.append(z["fake"])
            scores.append(z["clip_score"])
    real, fake = np.concatenate(real), np.concatenate(fake)
    if sharding.is_main_process():
        metrics.FeatureStats.of(real).save(out_dir / "real_stats.npz")
        metrics.FeatureStats.of(fake).save(out_dir / "fake_stats.npz")
    clip_scores = np.concatenate(scores).astype(np.float64)
    return {"fid": metrics.frechet_distance_of_features(real, fake),
            "clip_score": None if np.isnan(clip_scores).all() else float(clip_scores.mean()),
            "num_samples": int(fake.shape[0])}


__all__ = ["CocoCaption", "CocoFolder", "Sampler", "captions_digest", "check_manifest",
           "file_digest", "load_real", "run", "select_captions", "summarize", "to_resolution"]
