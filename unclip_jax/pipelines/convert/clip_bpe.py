"""CLIP's byte-level BPE tokenizer (OpenAI CLIP / open_clip ``SimpleTokenizer`` ids).

The vocabulary is the merges file OpenAI published, ``bpe_simple_vocab_16e6.txt.gz`` (shipped
inside the ``open_clip`` and ``clip`` packages; point :class:`ClipBPETokenizer` at it). Ids:
256 byte symbols (printable bytes first), the same with the end-of-word mark ``</w>``, the
first 48 894 merges, then ``<start_of_text>`` (49406) and ``<end_of_text>`` (49407): 49408.

Text processing, as open_clip's default (``clean="lower"``):
``ftfy.fix_text`` → ``html.unescape`` twice → strip → collapse whitespace → lower-case → split
with CLIP's regex → bytes → BPE. Rows are ``[SOT] + ids + [EOT]`` zero-padded to
``context_length`` (77); a longer row is cut to ``context_length`` with EOT as its last id.

Differences when optional packages are missing (ids then may differ on unusual text only):

* without ``ftfy``: ``unicodedata.normalize("NFC")`` instead of ``ftfy.fix_text`` — mojibake
  is not repaired, curly quotes, full-width forms and ligatures are kept as they are;
* without ``regex``: Python ``re`` with ``\\p{L}`` / ``\\p{N}`` spelled out as code-point
  ranges from ``unicodedata`` (built once, ~1 s): identical unless the two packages ship
  different Unicode versions (then only characters new in one of them can differ).
"""

from __future__ import annotations

import gzip
import html
import os
import sys
import unicodedata
from functools import lru_cache
from pathlib import Path

import numpy as np

SOT = "<start_of_text>"
EOT = "<end_of_text>"
CONTEXT_LENGTH = 77
NUM_MERGES = 49152 - 256 - 2        # merges used by CLIP (the file holds more)

try:  # CLIP's pattern uses the Unicode classes \p{L} / \p{N} of the `regex` package
    import regex as _re

    HAVE_REGEX = True
except ImportError:  # pragma: no cover - depends on the environment
    import re as _re

    HAVE_REGEX = False


@lru_cache(maxsize=None)
def _category_class(prefix: str) -> str:
    """``re`` character-class body for every code point whose Unicode category starts with
    ``prefix`` ("L" letters, "N" numbers): ``\\p{L}`` / ``\\p{N}`` for the standard ``re``."""
    ranges, start, prev = [], None, None
    for cp in range(sys.maxunicode + 1):
        if unicodedata.category(chr(cp)).startswith(prefix):
            if start is None:
                start = cp
            prev = cp
        elif start is not None:
            ranges.append((start, prev))
            start = None
    if start is not None:
        ranges.append((start, prev))
    return "".join(f"\\U{a:08x}" if a == b else f"\\U{a:08x}-\\U{b:08x}" for a, b in ranges)


def _word_classes() -> tuple[str, str, str]:
    """(letters, one number, other) sub-patterns of CLIP's pre-tokenizer."""
    if HAVE_REGEX:
        return r"\p{L}+", r"\p{N}", r"[^\s\p{L}\p{N}]+"
    letters, numbers = _category_class("L"), _category_class("N")
    return f"[{letters}]+", f"[{numbers}]", f"[^\\s{letters}{numbers}]+"


try:
    import ftfy as _ftfy

    HAVE_FTFY = True
except ImportError:  # pragma: no cover - depends on the environment
    _ftfy = None
    HAVE_FTFY = False


@lru_cache(maxsize=1)
def byte_symbols() -> dict[int, str]:
    """Byte → printable character: printable Latin-1 bytes map to themselves, the other 68
    bytes (controls, space, ...) to ``chr(256 + n)`` in byte order.

    The dict's order is the vocabulary's: the 188 printable bytes first, then the other 68.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    for n, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + n)
    return table


def clean_text(text: str) -> str:
    """open_clip's ``clean="lower"``: fix unicode, unescape HTML, collapse spaces, lower."""
    text = _ftfy.fix_text(text) if HAVE_FTFY else unicodedata.normalize("NFC", text)
    text = html.unescape(html.unescape(text)).strip()
    return " ".join(text.split()).lower()


def _read_merges(path: Path) -> list[tuple[str, str]]:
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    lines = raw.decode("utf-8").split("\n")[1:NUM_MERGES + 1]   # line 0 is a version header
    while lines and not lines[-1].strip():                        # a short file's final "\n"
        lines.pop()
    merges = []
    for n, line in enumerate(lines, 2):
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{str(path)!r} line {n}: expected a merge 'a b', got {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


class ClipBPETokenizer:
    """Text → CLIP token ids (``encode``), and ``[N, context_length]`` int32 batches
    (``__call__``). ``vocab_path``: the merges file (``.txt`` or ``.txt.gz``)."""

    def __init__(self, vocab_path: str | os.PathLike, context_length: int = CONTEXT_LENGTH):
        path = Path(vocab_path)
        if not path.is_file():
            raise FileNotFoundError(f"no BPE vocabulary at {str(path)!r}; CLIP's is "
                                    "bpe_simple_vocab_16e6.txt.gz (in the open_clip package)")
        merges = _read_merges(path)
        symbols = list(byte_symbols().values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
        vocab += [SOT, EOT]
        self.encoder = {tok: i for i, tok in enumerate(vocab)}
        self.decoder = {i: tok for tok, i in self.encoder.items()}
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.byte_encoder = byte_symbols()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.sot_id, self.eot_id = self.encoder[SOT], self.encoder[EOT]
        self.vocab_size = len(vocab)
        self.context_length = context_length
        self._cache = {SOT: SOT, EOT: EOT}
        self.pattern = _re.compile(
            "|".join([SOT, EOT, r"'s", r"'t", r"'re", r"'ve", r"'m", r"'ll", r"'d",
                      *_word_classes()]), _re.IGNORECASE)

    def _bpe(self, word: str) -> list[str]:
        """One pre-token (already byte-mapped) → its BPE symbols (the last ends in ``</w>``)."""
        if word in self._cache:
            return self._cache[word].split(" ")
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            ranked = [(self.ranks.get(pair, None), pair) for pair in zip(parts, parts[1:])]
            ranked = [(r, pair) for r, pair in ranked if r is not None]
            if not ranked:
                break
            first, second = min(ranked)[1]
            merged, i = [], 0
            while i < len(parts):           # merge every occurrence, left to right
                if i + 1 < len(parts) and parts[i] == first and parts[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        self._cache[word] = " ".join(parts)
        return parts

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no SOT/EOT added)."""
        ids = []
        for piece in self.pattern.findall(clean_text(text)):
            mapped = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[s] for s in self._bpe(mapped))
        return ids

    def decode(self, ids) -> str:
        """Ids → text (``</w>`` becomes a space; special tokens kept as text)."""
        text = "".join(self.decoder[int(i)] for i in ids)
        data = bytearray(self.byte_decoder.get(c, ord(" ")) for c in text.replace("</w>", " "))
        return data.decode("utf-8", errors="replace")

    def __call__(self, texts: str | list[str], context_length: int | None = None) -> np.ndarray:
        """``[N, context_length]`` int32: SOT, ids, EOT, zeros; long rows end in EOT."""
        if isinstance(texts, str):
            texts = [texts]
        length = context_length or self.context_length
        out = np.zeros((len(texts), length), np.int32)
        for row, text in enumerate(texts):
            ids = [self.sot_id, *self.encode(text), self.eot_id]
            if len(ids) > length:
                ids = ids[:length]
                ids[-1] = self.eot_id
            out[row, :len(ids)] = ids
        return out
