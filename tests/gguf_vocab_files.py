"""Small GGUF vocabulary files for tokenizer tests, written with the gguf library's writer."""

from __future__ import annotations

from pathlib import Path

import pytest


def byte_spelling(text: str | bytes) -> str:
    """``text`` (or raw bytes) spelled in GPT-2's byte alphabet, as byte-level BPE vocabularies
    store tokens; built from the alphabet's definition: printable Latin-1 bytes stand for
    themselves, the others take the code points from 256 on, in byte order."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    moved = [b for b in range(256) if b not in keep]
    table = {b: chr(b) for b in keep} | {b: chr(256 + i) for i, b in enumerate(moved)}
    data = text.encode("utf-8") if isinstance(text, str) else text
    return "".join(table[b] for b in data)


def write_vocab_gguf(path: Path, model: str, tokens: list[str], types: list[int], *,
                     merges: list[str] | None = None, scores: list[float] | None = None,
                     pre: str | None = None, bos_id: int | None = None,
                     eos_id: int | None = None, unk_id: int | None = None) -> Path:
    """A GGUF holding only a tokenizer (``tokenizer.ggml.*``) and the architecture name."""
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model(model)
    if pre is not None:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if scores is not None:
        writer.add_token_scores(scores)
    if merges is not None:
        writer.add_token_merges(merges)
    for value, add in ((bos_id, writer.add_bos_token_id), (eos_id, writer.add_eos_token_id),
                       (unk_id, writer.add_unk_token_id)):
        if value is not None:
            add(value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
