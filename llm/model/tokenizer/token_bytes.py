"""The bytes each token id stands for: what a grammar engine matches tokens against.

A token's bytes are what it adds to the UTF-8 text when it follows other tokens (so a
SentencePiece piece "▁the" is b" the", a byte token "<0x0A>" is b"\\n", a GPT-2 byte-level
token is its bytes before the printable-alphabet spelling). Special (control) tokens never occur
in text: their bytes are 0xFF followed by their text, the convention llguidance and llama.cpp
share (0xFF is never part of UTF-8). Ids with no token are b"".
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from llm.model.tokenizer.errors import TokenizerError
from llm.model.tokenizer.gguf_vocab import byte_alphabet

SPECIAL_PREFIX = b"\xff"
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def hf_token_bytes(tok: Any, size: int) -> list[bytes]:
    """Token bytes of a ``tokenizers.Tokenizer`` of `size` ids (byte-level BPE, or
    SentencePiece-style "▁" pieces with <0xXX> byte fallback, as its decoder says)."""
    decoder = json.loads(tok.to_str()).get("decoder") or {}
    kinds = _decoder_kinds(decoder)
    if "ByteLevel" in kinds:
        alphabet = {c: b for b, c in byte_alphabet().items()}  # printable character -> byte

        def spell(piece: str) -> bytes:
            if all(c in alphabet for c in piece):
                return bytes(alphabet[c] for c in piece)
            return piece.encode("utf-8")  # a token stored as raw text (see gguf_vocab)
    elif kinds & {"Metaspace", "ByteFallback", "Replace"}:
        def spell(piece: str) -> bytes:
            byte = _BYTE_PIECE.fullmatch(piece)
            if byte is not None and "ByteFallback" in kinds:
                return bytes([int(byte.group(1), 16)])
            return piece.replace("\u2581", " ").encode("utf-8")
    else:
        raise TokenizerError(f"cannot map this tokenizer's tokens to bytes (decoder "
                             f"{sorted(kinds) or 'none'}; supported: ByteLevel, Metaspace, "
                             "ByteFallback)")
    added = tok.get_added_tokens_decoder()  # id -> AddedToken
    out = []
    for i in range(size):
        if i in added:
            token = added[i]
            text = token.content.encode("utf-8")
            out.append(SPECIAL_PREFIX + text if token.special else text)
            continue
        piece = tok.id_to_token(i)
        out.append(b"" if piece is None else spell(piece))
    return out


def spm_token_bytes(sp: Any, size: int, texts: Mapping[int, str],
                    special: set[int]) -> list[bytes]:
    """Token bytes of a SentencePiece processor `sp`; `texts` the tokens it never matches in
    text (control, unknown, added: id -> text), `special` those of them that are special."""
    pieces = sp.get_piece_size()
    out = []
    for i in range(size):
        if i in texts:
            text = texts[i].encode("utf-8")
            out.append(SPECIAL_PREFIX + text if i in special else text)
        elif i >= pieces:
            out.append(b"")
        elif sp.is_byte(i):
            out.append(bytes([int(_BYTE_PIECE.fullmatch(sp.id_to_piece(i)).group(1), 16)]))
        else:
            out.append(sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
    return out


def _decoder_kinds(decoder: dict[str, Any]) -> set[str]:
    """The decoder types in a tokenizer.json decoder (a Sequence is looked into)."""
    kinds = {decoder.get("type", "")}
    for inner in decoder.get("decoders") or []:
        kinds |= _decoder_kinds(inner)
    return kinds - {""}
