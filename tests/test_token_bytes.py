"""Token bytes (the tokenizer bridge of structured output): the bytes of a text's tokens join to
the text's UTF-8 bytes, for the default model's GGUF vocabulary (byte-level BPE), a tokenizer.json
directory and a SentencePiece model with byte fallback; special tokens are 0xFF + their text; and
llguidance's tokenizer built from them tokenizes as ours does."""

from __future__ import annotations

import pytest
from test_tokenizer import (  # the tokenizer fixtures of test_tokenizer.py
    DEFAULT_GGUF,
    DIGIT_TEXTS,
    MULTIBYTE_TEXTS,
    TEXTS,
    hf_dirs,  # noqa: F401
    needs_default_model,
    spm_dir,  # noqa: F401
    spm_model,  # noqa: F401
)

from llm.engine.grammar import Grammars
from llm.model.tokenizer.token_bytes import SPECIAL_PREFIX
from llm.model.tokenizer.tokenizer import Tokenizer

SAMPLES = TEXTS + DIGIT_TEXTS + MULTIBYTE_TEXTS + ['{"a": [1, 2.5e-3], "b": "\\u00e9\\n"}']


def _expected(text: str, specials: list[str]) -> bytes:
    """The text's bytes with each special token's text marked by the 0xFF prefix."""
    out = text.encode()
    for name in specials:
        out = out.replace(name.encode(), SPECIAL_PREFIX + name.encode())
    return out


def _joined(tok: Tokenizer, text: str) -> bytes:
    table = tok.token_bytes()
    return b"".join(table[i] for i in tok.encode(text, add_special_tokens=False))


def _check_specials(tok: Tokenizer, names: list[str]) -> None:
    table = tok.token_bytes()
    assert len(table) == tok.vocab_size
    for name in names:
        (token,) = tok.encode(name, add_special_tokens=False)
        assert table[token] == SPECIAL_PREFIX + name.encode()


@needs_default_model
def test_default_model_token_bytes_join_to_the_text() -> None:
    tok = Tokenizer.from_path(DEFAULT_GGUF)
    specials = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
    for text in SAMPLES:
        assert _joined(tok, text) == _expected(text, specials), text
    _check_specials(tok, specials)
    assert tok.token_bytes() is tok.token_bytes()  # computed once


def test_tokenizer_json_token_bytes_join_to_the_text(hf_dirs) -> None:  # noqa: F811
    tok = Tokenizer.from_path(hf_dirs["plain"])
    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    for text in SAMPLES:
        assert _joined(tok, text) == _expected(text, specials), text
    _check_specials(tok, specials)


def test_sentencepiece_token_bytes_join_to_the_text(spm_dir) -> None:  # noqa: F811
    tok = Tokenizer.from_path(spm_dir)
    for text in [t for t in SAMPLES if t and "<" not in t]:  # (no specials: each run prefixed)
        # sentencepiece's dummy prefix: the first piece carries a space the text does not have
        assert _joined(tok, text) == b" " + text.encode(), text
    table = tok.token_bytes()
    assert table[tok.encode("\x07", add_special_tokens=False)[-1]] == b"\x07"  # a byte piece
    _check_specials(tok, ["<s>", "</s>"])


@needs_default_model
def test_llguidance_vocabulary_agrees_with_the_tokenizer() -> None:
    llguidance = pytest.importorskip("llguidance")
    tok = Tokenizer.from_path(DEFAULT_GGUF)
    vocab = Grammars(tok, tok.vocab_size)._vocabulary("test")
    assert isinstance(vocab, llguidance.LLTokenizer)
    assert vocab.vocab_size == tok.vocab_size and vocab.eos_tokens == list(tok.eos_ids)
    for text in SAMPLES:
        ids = tok.encode(text, add_special_tokens=False)
        assert vocab.decode_bytes(ids) == text.encode(), text  # (llguidance drops the 0xFF)
        assert vocab.tokenize_str(text) == ids, text
    assert Grammars(tok, tok.vocab_size)._vocabulary("test") is not vocab  # per engine, no global
