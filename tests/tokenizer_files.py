"""Write tiny but real tokenizer files for tests (no downloads).

* :func:`write_clip_tokenizer` writes a CLIP BPE tokenizer in the diffusers
  layout (``vocab.json`` + ``merges.txt`` with the ``#version`` header). The
  vocabulary is ordered exactly like OpenAI CLIP's: the 256 byte symbols, the
  same 256 with ``</w>``, one entry per merge, then ``<|startoftext|>`` and
  ``<|endoftext|>``. Merges spell out :data:`CLIP_WORDS`, so those words become
  single tokens while any other text still tokenizes (byte by byte). The byte
  order puts ``"!"`` at id 0, the SD 2.x pad id.
* :func:`write_bert_vocab` writes a BERT ``vocab.txt`` with the five specials,
  punctuation, digits, letters, ``##`` continuations and :data:`BERT_WORDS`.

Both fit the tiny model configs: ``CLIP_TINY.vocab_size`` (1000) and
``BERT_TINY.vocab_size`` (200). Both return the directory they wrote into, so
``CLIPTokenizer.from_dir(write_clip_tokenizer(tmp_path))`` works.
"""

from __future__ import annotations

import json
import string
from collections.abc import Iterable
from pathlib import Path

CLIP_WORDS: tuple[str, ...] = (
    "a", "an", "the", "of", "on", "in", "and", "with", "by", "photo", "painting",
    "cat", "dog", "horse", "astronaut", "riding", "moon", "city", "night", "red",
    "blue", "house", "tree", "style", "portrait", "beautiful", "landscape", "oil",
)  # fmt: skip
"""Words whose merges are in the tiny CLIP vocabulary (each becomes one ``word</w>`` token)."""

CLIP_EXTRA_MERGES: tuple[tuple[str, str], ...] = (("'", "s</w>"), ("t", "h"), ("i", "n"), ("e", "r"))
"""Merges beyond the word list: a contraction and a few common sub-word pairs."""

BERT_SPECIALS: tuple[str, ...] = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
"""First five lines of the tiny ``vocab.txt`` (ids 0..4)."""

BERT_WORDS: tuple[str, ...] = (
    "a", "an", "the", "of", "on", "in", "photo", "painting", "cat", "dog", "horse",
    "astronaut", "riding", "moon", "cafe", "play", "run", "house", "red", "blue",
    "un", "##s", "##ing", "##ed", "##believ", "##able", "##er",
)  # fmt: skip
"""Whole words and word pieces in the tiny BERT vocabulary, after the single characters."""


def clip_byte_encoder() -> dict[int, str]:
    """Byte value -> the printable character standing for it, in CLIP's vocabulary order.

    Bytes that are printable Latin-1 characters stand for themselves and come
    first; the rest (controls, space, ...) get ``chr(256 + k)`` in increasing
    byte order and follow.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + k) for k, b in enumerate(others)}


def clip_byte_symbols() -> list[str]:
    """The 256 byte symbols in vocabulary order (``"!"`` first); index is NOT the byte value."""
    return list(clip_byte_encoder().values())


def bpe_merge(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE on one word: merge the adjacent pair of lowest rank, every occurrence, until none applies.

    A plain-Python statement of the algorithm, used to design the test vocabulary
    and as an independent reference in parity tests.
    """
    word = list(symbols)
    while len(word) > 1:
        pairs = {(a, b) for a, b in zip(word, word[1:], strict=False)}
        best = min(pairs, key=lambda p: ranks.get(p, len(ranks)))
        if best not in ranks:
            break
        merged: list[str] = []
        i = 0
        while i < len(word):
            if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                merged.append(word[i] + word[i + 1])
                i += 2
            else:
                merged.append(word[i])
                i += 1
        word = merged
    return word


def clip_merges_for(words: Iterable[str]) -> list[tuple[str, str]]:
    """Merges under which each (ASCII) word becomes the single symbol ``word</w>``.

    New merges are appended with the highest rank, so they never change how an
    earlier word is merged: for a word, BPE is run with the merges so far and the
    first two remaining symbols are joined until one symbol is left.
    """
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        symbols = [*word[:-1], word[-1] + "</w>"]
        while len(parts := bpe_merge(symbols, ranks)) > 1:
            pair = (parts[0], parts[1])
            ranks[pair] = len(merges)
            merges.append(pair)
    return merges


def clip_vocab_and_merges(words: Iterable[str] = CLIP_WORDS) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The tiny CLIP vocabulary (token -> id) and its merge list, in rank order."""
    merges = clip_merges_for(words)
    merges += [m for m in CLIP_EXTRA_MERGES if m not in merges]
    symbols = clip_byte_symbols()
    tokens = [*symbols, *(s + "</w>" for s in symbols), *(a + b for a, b in merges)]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    return vocab, merges


def write_clip_tokenizer(directory: str | Path, words: Iterable[str] = CLIP_WORDS) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` into ``directory`` (created) and return it."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab_and_merges(words)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
    (out / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def bert_vocab_tokens() -> list[str]:
    """Lines of the tiny BERT ``vocab.txt``; a token's id is its index."""
    singles = [*string.punctuation, *string.digits, *string.ascii_lowercase]
    pieces = ["##" + c for c in string.ascii_lowercase]
    tokens = [*BERT_SPECIALS, *singles, *pieces]
    return tokens + [w for w in BERT_WORDS if w not in tokens]


def write_bert_vocab(directory: str | Path) -> Path:
    """Write ``vocab.txt`` into ``directory`` (created) and return it."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.txt").write_text("\n".join(bert_vocab_tokens()) + "\n", encoding="utf-8")
    return out
