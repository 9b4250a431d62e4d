"""Tokenizer vs transformers' sentencepiece-backed slow Llama tokenizer (legacy=True) on the shipped model."""

from __future__ import annotations

import os
import pickle
import sys

import pytest

from titan_llava.constants import IMAGE_TOKEN_INDEX
from titan_llava.data.tokenizer import Tokenizer

TOKENIZER_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "tokenizer")
MODEL = os.path.join(TOKENIZER_DIR, "tokenizer.model")

TEXTS = [
    "",
    "hello",
    " hello",
    "  two leading spaces",
    "trailing space ",
    "USER: What is in the image? ASSISTANT: A cat.</s>",
    "a</s>b",
    "a </s> b",
    "</s>",
    "</s></s>x",
    "x</s></s>",
    "line one\nline two\n\n",
    "\nstarts with a newline",
    "digits 1234567890 and 3.14",
    "unicode: café naïve 世界 🙂 Ω",
    "tabs\tand\r\nwindows newlines",
    "<image>\nis not special for the tokenizer",
    "A chat between a curious user and an artificial intelligence assistant.",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(MODEL)


@pytest.fixture(scope="module")
def hf_slow():
    transformers = pytest.importorskip("transformers")
    # transformers 5 keeps the slow sentencepiece path as SentencePieceBackend (LlamaTokenizer is now
    # tokenizers-backed); legacy=True keeps the dummy prefix on every chunk, like LLaVA's tokenizer.
    return transformers.SentencePieceBackend(
        vocab_file=MODEL, legacy=True, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def test_special_ids_and_vocab(tok: Tokenizer):
    assert (tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.pad_id == tok.unk_id
    assert tok.vocab_size == 1000
    assert [tok.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_slow_legacy_llama(tok: Tokenizer, hf_slow, text: str):
    expected = hf_slow.convert_tokens_to_ids(hf_slow.tokenize(text))
    assert tok.encode(text) == expected
    assert tok.encode(text, bos=True) == [hf_slow.bos_token_id] + expected
    assert tok.encode(text, bos=True, eos=True) == [hf_slow.bos_token_id] + expected + [2]


def test_every_chunk_gets_the_dummy_prefix(tok: Tokenizer):
    ids = tok.encode("a</s>b")
    assert ids[1] == tok.eos_id
    assert tok.id_to_piece(ids[0]).startswith("\u2581")
    assert tok.id_to_piece(ids[2]).startswith("\u2581")
    # Empty chunks produce nothing: consecutive `</s>` are consecutive eos ids.
    assert tok.encode("</s></s>") == [tok.eos_id, tok.eos_id]


def test_shipped_model_is_llama_like(tok: Tokenizer):
    # Byte fallback: a character unseen in the corpus becomes its UTF-8 bytes, never unk.
    pieces = [tok.id_to_piece(i) for i in tok.encode("\u4e16")]
    assert pieces == ["\u2581", "<0xE4>", "<0xB8>", "<0x96>"]
    # Split digits, identity normalisation (full-width A is not NFKC-folded), whitespace verbatim.
    assert [tok.id_to_piece(i) for i in tok.encode("2024")] == ["\u2581", "2", "0", "2", "4"]
    assert "A" not in tok.decode(tok.encode("\uff21"))
    assert tok.decode(tok.encode("a   b")) == "a   b"
    assert 0 not in tok.encode("unicode: café naïve 世界 🙂 Ω \x00")


def test_shipped_model_is_reproducible(tmp_path):
    sys.path.insert(0, TOKENIZER_DIR)
    try:
        import train_tokenizer
    finally:
        sys.path.remove(TOKENIZER_DIR)
    with open(MODEL, "rb") as f:
        assert train_tokenizer.train_bytes() == f.read()


@pytest.mark.parametrize("text", ["hello world", "USER: hi ASSISTANT: 12 + 30 = 42", "café\n世界"])
def test_decode_roundtrip(tok: Tokenizer, text: str):
    assert tok.decode(tok.encode(text, bos=True)) == text


def test_decode_renders_image_placeholder(tok: Tokenizer):
    ids = tok.encode("hi", bos=True) + [IMAGE_TOKEN_INDEX] + tok.encode("there")
    assert tok.decode(ids) == "hi<image>there"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([5, 1000])


def test_pickles_for_worker_processes(tok: Tokenizer):
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode(TEXTS[5], bos=True) == tok.encode(TEXTS[5], bos=True)


def test_missing_or_invalid_model_raises(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        Tokenizer(str(tmp_path / "nope.model"))
    bogus = tmp_path / "bogus.model"
    bogus.write_text("not a model")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        Tokenizer(str(bogus))
