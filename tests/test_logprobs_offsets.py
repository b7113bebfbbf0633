"""The server's logprobs text offsets and token bytes (llm/serve/logprobs.py) on a SentencePiece
vocabulary with byte fallback: text_offset indexes the choice's text (the text drops the first
piece's leading space; a character split over byte pieces starts where the character does; a
skipped BOS adds nothing), and the byte piece <0xFF> is the byte 0xFF, not a special token."""

from __future__ import annotations

from test_tokenizer import spm_dir, spm_model  # noqa: F401  (the fixtures of test_tokenizer.py)

from llm.model.tokenizer.tokenizer import Tokenizer
from llm.serve.logprobs import LogprobsFormatter

TEXT = "Hello world again \u00e9t\u00e9 \U0001f40d!"


def _offsets(tok: Tokenizer, ids: list[int]) -> list[int]:
    """Where each token starts in decode(ids): the decoded prefix before it, less a trailing
    U+FFFD (a character its byte pieces have not finished)."""
    return [len(tok.decode(ids[:i]).rstrip("\ufffd")) for i in range(len(ids))]


def test_text_offsets_index_the_text(spm_dir) -> None:  # noqa: F811
    tok = Tokenizer.from_path(spm_dir)
    ids = tok.encode(TEXT)  # BOS first
    assert tok.decode(ids) == TEXT and len(ids) > len(TEXT.split()) + 1
    got = LogprobsFormatter(tok).completion(ids, [None] * len(ids))["text_offset"]
    assert got == _offsets(tok, ids)
    assert got[0] == got[1] == 0  # the skipped BOS, then "Hello" without its "▁"
    cut = LogprobsFormatter(tok)  # the same offsets in two chunks of a stream
    assert (cut.completion(ids[:5], [None] * 5)["text_offset"]
            + cut.completion(ids[5:], [None] * (len(ids) - 5))["text_offset"]) == got


def test_the_byte_piece_ff_is_that_byte(spm_dir) -> None:  # noqa: F811
    tok = Tokenizer.from_path(spm_dir)
    (ff,) = [i for i, b in enumerate(tok.token_bytes()) if b == b"\xff"]
    assert LogprobsFormatter(tok).raw(ff) == b"\xff"
    bos = tok.encode("", add_special_tokens=True)[0]
    assert LogprobsFormatter(tok).raw(bos) == b"<s>"  # a special token: its text's bytes
