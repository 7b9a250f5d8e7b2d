"""Text tokenizers that read local vocabulary files only (no hub downloads).

Two tokenizers cover every text-conditioned model the service loads:

* :class:`CLIPTokenizer`: CLIP's byte-level BPE (SD 1.x / 2.x). Reads the
  diffusers layout ``tokenizer/vocab.json`` + ``tokenizer/merges.txt``.
  Pipeline, as in OpenAI CLIP's ``simple_tokenizer.py``: NFC, collapse
  whitespace, lower-case, split with CLIP's regex, map bytes to printable
  unicode, BPE with an ``</w>`` end-of-word suffix, then ``BOS ... EOS``.
  ftfy's mojibake repair is not applied (it changes nothing for clean text).
* :class:`BertTokenizer`: BERT uncased WordPiece (LDM ``BERTEmbedder``).
  Reads ``vocab.txt``; lower-cases, strips accents, splits punctuation and CJK
  characters, then ``[CLS] ... [SEP]``.

Both return fixed-length ``torch.LongTensor [B, max_length]`` rows exactly as the
reference models were fed (``padding="max_length", truncation=True``): longer
texts are cut so that the end token (EOS / ``[SEP]``) stays last, shorter ones
are padded with the pad id. ``count_tokens`` reports the untruncated length, so
that the API can reject prompts that would be cut.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers, processors

from ldm_serve.errors import ConfigError, ModelError, TokenizerFilesMissing

__all__ = [
    "CLIP_BOS",
    "CLIP_EOS",
    "BertTokenizer",
    "CLIPTokenizer",
    "TextTokenizer",
    "load_tokenizer",
]

CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"

# OpenAI CLIP's word splitter: the two specials, English contractions, runs of
# letters, single digits, runs of anything else that is not whitespace.
_CLIP_SPLIT_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def _require_files(directory: Path, names: Sequence[str]) -> list[Path]:
    """Return ``directory / name`` for each name, or raise naming every absent file."""
    paths = [directory / name for name in names]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise TokenizerFilesMissing(f"tokenizer file(s) {', '.join(missing)} not found in directory {directory}")
    return paths


class TextTokenizer:
    """Fixed-length batch encoding shared by the CLIP and BERT tokenizers.

    Args:
        tokenizer: a configured ``tokenizers.Tokenizer`` that adds the start and
            end tokens itself and neither truncates nor pads.
        max_length: row length of the returned id tensor (77 for SD / LDM).
        end_id: id of the token that closes every row (EOS / ``[SEP]``); kept
            as the last token when a text is truncated.
        pad_id: id written after the end token up to ``max_length``.
    """

    def __init__(self, tokenizer: Tokenizer, *, max_length: int, end_id: int, pad_id: int) -> None:
        if max_length < 2:
            raise ConfigError(f"tokenizer max_length must be >= 2, got {max_length}")
        self._tokenizer = tokenizer
        self.max_length = max_length
        self.end_id = end_id
        self.pad_id = pad_id

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can emit."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` with start and end tokens, neither truncated nor padded."""
        return self._tokenizer.encode(text).ids

    def count_tokens(self, text: str) -> int:
        """Number of tokens ``text`` needs, start and end tokens included."""
        return len(self.encode(text))

    def __call__(self, texts: Sequence[str] | str) -> torch.Tensor:
        """Encode a batch of texts to ``LongTensor [B, max_length]``.

        A text longer than ``max_length`` tokens keeps its first
        ``max_length - 1`` tokens followed by the end token.
        """
        if isinstance(texts, str):
            texts = [texts]
        # One text at a time: encode_batch would use the library's thread pool, which
        # it disables (with a warning) in processes forked after first use, as RQ does.
        rows = [self.encode(text) for text in texts]
        out = torch.full((len(rows), self.max_length), self.pad_id, dtype=torch.long)
        for row, ids in enumerate(rows):
            if len(ids) > self.max_length:
                ids = [*ids[: self.max_length - 1], self.end_id]
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out


class CLIPTokenizer(TextTokenizer):
    """CLIP byte-level BPE tokenizer built from ``vocab.json`` + ``merges.txt``.

    ``pad_token`` is ``"<|endoftext|>"`` for SD 1.x (HF tokenizer) and ``"!"``
    (id 0) for SD 2.x (open_clip zero padding); an int is taken as the pad id.
    The pad token only fills rows: a ``"!"`` inside a prompt still goes through
    BPE (``"!</w>"``) as in open_clip, whereas transformers' tokenizer with
    ``pad_token="!"`` turns it into the bare pad symbol.
    """

    @classmethod
    def from_dir(
        cls, path: str | Path, max_length: int = 77, pad_token: str | int = CLIP_EOS
    ) -> CLIPTokenizer:
        """Read ``vocab.json`` and ``merges.txt`` from ``path``.

        Raises:
            TokenizerFilesMissing: a file is absent (the message names it and ``path``).
            ModelError: a file cannot be parsed.
            ConfigError: the vocabulary lacks the special or pad token.
        """
        directory = Path(path)
        if not (directory / "vocab.json").is_file() and (directory / "tokenizer.json").is_file():
            # transformers >= 5 saves only tokenizer.json: take its BPE vocab and merges
            vocab_path = directory / "tokenizer.json"
            vocab, merges = _bpe_from_tokenizer_json(vocab_path)
        else:
            vocab_path, merges_path = _require_files(directory, ("vocab.json", "merges.txt"))
            try:
                vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise ModelError(f"cannot read CLIP vocabulary {vocab_path}: {exc}") from exc
            merges = _read_merges(merges_path)
        for special in (CLIP_BOS, CLIP_EOS):
            if special not in vocab:
                raise ConfigError(f"CLIP vocabulary {vocab_path} has no {special!r} token")
        pad_id = _resolve_pad_id(vocab, pad_token, vocab_path)
        return cls(_build_clip_tokenizer(vocab, merges), max_length=max_length, end_id=vocab[CLIP_EOS], pad_id=pad_id)


def _bpe_from_tokenizer_json(path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The BPE vocabulary and merge rules inside a ``tokenizers`` ``tokenizer.json``.

    Only the model's tables are read; normalisation and splitting are always CLIP's own.
    Merges are stored either as ``"a b"`` strings or as ``["a", "b"]`` pairs.
    """
    try:
        model = json.loads(path.read_text(encoding="utf-8"))["model"]
        vocab = {str(k): int(v) for k, v in model["vocab"].items()}
        raw = model["merges"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ModelError(f"cannot read a BPE vocabulary from {path}: {exc}") from exc
    merges: list[tuple[str, str]] = []
    for rule in raw:
        parts = rule.split() if isinstance(rule, str) else list(rule)
        if len(parts) != 2:
            raise ModelError(f"{path}: a merge rule must be two symbols, got {rule!r}")
        merges.append((str(parts[0]), str(parts[1])))
    return vocab, merges


def _read_merges(path: Path) -> list[tuple[str, str]]:
    """Merge rules in rank order; skips the ``#version`` header and blank lines."""
    merges: list[tuple[str, str]] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ModelError(f"cannot read CLIP merges {path}: {exc}") from exc
    for lineno, line in enumerate(lines, start=1):
        if not line.strip() or (lineno == 1 and line.startswith("#version")):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ModelError(f"{path}:{lineno}: a merge rule must be two symbols, got {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


def _resolve_pad_id(vocab: dict[str, int], pad_token: str | int, vocab_path: Path) -> int:
    if isinstance(pad_token, int):
        if not 0 <= pad_token < len(vocab):
            raise ConfigError(f"pad id {pad_token} is outside the vocabulary of {vocab_path}")
        return pad_token
    if pad_token not in vocab:
        raise ConfigError(f"pad token {pad_token!r} is not in the vocabulary {vocab_path}")
    return vocab[pad_token]


def _build_clip_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]]) -> Tokenizer:
    bpe = models.BPE(
        vocab=vocab,
        merges=merges,
        end_of_word_suffix="</w>",
        continuing_subword_prefix="",
        unk_token=CLIP_EOS,
        fuse_unk=False,
    )
    tok = Tokenizer(bpe)
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip(), normalizers.Lowercase()]
    )
    # Each CLIP regex match is one BPE word (invert + removed: keep the matches,
    # drop the whitespace between them); ByteLevel only maps bytes to symbols.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_CLIP_SPLIT_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    # The literal specials in a (lower-cased) prompt map to their ids, as in CLIP.
    tok.add_special_tokens([AddedToken(s, normalized=True, special=True) for s in (CLIP_BOS, CLIP_EOS)])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{CLIP_BOS} $A {CLIP_EOS}",
        special_tokens=[(CLIP_BOS, vocab[CLIP_BOS]), (CLIP_EOS, vocab[CLIP_EOS])],
    )
    return tok


class BertTokenizer(TextTokenizer):
    """BERT uncased WordPiece tokenizer built from ``vocab.txt`` (one token per line)."""

    CLS = "[CLS]"
    SEP = "[SEP]"
    PAD = "[PAD]"
    UNK = "[UNK]"

    @classmethod
    def from_dir(cls, path: str | Path, max_length: int = 77) -> BertTokenizer:
        """Read ``vocab.txt`` from ``path``; the pad id is that of ``[PAD]``.

        Raises:
            TokenizerFilesMissing: ``vocab.txt`` is absent (the message names it and ``path``).
            ConfigError: the vocabulary lacks ``[CLS]``, ``[SEP]``, ``[PAD]`` or ``[UNK]``.
        """
        directory = Path(path)
        (vocab_path,) = _require_files(directory, ("vocab.txt",))
        try:
            lines = vocab_path.read_text(encoding="utf-8").split("\n")
        except OSError as exc:
            raise ModelError(f"cannot read BERT vocabulary {vocab_path}: {exc}") from exc
        if lines and lines[-1] == "":
            lines.pop()  # trailing newline
        # Like HF's ``load_vocab``: a token's id is its line number (a repeated line: the last one).
        vocab = {token.rstrip("\r"): index for index, token in enumerate(lines)}
        for special in (cls.CLS, cls.SEP, cls.PAD, cls.UNK):
            if special not in vocab:
                raise ConfigError(f"BERT vocabulary {vocab_path} has no {special} token")

        tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token=cls.UNK, max_input_chars_per_word=100))
        tok.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=True, lowercase=True
        )
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.add_special_tokens(
            [AddedToken(s, special=True) for s in (cls.PAD, cls.UNK, cls.CLS, cls.SEP, "[MASK]") if s in vocab]
        )
        tok.post_processor = processors.TemplateProcessing(
            single=f"{cls.CLS} $A {cls.SEP}",
            special_tokens=[(cls.CLS, vocab[cls.CLS]), (cls.SEP, vocab[cls.SEP])],
        )
        return cls(tok, max_length=max_length, end_id=vocab[cls.SEP], pad_id=vocab[cls.PAD])


def load_tokenizer(path: str | Path, kind: Literal["clip", "bert"], **kwargs: object) -> TextTokenizer:
    """Build the tokenizer of ``kind`` from the files in ``path``.

    ``kwargs`` go to the class's ``from_dir`` (``max_length``, and ``pad_token`` for CLIP).
    """
    if kind == "clip":
        return CLIPTokenizer.from_dir(path, **kwargs)  # type: ignore[arg-type]
    if kind == "bert":
        return BertTokenizer.from_dir(path, **kwargs)  # type: ignore[arg-type]
    raise ConfigError(f"unknown tokenizer kind {kind!r}; expected 'clip' or 'bert'")
