"""Fuzzing (hypothesis) of the three parsers that take outside input: config overrides, image
bytes, and prompt text. Each must either work or fail with its documented error — never another
exception, never a crash.

Examples per property: 100 locally, 500 when ``CI`` is set (profile ``ci``; the profiles are
registered here because tests/conftest.py belongs to the lead).
"""

import dataclasses
import io
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from unclip_jax.core import config as config_lib
from unclip_jax.core.images import ImageLoadError, load_image

settings.register_profile("fuzz-local", max_examples=100, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", max_examples=500, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci" if os.environ.get("CI") else "fuzz-local")

REPO = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------- config overrides

BASE = config_lib.load_config(REPO / "experiments/shapes/clip.py")
FLAT = config_lib.flat_items(BASE)
KEYS = sorted(FLAT) + ["model", "train", "data.name.x", "", ".", "train..steps", "nope",
                       "mesh.data.x", "Train.steps", " train.steps "]
VALUES = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["true", "False", "none", "nan", "-inf", "1e309", "0x10", "1_000", "()",
                     "(1, 2)", "[a,b]", "1,", "٣", "²", "-0", " 7 ", "1" * 5000, "=", "a=b"]),
    st.integers().map(str), st.floats().map(str))
OVERRIDES = st.one_of(st.text(max_size=60),
                      st.builds(lambda k, v: f"{k}={v}", st.sampled_from(KEYS), VALUES))


@given(st.lists(OVERRIDES, max_size=3))
def test_config_override_applies_or_raises_key_or_value_error(items):
    try:
        cfg = config_lib.apply_overrides(BASE, items)
    except (KeyError, ValueError) as e:
        assert str(e)                                  # a message, never a bare error
        return
    # Applied: still a config of the same shape whose every leaf keeps its declared type.
    assert dataclasses.is_dataclass(cfg) and type(cfg) is type(BASE)
    for key, value in config_lib.flat_items(cfg).items():
        old = FLAT[key]
        assert value is None or old is None or isinstance(value, type(old)) or (
            isinstance(old, float) and isinstance(value, float)), (key, value, old)


# ----------------------------------------------------------------------------- image loader


def _encoded(fmt, mode="RGB", size=(12, 9), **kw):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(arr).convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


SEEDS = [_encoded("PNG"), _encoded("PNG", "RGBA"), _encoded("PNG", "P"), _encoded("JPEG"),
         _encoded("JPEG", "L", progressive=True), _encoded("GIF", "P"), _encoded("BMP"),
         _encoded("TIFF"), _encoded("WEBP")]


@st.composite
def mutated_images(draw):
    """A valid encoded image with 1–8 random edits: byte overwrites (biased to the header),
    insertions, deletions, or a truncation."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 8))):
        op = draw(st.sampled_from(["set", "set_header", "insert", "delete", "truncate"]))
        if not data:
            break
        hi = min(len(data), 64) if op == "set_header" else len(data)
        i = draw(st.integers(0, hi - 1))
        if op in ("set", "set_header"):
            data[i] = draw(st.integers(0, 255))
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[i:i + draw(st.integers(1, 16))]
        else:
            del data[i:]
    return bytes(data)


def _check_load(data):
    try:
        img = load_image(data, name="fuzz")
    except ImageLoadError as e:
        assert e.kind in ("unreadable", "too large", "missing") and e.reason
        assert "fuzz" in str(e)
        return
    assert img.mode == "RGB" and img.size[0] > 0 and img.size[1] > 0
    np.asarray(img)                                    # the pixels are really there


@given(st.binary(max_size=512))
def test_random_bytes_load_or_raise_image_load_error(data):
    _check_load(data)


@pytest.mark.filterwarnings("ignore:.*:UserWarning:PIL")   # PIL's notes on corrupt TIFF tags
@given(mutated_images())
def test_mutated_images_load_or_raise_image_load_error(data):
    _check_load(data)


def test_seed_images_all_load():
    for data in SEEDS:
        assert load_image(data).size == (12, 9)


# ----------------------------------------------------------------------------- tokenizer

L = 12


@pytest.fixture(scope="module")
def tok(shapes_tokenizer):
    return shapes_tokenizer


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.one_of(st.text(), st.text(st.characters(codec="utf-8"), min_size=50, max_size=400),
                 st.binary(max_size=64)))
def test_any_text_encodes_to_bos_pieces_eos_pad(tok, text):
    ids = tok.encode([text], L)
    assert ids.shape == (1, L) and ids.dtype == np.int32
    row = ids[0]
    assert row[0] == tok.bos_id
    eos = np.flatnonzero(row == tok.eos_id)
    assert eos.size == 1                               # exactly one EOS, always present
    body, pad = row[1:eos[0]], row[eos[0] + 1:]
    assert np.all(pad == tok.pad_id)
    assert np.all((body == tok.unk_id) | ((body > tok.eos_id) & (body < tok.vocab_size)))
    assert isinstance(tok.decode(row), str)
