"""Local-file tokenizers: file checks, fixed-length batches, truncation, padding, counting."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ldm.tokenizers import BertTokenizer, CLIPTokenizer, load_tokenizer
from ldm_serve.errors import ConfigError, TokenizerFilesMissing
from tests.tiny import BERT_TINY, CLIP_TINY
from tests.tokenizer_files import (
    BERT_SPECIALS,
    CLIP_WORDS,
    bert_vocab_tokens,
    clip_vocab_and_merges,
    write_bert_vocab,
    write_clip_tokenizer,
)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_clip_tokenizer(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_bert_vocab(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def clip_vocab() -> dict[str, int]:
    return clip_vocab_and_merges()[0]


def test_test_vocabularies_fit_tiny_models() -> None:
    assert len(clip_vocab_and_merges()[0]) <= CLIP_TINY.vocab_size
    assert len(bert_vocab_tokens()) <= BERT_TINY.vocab_size


@pytest.mark.parametrize("absent", [["vocab.json"], ["merges.txt"], ["vocab.json", "merges.txt"]])
def test_clip_missing_files_are_named(tmp_path: Path, absent: list[str]) -> None:
    write_clip_tokenizer(tmp_path)
    for name in absent:
        (tmp_path / name).unlink()
    with pytest.raises(TokenizerFilesMissing) as info:
        CLIPTokenizer.from_dir(tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message
    for name in absent:
        assert name in message
    present = {"vocab.json", "merges.txt"} - set(absent)
    for name in present:
        assert name not in message


def test_bert_missing_vocab_is_named(tmp_path: Path) -> None:
    with pytest.raises(TokenizerFilesMissing, match="vocab.txt") as info:
        load_tokenizer(tmp_path / "nowhere", "bert")
    assert str(tmp_path / "nowhere") in str(info.value)
    assert isinstance(info.value, FileNotFoundError)


def test_clip_batch_shape_and_template(clip_dir: Path, clip_vocab: dict[str, int]) -> None:
    tok = CLIPTokenizer.from_dir(clip_dir)
    ids = tok(["a photo of a cat", "dog"])
    assert ids.dtype == torch.long and ids.shape == (2, 77)
    bos, eos = clip_vocab["<|startoftext|>"], clip_vocab["<|endoftext|>"]
    # Every test word is one "word</w>" token in the tiny vocabulary.
    expected = [bos, *(clip_vocab[w + "</w>"] for w in "a photo of a cat".split()), eos]
    assert ids[0, : len(expected)].tolist() == expected
    assert (ids[0, len(expected) :] == eos).all()  # SD 1.x pads with EOS
    assert ids[1, :3].tolist() == [bos, clip_vocab["dog</w>"], eos]


def test_clip_lowercases_and_collapses_whitespace(clip_dir: Path) -> None:
    tok = CLIPTokenizer.from_dir(clip_dir)
    a, b = tok(["a photo of a cat", "  A\tPHOTO \n of a   Cat "])
    assert torch.equal(a, b)


def test_clip_sd2_pads_with_exclamation_mark(clip_dir: Path, clip_vocab: dict[str, int]) -> None:
    tok = CLIPTokenizer.from_dir(clip_dir, pad_token="!")
    assert tok.pad_id == clip_vocab["!"] == 0
    ids = tok(["cat"])
    assert ids[0, :3].tolist() == [clip_vocab["<|startoftext|>"], clip_vocab["cat</w>"], clip_vocab["<|endoftext|>"]]
    assert (ids[0, 3:] == 0).all()
    assert CLIPTokenizer.from_dir(clip_dir, pad_token=0).pad_id == 0


def test_clip_unknown_pad_token(clip_dir: Path) -> None:
    with pytest.raises(ConfigError, match="pad token"):
        CLIPTokenizer.from_dir(clip_dir, pad_token="<pad>")


def test_clip_truncation_keeps_eos_and_count_is_untruncated(clip_dir: Path, clip_vocab: dict[str, int]) -> None:
    tok = CLIPTokenizer.from_dir(clip_dir)
    words = list(CLIP_WORDS) * 4  # 112 one-token words
    text = " ".join(words)
    assert tok.count_tokens(text) == len(words) + 2
    ids = tok([text])[0]
    assert ids[0] == clip_vocab["<|startoftext|>"]
    assert ids[-1] == clip_vocab["<|endoftext|>"]
    assert ids[1:-1].tolist() == [clip_vocab[w + "</w>"] for w in words[:75]]


def test_clip_exactly_max_length_is_not_cut(clip_dir: Path, clip_vocab: dict[str, int]) -> None:
    tok = CLIPTokenizer.from_dir(clip_dir, max_length=8)
    words = ["cat", "dog", "moon", "tree", "red", "blue"]
    assert tok.count_tokens(" ".join(words)) == 8
    ids = tok([" ".join(words)])[0].tolist()
    assert ids[1:-1] == [clip_vocab[w + "</w>"] for w in words]
    cut = tok([" ".join([*words, "oil"])])[0].tolist()
    assert cut == ids  # the extra word is dropped, EOS stays last


def test_clip_out_of_vocabulary_text_falls_back_to_bytes(clip_dir: Path, clip_vocab: dict[str, int]) -> None:
    tok = CLIPTokenizer.from_dir(clip_dir)
    # "zq" has no merge: byte "z" then end-of-word byte "q</w>".
    assert tok.encode("zq")[1:-1] == [clip_vocab["z"], clip_vocab["q</w>"]]
    assert tok.count_tokens("") == 2


def test_clip_single_string_is_one_row(clip_dir: Path) -> None:
    tok = CLIPTokenizer.from_dir(clip_dir)
    assert torch.equal(tok("a cat"), tok(["a cat"]))


def test_bert_template_padding_and_truncation(bert_dir: Path) -> None:
    vocab = {t: i for i, t in enumerate(bert_vocab_tokens())}
    tok = BertTokenizer.from_dir(bert_dir, max_length=10)
    ids = tok(["A photo of a CAT", "x " * 20])
    assert ids.shape == (2, 10)
    expected = [vocab["[CLS]"], vocab["a"], vocab["photo"], vocab["of"], vocab["a"], vocab["cat"], vocab["[SEP]"]]
    assert ids[0, :7].tolist() == expected
    assert (ids[0, 7:] == vocab["[PAD]"]).all() and vocab["[PAD]"] == BERT_SPECIALS.index("[PAD]")
    assert ids[1].tolist() == [vocab["[CLS]"], *[vocab["x"]] * 8, vocab["[SEP]"]]
    assert tok.count_tokens("x " * 20) == 22


def test_bert_wordpieces_accents_and_unknowns(bert_dir: Path) -> None:
    vocab = {t: i for i, t in enumerate(bert_vocab_tokens())}
    tok = BertTokenizer.from_dir(bert_dir)
    assert tok.encode("Café riding")[1:-1] == [vocab["cafe"], vocab["riding"]]
    assert tok.encode("unbelievable")[1:-1] == [vocab["un"], vocab["##believ"], vocab["##able"]]
    assert tok.encode("猫")[1:-1] == [vocab["[UNK]"]]


def test_bert_vocab_without_specials_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "vocab.txt").write_text("a\nb\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"\[CLS\]"):
        BertTokenizer.from_dir(tmp_path)


def test_load_tokenizer_dispatch(clip_dir: Path, bert_dir: Path) -> None:
    assert isinstance(load_tokenizer(clip_dir, "clip", pad_token="!"), CLIPTokenizer)
    assert isinstance(load_tokenizer(bert_dir, "bert", max_length=16), BertTokenizer)
    with pytest.raises(ConfigError):
        load_tokenizer(clip_dir, "t5")  # type: ignore[arg-type]


def test_clip_tokenizer_reads_a_tokenizer_json_only_folder(tmp_path) -> None:
    """transformers >= 5 saves just tokenizer.json; its BPE tables give the same ids."""
    import json as _json

    from ldm.tokenizers import CLIPTokenizer as _CLIP
    from tests.tokenizer_files import write_clip_tokenizer as _write

    src = _write(tmp_path / "files")
    vocab = _json.loads((src / "vocab.json").read_text())
    merges = [ln for ln in (src / "merges.txt").read_text().splitlines()[1:] if ln.strip()]
    only = tmp_path / "json"
    only.mkdir()
    (only / "tokenizer.json").write_text(
        _json.dumps({"model": {"type": "BPE", "vocab": vocab, "merges": [m.split() for m in merges]}})
    )
    prompts = ["a photo of a cat", "The  Moon, at NIGHT!", "unknownword 42"]
    assert _CLIP.from_dir(only)(prompts).tolist() == _CLIP.from_dir(src)(prompts).tolist()
