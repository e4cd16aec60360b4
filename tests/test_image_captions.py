"""Robust image loading and the ``image_captions`` builder on files made in the test."""

import io
import json
import logging
import struct
import zlib

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from unclip_jax.core.images import ImageLoadError, load_image, resize_center_crop, to_float
from unclip_jax.data.image_captions import build_image_captions, read_source

# ----------------------------------------------------------------------------- file makers


def _rgb(h=24, w=32, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8))


def _bytes(img, fmt="PNG", **kw):
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _png_header_only(width, height):
    """A PNG whose header claims width×height but whose pixel data is a few bytes."""
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 4))
            + chunk(b"IEND", b""))


def _truncated_jpeg():
    data = _bytes(_rgb(64, 64), "JPEG", quality=90)
    return data[: len(data) // 2]


# ----------------------------------------------------------------------------- load_image


def test_modes_convert_to_rgb():
    g16 = Image.fromarray(np.full((4, 5), 65535, np.uint16))
    g16b = load_image(_bytes(g16))
    assert g16b.mode == "RGB" and g16b.size == (5, 4)
    assert np.all(np.asarray(g16b) == 255)
    half = load_image(_bytes(Image.fromarray(np.full((3, 3), 257 * 100, np.uint16))))
    assert np.all(np.asarray(half) == 100)

    rgba = Image.new("RGBA", (6, 6), (255, 0, 0, 0))          # fully transparent red
    assert np.all(np.asarray(load_image(_bytes(rgba))) == 255)  # → white
    opaque = Image.new("RGBA", (6, 6), (255, 0, 0, 255))
    assert np.asarray(load_image(_bytes(opaque)))[0, 0].tolist() == [255, 0, 0]

    grey = load_image(_bytes(Image.new("L", (3, 3), 77)))
    assert np.asarray(grey)[0, 0].tolist() == [77, 77, 77]

    pal = _rgb(8, 8).convert("P", palette=Image.ADAPTIVE, colors=8)
    assert load_image(_bytes(pal)).mode == "RGB"
    pal_t = Image.new("P", (4, 4), 0)
    pal_t.putpalette([0, 0, 0] * 256)
    assert np.all(np.asarray(load_image(_bytes(pal_t, transparency=0))) == 255)

    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))      # red in CMYK
    out = np.asarray(load_image(_bytes(cmyk, "JPEG")))
    assert out.shape == (8, 8, 3) and out[0, 0, 0] > 200 and out[0, 0, 1] < 60

    assert load_image(_bytes(Image.new("1", (5, 5), 1))).mode == "RGB"
    assert load_image(_bytes(Image.fromarray(np.ones((2, 2), np.float32)), "TIFF")).mode == "RGB"


def test_load_errors(tmp_path):
    with pytest.raises(ImageLoadError, match="does not exist") as e:
        load_image(tmp_path / "nope.png")
    assert e.value.kind == "missing"
    (tmp_path / "zero.png").write_bytes(b"")
    with pytest.raises(ImageLoadError, match="empty"):
        load_image(tmp_path / "zero.png")
    with pytest.raises(ImageLoadError, match="not a recognised image") as e:
        load_image(np.random.default_rng(0).bytes(300), name="rand.jpg")
    assert "rand.jpg" in str(e.value) and e.value.kind == "unreadable"
    with pytest.raises(ImageLoadError, match="truncated"):
        load_image(_truncated_jpeg())
    with pytest.raises(ImageLoadError, match="too large") as e:
        load_image(_png_header_only(30000, 30000))
    assert e.value.kind == "too large"
    with pytest.raises(ImageLoadError, match="too large"):
        load_image(_bytes(_rgb(20, 20)), max_pixels=100)
    with pytest.raises(ImageLoadError, match="is a directory"):
        load_image(tmp_path)


def test_resize_center_crop_and_to_float():
    img = resize_center_crop(_rgb(30, 60), 16)
    assert img.size == (16, 16) and img.mode == "RGB"
    assert resize_center_crop(_rgb(8, 8), 8).size == (8, 8)
    up = resize_center_crop(_rgb(5, 7), 20)
    assert up.size == (20, 20)
    x = to_float(Image.new("RGB", (2, 2), (0, 255, 0)))
    assert x.dtype == np.float32 and x[0, 0].tolist() == [-1.0, 1.0, -1.0]


# ----------------------------------------------------------------------------- the builder


def _write_folder(root):
    """A folder with every kind of good and bad row. Returns the expected skip counts."""
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / ".hidden").mkdir()
    good = {
        "rgb.png": _bytes(_rgb(40, 50)),
        "sub/photo.jpg": _bytes(_rgb(64, 48), "JPEG"),
        "sub/deeper/grey16.png": _bytes(Image.fromarray(np.full((20, 20), 40000, np.uint16))),
        "cmyk.jpg": _bytes(Image.new("CMYK", (30, 30), (0, 255, 255, 0)), "JPEG"),
        "pal.png": _bytes(_rgb(16, 16).convert("P", palette=Image.ADAPTIVE, colors=4)),
        "alpha.png": _bytes(Image.new("RGBA", (20, 20), (0, 0, 0, 0))),
    }
    for i, (name, data) in enumerate(good.items()):
        (root / name).write_bytes(data)
        (root / name).with_suffix(".txt").write_text(f"  Picture\n number {i}  ")
    bad = {   # name -> (image bytes, caption bytes or None)
        "trunc.jpg": (_truncated_jpeg(), b"a truncated image"),
        "zero.png": (b"", b"zero bytes"),
        "random.png": (np.random.default_rng(1).bytes(500), b"random bytes"),
        "huge.png": (_png_header_only(25000, 25000), b"a bomb"),
        "nocap.png": (_bytes(_rgb()), None),
        "empty.png": (_bytes(_rgb()), b" \n\t "),
        "latin1.png": (_bytes(_rgb()), "caf\xe9".encode("latin-1")),
    }
    for name, (data, cap) in bad.items():
        (root / name).write_bytes(data)
        if cap is not None:
            (root / name).with_suffix(".txt").write_bytes(cap)
    (root / ".hidden" / "x.png").write_bytes(_bytes(_rgb()))     # ignored
    (root / "orphan.txt").write_text("no image")                 # not a row
    (root / "notes.md").write_text("not an image")               # not a row
    return len(good), {"unreadable image": 3, "too large image": 1, "missing caption": 1,
                       "empty caption": 1, "non-UTF-8 caption": 1}


def test_folder_build(tmp_path, caplog):
    n_good, expected = _write_folder(tmp_path / "src")
    with caplog.at_level(logging.WARNING):
        data_dir, summary = build_image_captions(tmp_path / "src", tmp_path / "out", "mine",
                                                 resolution=16, val_fraction=0.2)
    assert summary["rows"] == n_good + sum(expected.values())
    assert summary["written"] == n_good
    assert summary["skipped"] == expected
    assert summary["train"] + summary["validation"] == n_good and summary["validation"] == 1
    assert ("image_captions: 13 rows, 6 written, skipped: 3 unreadable image, 1 empty caption, "
            "1 missing caption, 1 non-UTF-8 caption, 1 too large image") in caplog.text
    assert "trunc.jpg" in caplog.text and "huge.png" in caplog.text

    train = tfds.data_source("image_captions/mine", data_dir=data_dir, split="train")
    val = tfds.data_source("image_captions/mine", data_dir=data_dir, split="validation")
    examples = [train[i] for i in range(len(train))] + [val[0]]
    for ex in examples:
        assert ex["image"].shape == (16, 16, 3) and ex["image"].dtype == np.uint8
    caps = sorted(ex["caption"].decode() for ex in examples)
    assert caps == [f"Picture number {i}" for i in range(n_good)]
    alpha = [ex for ex in examples if ex["caption"] == b"Picture number 5"][0]
    assert np.all(alpha["image"] == 255)

    # A second call reuses the build and returns the stored summary.
    _, again = build_image_captions(tmp_path / "src", tmp_path / "out", "mine", resolution=16)
    assert again["skipped"] == expected and again["written"] == n_good


def test_manifests(tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(4):
        (imgs / f"{i}.png").write_bytes(_bytes(_rgb(seed=i)))
    csv_head = tmp_path / "with_header.csv"
    csv_head.write_bytes(b"caption,path,extra\n"
                         b'"a cat, sitting",imgs/0.png,x\n'
                         b"a dog,imgs/1.png,y\n"
                         b"gone,imgs/missing.png,z\n"
                         b"only-one-cell\n"
                         b"\n"
                         b"caf\xe9,imgs/2.png,w\n")
    rows, skipped, total = read_source(csv_head)
    assert total == 5 and skipped == {"malformed row": 1} and len(rows) == 4
    assert rows[0].caption == b"a cat, sitting" and rows[0].image == imgs / "0.png"

    csv_plain = tmp_path / "plain.csv"
    csv_plain.write_text(f"imgs/0.png,first\n{imgs / '3.png'},absolute path\n")
    rows, skipped, total = read_source(csv_plain)
    assert total == 2 and not skipped and rows[1].image == imgs / "3.png"

    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text("\n".join([
        json.dumps({"path": "imgs/0.png", "caption": "zero"}),
        json.dumps({"path": "imgs/1.png", "caption": "un caf\u00e9 \u2615"}),
        json.dumps({"path": "imgs/nope.png", "caption": "missing file"}),
        json.dumps({"path": "imgs/2.png", "caption": 3}),
        json.dumps({"caption": "no path"}),
        "{not json",
        "",
        json.dumps({"path": "imgs/3.png", "caption": ""}),
    ]))
    _, summary = build_image_captions(jsonl, tmp_path / "out", "j", resolution=8, val_fraction=0)
    assert summary["rows"] == 7 and summary["written"] == 2 and summary["validation"] == 0
    assert summary["skipped"] == {"malformed row": 3, "missing image": 1, "empty caption": 1}
    src = tfds.data_source("image_captions/j", data_dir=str(tmp_path / "out"), split="train")
    assert sorted(src[i]["caption"].decode() for i in range(2)) == ["un caf\u00e9 \u2615", "zero"]

    _, summary = build_image_captions(csv_head, tmp_path / "out", "c", resolution=8)
    assert summary["written"] == 2
    assert summary["skipped"] == {"malformed row": 1, "missing image": 1, "non-UTF-8 caption": 1}


def test_no_usable_rows_and_bad_sources(tmp_path):
    src = tmp_path / "bad"
    src.mkdir()
    (src / "a.png").write_bytes(b"")
    (src / "a.txt").write_text("zero")
    (src / "b.png").write_bytes(_bytes(_rgb()))
    with pytest.raises(ValueError, match=r"no usable rows.*2 rows, 0 written.*1 missing caption"
                                         r".*1 unreadable image") as e:
        build_image_captions(src, tmp_path / "out", "bad")
    assert str(src) in str(e.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_image_captions(tmp_path / "nowhere", tmp_path / "out", "x")
    (tmp_path / "m.parquet").write_text("")
    with pytest.raises(ValueError, match=r"\.csv, \.jsonl"):
        build_image_captions(tmp_path / "m.parquet", tmp_path / "out", "x")
    with pytest.raises(ValueError, match="dataset name"):
        build_image_captions(src, tmp_path / "out", "has space")
