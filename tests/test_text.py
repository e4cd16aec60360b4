"""The sentencepiece tokenizer: fixed-length BOS…EOS sequences, truncation, robustness."""

import logging

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from unclip_jax.core.text import Tokenizer, train_tokenizer_from_dataset

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
SHAPES = ["circle", "square", "triangle", "star"]
L = 16


def _captions(n=400):
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        c1, c2 = rng.choice(COLOURS, 2)
        s1, s2 = rng.choice(SHAPES, 2)
        out.append(f"a small {c1} {s1} to the left of a {c2} {s2}")
    return out


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return Tokenizer.train(_captions(), tmp_path_factory.mktemp("tok") / "t.model", 96)


def _check_row(row, tok):
    assert row[0] == tok.bos_id
    nonpad = np.flatnonzero(row != tok.pad_id)
    last = nonpad[-1]
    assert row[last] == tok.eos_id
    assert np.count_nonzero(row == tok.eos_id) == 1
    assert np.all(row[last + 1:] == tok.pad_id)
    assert np.all(row[:last + 1] != tok.pad_id)


def test_special_ids_and_load(tok, tmp_path):
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    assert tok.vocab_size == 96
    again = Tokenizer.load(tok.path)
    np.testing.assert_array_equal(again.encode("a red star", L), tok.encode("a red star", L))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer.load(tmp_path / "nope.model")


def test_round_trip_and_fixed_length(tok):
    texts = ["a small red circle to the left of a blue square", "a green star", "purple"]
    ids = tok.encode(texts, L)
    assert ids.shape == (3, L) and ids.dtype == np.int32
    for row in ids:
        _check_row(row, tok)
    assert tok.decode(ids) == texts
    assert tok.decode(ids[1]) == "a green star"


def test_lower_case_and_whitespace(tok):
    np.testing.assert_array_equal(tok.encode("  A  Small\tRED\n circle ", L),
                                  tok.encode("a small red circle", L))
    assert tok.decode(tok.encode("A RED Star", L)[0]) == "a red star"


def test_bytes_input(tok):
    np.testing.assert_array_equal(tok.encode(b"a red star", L), tok.encode("a red star", L))


def test_truncation_keeps_eos(tok):
    long = " ".join(["a small red circle to the left of a blue square"] * 10)
    row = tok.encode(long, 8)[0]
    assert row.shape == (8,)
    assert row[0] == tok.bos_id and row[-1] == tok.eos_id
    assert np.all(row[1:-1] > tok.eos_id)
    _check_row(row, tok)


def test_empty_string(tok):
    row = tok.encode("", L)[0]
    assert row[0] == tok.bos_id and row[1] == tok.eos_id and np.all(row[2:] == tok.pad_id)
    assert tok.encode([], L).shape == (0, L)
    with pytest.raises(ValueError, match="context_length"):
        tok.encode("x", 1)


def test_unicode_and_emoji_do_not_crash(tok):
    ids = tok.encode(["un cercle rouge à gauche 😀🎉", "日本語のテキスト", "\x00\u200b zero"], L)
    for row in ids:
        _check_row(row, tok)
    assert tok.unk_id in ids[1]
    assert isinstance(tok.decode(ids[0]), str)


def test_clamps_vocab_on_small_corpus(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        t = Tokenizer.train(["a red circle", "a blue square"], tmp_path / "s.model", 5000)
    assert 5 < t.vocab_size < 5000
    assert "clamped" in caplog.text
    assert t.decode(t.encode("a red circle", 8)[0]) == "a red circle"


def test_bad_corpora(tmp_path):
    with pytest.raises(ValueError, match="empty corpus"):
        Tokenizer.train(["", "   "], tmp_path / "e.model", 64)
    with pytest.raises(ValueError, match="too small"):
        Tokenizer.train(_captions(50), tmp_path / "x.model", 8)


def test_train_from_dataset(tmp_path):
    source = [{"caption": c.encode()} for c in _captions(300)]
    t = train_tokenizer_from_dataset(source, tmp_path / "d.model", 80, max_captions=100)
    assert t.vocab_size == 80
    assert (tmp_path / "d.model").is_file()
    assert t.decode(t.encode("a blue star", L)[0]) == "a blue star"


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=80))
def test_any_unicode_string(tok, text):
    row = tok.encode(text, L)[0]
    assert row.shape == (L,) and row.dtype == np.int32
    assert np.all((row >= 0) & (row < tok.vocab_size))
    _check_row(row, tok)
    assert isinstance(tok.decode(row), str)
