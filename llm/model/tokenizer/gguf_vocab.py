"""Tokenizers rebuilt from the vocabulary that a GGUF file keeps in its metadata.

A GGUF file has no ``tokenizer.json``: llama.cpp stores the vocabulary under ``tokenizer.ggml.*``
keys. Two kinds matter for Llama-family models:

- ``tokenizer.ggml.model == "gpt2"``: byte-level BPE (tokens spelled in the GPT-2 byte alphabet,
  merges, and ``tokenizer.ggml.pre`` naming llama.cpp's pre-tokenizer, see
  :mod:`llm.model.tokenizer.pretokenizers`). Rebuilt here as a ``tokenizers.Tokenizer``.
- ``tokenizer.ggml.model == "llama"``: a SentencePiece BPE vocabulary (pieces, scores, types).
  Rebuilt here as a serialized SentencePiece ``ModelProto`` that ``sentencepiece`` loads itself.

This module only reads and builds; ``llm.model.tokenizer.tokenizer`` wraps the result.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, decoders, models, processors
from tokenizers import Tokenizer as HFTokenizer

from llm.model.tokenizer.errors import TokenizerError
from llm.model.tokenizer.pretokenizers import PRE_TOKENIZERS, PreTokenizer

log = logging.getLogger(__name__)
VOCAB_CACHE_VERSION = 1

# llama.cpp token types (gguf.TokenType); SentencePiece's ModelProto uses the same numbers.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

@dataclass(frozen=True)
class GGUFVocab:
    """The tokenizer metadata of one GGUF file, decoded into plain Python values."""

    path: Path
    model: str
    pre: str | None
    tokens: list[str]
    token_types: list[int]
    scores: list[float] | None
    merges: list[str] | None
    bos_id: int | None
    eos_id: int | None
    eot_id: int | None
    eom_id: int | None
    unk_id: int | None
    pad_id: int | None
    add_bos: bool | None
    add_eos: bool | None
    add_space_prefix: bool | None
    remove_extra_whitespaces: bool | None
    chat_template: str | None

    def token_text(self, token_id: int | None) -> str | None:
        """The stored text of ``token_id``, or None."""
        return None if token_id is None else self.tokens[token_id]


def read_gguf_vocab(path: str | Path, reader: Any = None) -> GGUFVocab:
    """Read the tokenizer metadata of the GGUF file at ``path`` (or of an open ``GGUFReader``).

    Raises TokenizerError naming the path when the file is unreadable or holds no tokenizer.
    """
    path = Path(path)
    if reader is None:
        import gguf

        try:
            reader = gguf.GGUFReader(path)
        except Exception as exc:  # gguf raises ValueError, OSError, struct errors...
            raise TokenizerError(f"{path}: not a readable GGUF file ({exc})") from exc

    def get(key: str) -> Any:
        field = reader.fields.get(key)
        if field is None:
            return None
        try:
            return field.contents()
        except (UnicodeDecodeError, ValueError, IndexError) as exc:
            raise TokenizerError(f"{path}: cannot decode GGUF metadata {key!r} ({exc})") from exc

    model, tokens = get("tokenizer.ggml.model"), get("tokenizer.ggml.tokens")
    if model is None or not tokens:
        raise TokenizerError(f"{path}: the GGUF metadata holds no tokenizer (tokenizer.ggml.*)")
    types = get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    scores = get("tokenizer.ggml.scores")
    if len(types) != len(tokens) or (scores is not None and len(scores) != len(tokens)):
        raise TokenizerError(f"{path}: token_type/scores lengths do not match the token list")

    def token_id(key: str) -> int | None:
        value = get(f"tokenizer.ggml.{key}")
        if value is not None and not 0 <= int(value) < len(tokens):
            raise TokenizerError(f"{path}: tokenizer.ggml.{key}={value} is outside the vocabulary")
        return None if value is None else int(value)

    template = get("tokenizer.chat_template")
    return GGUFVocab(
        path=path,
        model=str(model),
        pre=get("tokenizer.ggml.pre"),
        tokens=tokens,
        token_types=[int(t) for t in types],
        scores=None if scores is None else [float(s) for s in scores],
        merges=get("tokenizer.ggml.merges"),
        bos_id=token_id("bos_token_id"),
        eos_id=token_id("eos_token_id"),
        eot_id=token_id("eot_token_id"),
        eom_id=token_id("eom_token_id"),
        unk_id=token_id("unknown_token_id"),
        pad_id=token_id("padding_token_id"),
        add_bos=get("tokenizer.ggml.add_bos_token"),
        add_eos=get("tokenizer.ggml.add_eos_token"),
        add_space_prefix=get("tokenizer.ggml.add_space_prefix"),
        remove_extra_whitespaces=get("tokenizer.ggml.remove_extra_whitespaces"),
        chat_template=template if isinstance(template, str) else None,
    )


def cached_gguf_vocab(path: Path, cache_dir: Path, digest: str | None = None,
                      progress: bool = False, reader: Any = None) -> GGUFVocab:
    """`read_gguf_vocab`, memoised as JSON in `cache_dir` under the file's content sha256.

    Parsing a GGUF's metadata costs seconds (every token string is a field); the cache entry costs
    milliseconds. `digest` is the file's sha256 when the caller already has it (the weights loader
    computes it). The entry carries a sha256 of its vocabulary's JSON: a flipped bit that leaves
    valid JSON (a token's text, a score) is caught. A missing, stale, unreadable or damaged entry
    is rebuilt, written atomically; with
    `progress` the parse says so on stderr (it takes ~5 s for a 49k-token vocabulary). `reader`:
    the file already opened (the weights' conversion writes the entry this way: one parse).
    """
    from llm.model.files import atomic_write, file_sha256

    digest = digest or file_sha256(path, progress=False)
    entry = cache_dir / f"gguf-{digest}.tokenizer.v{VOCAB_CACHE_VERSION}.json"
    if entry.is_file():
        try:
            data = json.loads(entry.read_text(encoding="utf-8"))
            if data["source_sha256"] != digest:
                raise ValueError(f"entry is for {data['source_sha256']}")
            if data["vocab_sha256"] != _vocab_sha256(data["vocab"]):
                raise ValueError("the vocabulary fails its sha256 check (the entry was damaged)")
            return GGUFVocab(path=path, **data["vocab"])
        except (OSError, ValueError, TypeError, KeyError) as e:
            log.warning("unusable tokenizer cache entry %s, rebuilding it: %s", entry, e)
    start = time.perf_counter()
    say = progress and reader is None
    if say:
        print(f"reading the tokenizer of {path.name} (once) ...", end="", file=sys.stderr,
              flush=True)
    vocab = read_gguf_vocab(path, reader)
    if say:
        print(f" {time.perf_counter() - start:.1f} s", file=sys.stderr)
    fields = {k: v for k, v in dataclasses.asdict(vocab).items() if k != "path"}
    text = json.dumps({"source_sha256": digest, "vocab_sha256": _vocab_sha256(fields),
                       "vocab": fields}, ensure_ascii=False)
    try:
        atomic_write(entry, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    except OSError as e:  # a read-only or full disk costs a re-parse next time, nothing else
        log.warning("could not write the tokenizer cache %s: %s", entry, e)
    return vocab


def _vocab_sha256(fields: dict[str, Any]) -> str:
    """sha256 of a vocabulary's fields as the cache entry writes them (JSON round-trips them
    exactly: floats by repr, key order kept)."""
    return hashlib.sha256(json.dumps(fields, ensure_ascii=False).encode("utf-8")).hexdigest()


def byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    extra = iter(range(256, 512))
    return {b: chr(b if b in printable else next(extra)) for b in range(256)}


def default_add_bos(vocab: GGUFVocab) -> bool:
    """Whether llama.cpp prepends BOS when the file does not say (its per-vocabulary default)."""
    if vocab.add_bos is not None:
        return bool(vocab.add_bos)
    if vocab.model == "llama":
        return True
    family = PRE_TOKENIZERS.get(vocab.pre or "default")
    return family is not None and family.add_bos


def pre_tokenizer_of(vocab: GGUFVocab) -> PreTokenizer:
    """The pre-tokenizer named by ``tokenizer.ggml.pre`` ("default" when the key is absent).

    Raises TokenizerError naming the value and the file when llama.cpp's table has no such
    value for a model this engine runs.
    """
    if vocab.pre is None:
        log.warning("%s: no tokenizer.ggml.pre; using llama.cpp's 'default' pre-tokenizer "
                    "(llama.cpp warns that generation quality degrades)", vocab.path)
    name = vocab.pre or "default"
    if name not in PRE_TOKENIZERS:
        raise TokenizerError(
            f"{vocab.path}: unsupported pre-tokenizer tokenizer.ggml.pre={name!r} "
            f"(supported: {', '.join(sorted(PRE_TOKENIZERS))})"
        )
    return PRE_TOKENIZERS[name]


def bpe_token_table(vocab: GGUFVocab) -> dict[str, int]:
    """Byte-level spelling -> token id for a ``gpt2`` vocabulary.

    Some converters store a few normal tokens as raw text instead of in GPT-2's byte alphabet.
    llama.cpp matches words only in the byte-level spelling, so a raw-text token is never
    produced where a token stored in that spelling exists: that token keeps the spelling,
    whichever id comes first. A raw-text token is respelled and takes its spelling only where
    none is stored so; between tokens with the same stored or respelled text the last id wins.
    """
    alphabet = byte_alphabet()
    spelled = set(alphabet.values())
    stored: dict[str, int] = {}
    respelled: dict[str, int] = {}
    for index, (token, kind) in enumerate(zip(vocab.tokens, vocab.token_types)):
        if kind == NORMAL and not set(token) <= spelled:
            respelled["".join(alphabet[b] for b in token.encode("utf-8"))] = index
        else:
            stored[token] = index
    return {**respelled, **stored}


def build_bpe_tokenizer(vocab: GGUFVocab) -> HFTokenizer:
    """Build a byte-level BPE ``tokenizers.Tokenizer`` from a ``gpt2`` GGUF vocabulary.

    The pre-tokenizer is llama.cpp's for ``tokenizer.ggml.pre`` (see
    :mod:`llm.model.tokenizer.pretokenizers`). Control tokens (type 3) become special added
    tokens and user-defined ones (type 4) plain added tokens, so both are matched whole in text.
    BOS/EOS are added per the file's flags, or llama.cpp's default for the pre-tokenizer.
    """
    pre = pre_tokenizer_of(vocab)
    merges = []
    for merge in vocab.merges or []:
        pair = merge.split(" ")
        if len(pair) != 2:
            raise TokenizerError(f"{vocab.path}: malformed BPE merge {merge!r}")
        merges.append((pair[0], pair[1]))
    try:
        model = models.BPE(bpe_token_table(vocab), merges, ignore_merges=pre.ignore_merges)
    except Exception as exc:
        raise TokenizerError(f"{vocab.path}: cannot build the BPE model ({exc})") from exc
    tok = HFTokenizer(model)
    tok.pre_tokenizer = pre.build()
    tok.decoder = decoders.ByteLevel()
    added = [
        AddedToken(text, special=kind == CONTROL, normalized=False)
        for text, kind in zip(vocab.tokens, vocab.token_types)
        if kind in (CONTROL, USER_DEFINED)
    ]
    tok.add_special_tokens([t for t in added if t.special])
    tok.add_tokens([t for t in added if not t.special])
    tok.post_processor = _bos_eos_processor(
        vocab.token_text(vocab.bos_id) if default_add_bos(vocab) else None,
        vocab.bos_id,
        vocab.token_text(vocab.eos_id) if vocab.add_eos else None,
        vocab.eos_id,
    )
    return tok


def _bos_eos_processor(
    bos: str | None, bos_id: int | None, eos: str | None, eos_id: int | None
) -> processors.TemplateProcessing:
    """A post-processor adding ``bos`` before and ``eos`` after a sequence (None: not added)."""
    first = f"{bos}:0 " if bos is not None else ""
    last = f" {eos}:0" if eos is not None else ""
    second_first = f" {bos}:1" if bos is not None else ""
    second_last = f" {eos}:1" if eos is not None else ""
    special = [(bos, bos_id)] if bos is not None else []
    if eos is not None and eos != bos:
        special.append((eos, eos_id))
    return processors.TemplateProcessing(
        single=f"{first}$A:0{last}",
        pair=f"{first}$A:0{last}{second_first} $B:1{second_last}",
        special_tokens=special,
    )


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int32 values are written as 64-bit two's complement
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _int_field(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(int(value))


def _bytes_field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def build_spm_model_proto(vocab: GGUFVocab) -> bytes:
    """Serialize a SentencePiece BPE ``ModelProto`` for a ``llama`` GGUF vocabulary.

    Written directly in protobuf wire format (field numbers of sentencepiece_model.proto), so no
    protobuf runtime is needed; sentencepiece parses and validates it when loading.
    """
    if vocab.scores is None:
        raise TokenizerError(f"{vocab.path}: a 'llama' vocabulary needs tokenizer.ggml.scores")
    # SentencePiece wants exactly one UNKNOWN piece: the file's unknown_token_id (llama.cpp's
    # default is 0), whatever its stored type. Other UNKNOWN-typed tokens (Phi-3's padding)
    # become control pieces: like llama.cpp, matched whole in text and never merged into.
    unk_id = 0 if vocab.unk_id is None else vocab.unk_id
    pieces = bytearray()
    for index, (token, score, kind) in enumerate(
        zip(vocab.tokens, vocab.scores, vocab.token_types)
    ):
        if index == unk_id:
            kind = UNKNOWN
        elif kind == UNKNOWN:
            kind = CONTROL
        elif kind not in (NORMAL, CONTROL, USER_DEFINED, UNUSED, BYTE):
            kind = NORMAL
        piece = (
            _bytes_field(1, token.encode("utf-8"))
            + _varint(2 << 3 | 5)
            + struct.pack("<f", score)
            + _int_field(3, kind)
        )
        pieces += _bytes_field(1, piece)
    trainer = (
        _int_field(3, 2)  # model_type = BPE
        + _int_field(4, len(vocab.tokens))
        + _int_field(35, BYTE in vocab.token_types)
        + _int_field(40, unk_id)
        + _int_field(41, -1 if vocab.bos_id is None else vocab.bos_id)
        + _int_field(42, -1 if vocab.eos_id is None else vocab.eos_id)
        + _int_field(43, -1 if vocab.pad_id is None else vocab.pad_id)
    )
    add_prefix = True if vocab.add_space_prefix is None else bool(vocab.add_space_prefix)
    normalizer = (
        _bytes_field(1, b"identity")
        + _int_field(3, add_prefix)
        + _int_field(4, bool(vocab.remove_extra_whitespaces))
        + _int_field(5, True)
    )
    return bytes(pieces) + _bytes_field(2, trainer) + _bytes_field(3, normalizer)
