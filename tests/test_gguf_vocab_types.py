"""GGUF vocabularies with unusual token types or spellings, against references configured as
llama.cpp reads such files: byte-level BPE vocabularies that store some normal tokens as raw
text (Command-R's), so that two ids share one byte-level spelling."""

from __future__ import annotations

import pytest
from gguf_vocab_files import byte_spelling, write_vocab_gguf

from llm.model.tokenizer.tokenizer import Tokenizer

NORMAL = 1
def _bpe_gguf(tmp_path, name: str, extra: list[str]) -> tuple[Tokenizer, list[str]]:
    """Bytes, the merges that build 👋 in byte-level spelling, and ``extra`` tokens."""
    wave = byte_spelling("👋")
    halves = [wave[:2], wave[2:]]
    merges = [" ".join(halves[0]), " ".join(halves[1]), " ".join(halves)]
    tokens = [byte_spelling(bytes([b])) for b in range(256)]  # token id == byte
    tokens += halves + extra
    path = write_vocab_gguf(tmp_path / f"{name}.gguf", "gpt2", tokens, [NORMAL] * len(tokens),
                            merges=merges, pre="gpt-2")
    return Tokenizer.from_path(path), tokens


@pytest.mark.parametrize("order", ["raw_first", "raw_last"])
def test_bpe_raw_text_token_never_displaces_the_byte_level_one(tmp_path, order):
    wave = byte_spelling("👋")
    extra = ["👋", wave] if order == "raw_first" else [wave, "👋"]
    tok, tokens = _bpe_gguf(tmp_path, order, extra)
    byte_level = tokens.index(wave)
    assert tokens.index("👋") != byte_level
    # llama.cpp looks words up in the byte-level spelling only: whichever id comes first.
    assert tok.encode("👋a👋", add_special_tokens=False) == [byte_level, ord("a"), byte_level]
    assert tok.decode([byte_level]) == "👋"


def test_bpe_raw_text_token_alone_is_respelled(tmp_path):
    tok, tokens = _bpe_gguf(tmp_path, "raw_only", ["👋"])
    assert tok.encode("a👋", add_special_tokens=False) == [ord("a"), tokens.index("👋")]
    assert tok.decode(tok.encode("a👋")) == "a👋"


def test_bpe_duplicate_spellings_keep_the_last_id(tmp_path):
    wave = byte_spelling("👋")
    tok, tokens = _bpe_gguf(tmp_path, "dups", [wave, "x", wave, "👋", "👋"])
    last = len(tokens) - 1 - tokens[::-1].index(wave)
    assert last == len(tokens) - 3
    assert tok.encode("👋", add_special_tokens=False) == [last]
    tok, tokens = _bpe_gguf(tmp_path, "raw_dups", ["👋", "y", "👋"])
    assert tok.encode("👋", add_special_tokens=False) == [len(tokens) - 1]
