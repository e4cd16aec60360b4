"""Sentencepiece BPE tokenizer trained on the captions of the dataset in use.

A token sequence is ``[BOS] + pieces + [EOS]`` padded with ``pad_id`` to the context length.
Text is lower-cased (as in DALL·E) and runs of whitespace collapse to one space before
training and before encoding. A caption too long for the context is truncated so that the
sequence still ends with EOS; characters the model has never seen become ``unk_id``.

Fixed special ids: ``pad_id = 0``, ``unk_id = 1``, ``bos_id = 2``, ``eos_id = 3``.
"""

from __future__ import annotations

import io
import logging
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece as spm

log = logging.getLogger(__name__)

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


def normalize(text: str) -> str:
    """Lower-case and collapse whitespace (what both training and encoding see)."""
    return " ".join(text.lower().split())


def _as_str(x: Any) -> str:
    if isinstance(x, (bytes, bytearray, np.bytes_)):
        return bytes(x).decode("utf-8", errors="replace")
    return str(x)


class Tokenizer:
    """A loaded sentencepiece BPE model with fixed special ids."""

    pad_id = PAD_ID
    unk_id = UNK_ID
    bos_id = BOS_ID
    eos_id = EOS_ID

    def __init__(self, model_proto: bytes, path: str | None = None):
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.path = path
        got = (self._sp.pad_id(), self._sp.unk_id(), self._sp.bos_id(), self._sp.eos_id())
        if got != (PAD_ID, UNK_ID, BOS_ID, EOS_ID):
            raise ValueError(f"sentencepiece model {path or '<bytes>'} has special ids "
                             f"pad/unk/bos/eos={got}; expected {(PAD_ID, UNK_ID, BOS_ID, EOS_ID)}"
                             f" (train it with Tokenizer.train)")

    # ------------------------------------------------------------------ construction

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer model {str(path)!r} does not exist; train one "
                                    f"with Tokenizer.train or train_tokenizer_from_dataset")
        return cls(path.read_bytes(), str(path))

    @classmethod
    def train(cls, captions: Iterable[str | bytes], out_path: str | os.PathLike,
              vocab_size: int, *, character_coverage: float = 0.9995) -> "Tokenizer":
        """Train a BPE model on ``captions`` and write it to ``out_path`` (a ``.model`` file).

        When the corpus cannot support ``vocab_size`` pieces the size is clamped to what it
        supports (logged); a size too small for the corpus's characters is an error naming the
        minimum.
        """
        corpus = [c for c in (normalize(_as_str(c)) for c in captions) if c]
        if not corpus:
            raise ValueError("cannot train a tokenizer on an empty corpus (no non-empty captions)")
        if vocab_size < 5:
            raise ValueError(f"vocab_size must be at least 5 (4 special ids + 1), got {vocab_size}")

        def run(hard: bool) -> bytes:
            buf = io.BytesIO()
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(corpus), model_writer=buf, vocab_size=vocab_size,
                model_type="bpe", pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
                character_coverage=character_coverage, hard_vocab_limit=hard,
                num_threads=min(16, os.cpu_count() or 1), minloglevel=2)
            return buf.getvalue()

        try:
            proto = run(hard=True)
        except RuntimeError as e:
            msg = str(e)
            if "smaller than required_chars" in msg:
                m = re.search(r"(\d+) vs (\d+)", msg)
                need = m.group(2) if m else "more"
                raise ValueError(f"vocab_size {vocab_size} is too small for this corpus: it needs "
                                 f"at least {need} pieces for its characters plus the special "
                                 f"tokens") from None
            if "Vocabulary size too high" not in msg:
                raise
            proto = run(hard=False)
            got = spm.SentencePieceProcessor(model_proto=proto).vocab_size()
            log.warning("tokenizer: the corpus (%d captions) supports only %d pieces; "
                        "vocab_size clamped from %d to %d", len(corpus), got, vocab_size, got)
        out_path = Path(out_path)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_path.with_name(out_path.name + ".tmp")   # atomic: never a truncated model
        tmp.write_bytes(proto)
        os.replace(tmp, out_path)
        tok = cls(proto, str(out_path))
        log.info("tokenizer: trained BPE with %d pieces on %d captions -> %s",
                 tok.vocab_size, len(corpus), out_path)
        return tok

    # ------------------------------------------------------------------ use

    @property
    def vocab_size(self) -> int:
        return self._sp.vocab_size()

    def encode(self, texts: str | bytes | Sequence[str | bytes], context_length: int) -> np.ndarray:
        """``[N, context_length]`` int32: BOS, pieces, EOS, then ``pad_id``.

        A single string gives ``N = 1``. Over-long texts are truncated to keep the final EOS.
        """
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (BOS + EOS), got {context_length}")
        if isinstance(texts, (str, bytes, bytearray, np.bytes_)):
            texts = [texts]
        norm = [normalize(_as_str(t)) for t in texts]
        pieces = self._sp.encode(norm, out_type=int, num_threads=1) if norm else []
        out = np.full((len(norm), context_length), PAD_ID, dtype=np.int32)
        keep = context_length - 2
        for row, ids in zip(out, pieces):
            ids = ids[:keep]
            row[0] = BOS_ID
            row[1:1 + len(ids)] = ids
            row[1 + len(ids)] = EOS_ID
        return out

    def decode(self, ids: Sequence[int] | np.ndarray) -> str | list[str]:
        """Text of one id sequence (``[L]``), or a list of texts for ``[N, L]``.

        Pad, BOS and EOS are dropped; decoding of a row stops at its first EOS.
        """
        arr = np.asarray(ids)
        if arr.ndim == 2:
            return [self.decode(r) for r in arr]
        out = []
        for i in arr.tolist():
            if i == EOS_ID:
                break
            if i in (PAD_ID, BOS_ID) or not 0 <= i < self.vocab_size:
                continue
            out.append(int(i))
        return self._sp.decode(out)

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))


def train_tokenizer_from_dataset(source: Any, out_path: str | os.PathLike, vocab_size: int, *,
                                 max_captions: int = 200_000, seed: int = 0,
                                 field: str = "caption") -> Tokenizer:
    """Train a tokenizer on the captions of a random-access source (``len`` + ``[i]`` giving a
    dict with a ``caption`` field, str or bytes), using at most ``max_captions`` of them drawn
    without replacement with ``seed`` (all of them when the source is smaller)."""
    n = len(source)
    if n == 0:
        raise ValueError("cannot train a tokenizer: the data source is empty")
    if n <= max_captions:
        idx = np.arange(n)
    else:
        idx = np.sort(np.random.default_rng(seed).choice(n, size=max_captions, replace=False))
    captions = (source[int(i)][field] for i in idx)
    return Tokenizer.train(captions, out_path, vocab_size)
