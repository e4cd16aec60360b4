"""Robust image loading and square resizing, shared by the dataset builders and the CLI.

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
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")

_DEFAULT_MAX_PIXELS = 89_478_485   # PIL's own default for Image.MAX_IMAGE_PIXELS


class ImageLoadError(Exception):
    """An image that cannot be used. ``kind`` is ``"unreadable"``, ``"too large"`` or ``"missing"``."""

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
