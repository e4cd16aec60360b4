"""Image loading, square resizing, the [-1, 1] ↔ pixel conversions and PNG grids: shared by the
dataset builders, the CLI, the pipelines and the training samples.

``load_image`` turns a path or encoded bytes into an 8-bit RGB ``PIL.Image`` or raises
``ImageLoadError(path, reason, kind)``; it never lets a decoder exception or a
decompression bomb escape. Mode rules:

==========================  ==================================================================
source mode                 conversion
==========================  ==================================================================
RGB                         unchanged
L, 1, YCbCr, LAB, HSV, ...  ``convert("RGB")``
RGBA, LA, La, RGBa, PA      alpha-composited on white
P                           composited on white when it has transparency, else RGB
I;16 (16-bit grey)          divided by 257 (0..65535 → 0..255)
I (32-bit int), F (float)   ×255 when the values lie in [0, 1] (F), kept when in [0, 255],
                            /257 when in [0, 65535], otherwise min-max scaled
CMYK                        ``convert("RGB")`` (naive, no ICC colour management)
==========================  ==================================================================

EXIF orientation is applied. Multi-frame files (GIF, TIFF) give their first frame.
Images larger than ``max_pixels`` (default: PIL's ``Image.MAX_IMAGE_PIXELS``) are refused from
the header alone, before any pixel is decoded.

``to_float`` / ``to_uint8`` are the one pair of conversions between uint8 pixels and model
images in [-1, 1]; ``image_grid`` / ``save_grid`` lay rows of images out as one picture.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")

_DEFAULT_MAX_PIXELS = 89_478_485   # PIL's own default for Image.MAX_IMAGE_PIXELS


class ImageLoadError(Exception):
    """An image that cannot be used; ``kind``: ``"unreadable"``, ``"too large"``, ``"missing"``."""

    def __init__(self, path: str, reason: str, kind: str = "unreadable"):
        self.path = str(path)
        self.reason = reason
        self.kind = kind
        super().__init__(f"cannot load image {self.path!r}: {reason}")


def load_image(path_or_bytes: str | os.PathLike | bytes, *, max_pixels: int | None = None,
               name: str | None = None) -> Image.Image:
    """Decode a file path or encoded bytes into an 8-bit ``RGB`` PIL image.

    Raises ``ImageLoadError`` for a missing, empty, corrupt, truncated or oversized image
    (``name`` is used in the message when bytes are given).
    """
    if max_pixels is None:
        max_pixels = Image.MAX_IMAGE_PIXELS or _DEFAULT_MAX_PIXELS
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        label, source = name or "<bytes>", io.BytesIO(bytes(path_or_bytes))
        empty = len(path_or_bytes) == 0
    else:
        # A path is opened lazily: only the header is read before the size check, so a huge
        # file is refused without reading it into memory.
        label, source = str(path_or_bytes), Path(path_or_bytes)
        try:
            if source.is_dir():
                raise ImageLoadError(label, "is a directory", "unreadable")
            empty = source.stat().st_size == 0
            with open(source, "rb"):
                pass
        except FileNotFoundError:
            raise ImageLoadError(label, "file does not exist", "missing") from None
        except OSError as e:
            raise ImageLoadError(label, f"cannot read file ({e.strerror or e})") from None
    if empty:
        raise ImageLoadError(label, "empty (zero-byte) file")
    try:
        with warnings.catch_warnings(), Image.open(source) as img:
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            w, h = img.size
            if w <= 0 or h <= 0:
                raise ImageLoadError(label, f"invalid size {w}x{h}")
            if w * h > max_pixels:
                raise ImageLoadError(label, f"too large: {w}x{h} = {w * h} pixels exceeds the "
                                            f"limit of {max_pixels}", "too large")
            img.load()
            return to_rgb(ImageOps.exif_transpose(img)).copy()
    except ImageLoadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageLoadError(label, f"too large (decompression-bomb guard: {e})",
                             "too large") from None
    except Image.UnidentifiedImageError:
        raise ImageLoadError(label, "not a recognised image format") from None
    except MemoryError:
        raise ImageLoadError(label, "out of memory while decoding", "too large") from None
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ...
        msg = str(e) or type(e).__name__
        if "truncated" in msg:
            msg = f"truncated file ({msg})"
        raise ImageLoadError(label, f"corrupt image: {msg}") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB following the table in the module docstring."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        mode = "PA" if "transparency" in img.info else "RGB"
        img = img.convert("RGBA" if mode == "PA" else "RGB")
        if mode == "RGB":
            return img
    if mode in ("RGBA", "LA", "La", "RGBa", "PA") or img.mode == "RGBA":
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode.startswith("I;16"):
        arr = np.asarray(img, dtype=np.float64) / 257.0
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode in ("I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
        if mode == "F" and lo >= 0 and hi <= 1:
            arr = arr * 255.0
        elif lo >= 0 and hi <= 255:
            pass
        elif lo >= 0 and hi <= 65535:
            arr = arr / 257.0
        else:
            arr = (arr - lo) / max(hi - lo, 1e-12) * 255.0
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L").convert("RGB")
    return img.convert("RGB")


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side is ``size`` (bicubic; box-reduced first when shrinking a lot),
    then crop the central ``size``×``size`` square. Returns an RGB image of that size."""
    img = to_rgb(img)
    w, h = img.size
    if (w, h) == (size, size):
        return img
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.BICUBIC, reducing_gap=3.0)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def encode_png(img: Image.Image, compress_level: int = 6) -> bytes:
    """PNG bytes of a PIL image (what TFDS ``Image`` features accept without TensorFlow)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def to_float(img: Image.Image | np.ndarray) -> np.ndarray:
    """``[H, W, 3]`` float32 in [-1, 1] from an RGB image or a uint8 array."""
    arr = np.asarray(to_rgb(img) if isinstance(img, Image.Image) else img, dtype=np.float32)
    return arr * (2.0 / 255.0) - 1.0


def to_uint8(images) -> np.ndarray:
    """Model images in [-1, 1] (any shape, e.g. ``[B, H, W, 3]``) → uint8 pixels:
    ``(x + 1) · 127.5`` in float32, rounded half to even, clipped to [0, 255]."""
    return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(
        np.uint8)


def image_grid(rows: Sequence[np.ndarray], gap: int = 0) -> np.ndarray:
    """One uint8 picture ``[R·(H + gap), N·(W + gap), 3]`` of ``R`` rows of images
    ``[N_r, H, W, 3]`` (``N`` = the longest row). Rows are uint8, or float in [-1, 1]
    (converted with :func:`to_uint8`); gaps and the cells of shorter rows are white."""
    rows = [np.asarray(r) for r in rows]
    rows = [r if r.dtype == np.uint8 else to_uint8(r) for r in rows]
    if not rows or not any(len(r) for r in rows):
        raise ValueError("image_grid got no images")
    if any(r.ndim != 4 for r in rows if len(r)):
        raise ValueError(f"image_grid takes rows of [N, H, W, C] images, got shapes "
                         f"{[r.shape for r in rows]}")
    h, w, c = next(r for r in rows if len(r)).shape[1:]
    n = max(len(r) for r in rows)
    grid = np.full((len(rows) * (h + gap), n * (w + gap), c), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, im in enumerate(row):
            grid[i * (h + gap):i * (h + gap) + h, j * (w + gap):j * (w + gap) + w] = im
    return grid


def save_grid(images: np.ndarray | Sequence[np.ndarray], path: str | os.PathLike,
              columns: int | None = None, gap: int = 2) -> Path:
    """Save images as one PNG grid with ``gap`` px white gaps; returns the path.

    ``images``: an array ``[N, H, W, 3]`` (uint8, or float in [-1, 1]) laid out ``columns``
    per row (default: all in one row), or a sequence of such rows (``columns`` unused). Several
    processes: only process 0 writes (every process holds the same images).
    """
    import jax

    if isinstance(images, np.ndarray):
        if images.ndim != 4 or not (images.dtype == np.uint8
                                    or np.issubdtype(images.dtype, np.floating)):
            raise ValueError(f"save_grid takes uint8 (or [-1, 1] float) [N, H, W, 3], got "
                             f"{images.dtype} {images.shape}")
        cols = columns or len(images)
        rows = [images[i:i + cols] for i in range(0, len(images), cols)]
    else:
        rows = [np.asarray(r) for r in images]
    if not rows or not any(len(r) for r in rows):
        raise ValueError("save_grid got no images")
    grid = image_grid(rows, gap)
    if jax.process_index() == 0:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(grid).save(path)
    return Path(path)
