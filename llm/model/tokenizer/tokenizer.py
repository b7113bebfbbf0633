"""Tokenizers: text <-> token ids, chat templates and incremental detokenization for streaming.

One interface, :class:`Tokenizer`, over three sources (see :meth:`Tokenizer.from_path`):

- a Hugging Face directory with ``tokenizer.json`` (run by the ``tokenizers`` library), with
  ``tokenizer_config.json`` / ``special_tokens_map.json`` / ``generation_config.json`` beside it;
- a directory with a SentencePiece ``tokenizer.model`` (run by ``sentencepiece``);
- a ``.gguf`` file whose metadata holds the vocabulary (rebuilt by
  :mod:`llm.model.tokenizer.gguf_vocab`).

Encoding matches transformers' ``tokenizer(text)["input_ids"]`` for the same source; special
tokens written in the text (``<|im_start|>``) are matched whole.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from tokenizers import AddedToken
from tokenizers import Tokenizer as HFTokenizer

from llm.model.tokenizer import gguf_vocab, token_bytes
from llm.model.tokenizer.chat_template import (
    SPECIAL_NAMES,
    compile_template,
    reads_parts,
    render_chat,
)
from llm.model.tokenizer.detokenizer import IncrementalDecoder
from llm.model.tokenizer.errors import TokenizerError


class _Backend(Protocol):
    vocab_size: int

    def encode(self, text: str, add_special_tokens: bool) -> list[int]: ...

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str: ...

    def token_to_id(self, token: str) -> int | None: ...

    def token_bytes(self) -> list[bytes]: ...


class _HFBackend:
    """A ``tokenizers.Tokenizer`` (tokenizer.json, or a GGUF byte-level BPE vocabulary)."""

    def __init__(self, tok: HFTokenizer, vocab_size: int | None = None) -> None:
        tok.no_truncation()
        tok.no_padding()
        self._tok = tok
        self.vocab_size = vocab_size or max(tok.get_vocab(with_added_tokens=True).values()) + 1

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def token_bytes(self) -> list[bytes]:
        return token_bytes.hf_token_bytes(self._tok, self.vocab_size)


class _SpmBackend:
    """A SentencePiece model, plus the control tokens sentencepiece never matches in text.

    Text is cut at special tokens and each piece is encoded by sentencepiece (so each gets its
    dummy-prefix space, as llama.cpp and transformers' legacy Llama tokenizer do). Decoding is
    sentencepiece's own, with special tokens spliced in when they are kept.
    """

    def __init__(
        self,
        proto: bytes,
        source: Path,
        *,
        add_bos: bool,
        add_eos: bool,
        added: dict[int, tuple[str, bool]] | None = None,
        bos_token: str | None = None,
        eos_token: str | None = None,
    ) -> None:
        import sentencepiece

        try:
            self._sp = sp = sentencepiece.SentencePieceProcessor(model_proto=proto)
        except Exception as exc:  # sentencepiece raises RuntimeError/OSError on a bad model
            raise TokenizerError(f"{source}: not a valid SentencePiece model ({exc})") from exc
        self._size = size = sp.get_piece_size()
        specials = [i for i in range(size) if sp.is_control(i) or sp.is_unknown(i)]
        self._text = {i: sp.id_to_piece(i) for i in specials}
        self._skip = set(self._text)
        for token_id, (text, special) in (added or {}).items():
            if token_id >= size or sp.id_to_piece(token_id) == text:
                self._text[token_id] = text
                if special:
                    self._skip.add(token_id)
        self._by_text = {text: i for i, text in sorted(self._text.items(), reverse=True)}
        alternatives = sorted(self._by_text, key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, alternatives))) if alternatives else None
        self.vocab_size = max([size - 1, *self._text]) + 1
        self.bos_id = self.token_to_id(bos_token) if bos_token else _non_negative(sp.bos_id())
        self.eos_id = self.token_to_id(eos_token) if eos_token else _non_negative(sp.eos_id())
        self._add_bos = add_bos and self.bos_id is not None
        self._add_eos = add_eos and self.eos_id is not None

    def model_special_pieces(self) -> dict[str, str]:
        """The bos/eos/unk/pad pieces the SentencePiece model itself declares."""
        ids = {
            "bos_token": self._sp.bos_id(),
            "eos_token": self._sp.eos_id(),
            "unk_token": self._sp.unk_id(),
            "pad_token": self._sp.pad_id(),
        }
        return {name: self._sp.id_to_piece(i) for name, i in ids.items() if i >= 0}

    def token_bytes(self) -> list[bytes]:
        return token_bytes.spm_token_bytes(self._sp, self.vocab_size, self._text, self._skip)

    def token_to_id(self, token: str) -> int | None:
        if token in self._by_text:
            return self._by_text[token]
        token_id = self._sp.piece_to_id(token)
        if token_id == self._sp.unk_id() and self._sp.id_to_piece(token_id) != token:
            return None
        return token_id

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        ids: list[int] = [self.bos_id] if add_special_tokens and self._add_bos else []
        start = 0
        for match in self._pattern.finditer(text) if self._pattern else ():
            ids += self._sp.encode(text[start : match.start()])
            ids.append(self._by_text[match.group()])
            start = match.end()
        ids += self._sp.encode(text[start:])
        if add_special_tokens and self._add_eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        parts: list[str] = []
        run: list[int] = []
        started = False
        for token_id in [*ids, None]:
            if token_id is not None and token_id not in self._text:
                if token_id >= self._size:
                    raise TokenizerError(f"token id {token_id} is not in the vocabulary")
                run.append(token_id)
                continue
            if run:
                text = self._sp.decode(run)
                # sentencepiece drops the leading space of a sequence's first piece; put it back
                # when something was decoded before this run.
                parts.append(self._stripped_space(run[0]) + text if started else text)
                started, run = True, []
            if token_id is not None and not (skip_special_tokens and token_id in self._skip):
                parts.append(self._text[token_id])
                started = True
        return "".join(parts)

    def _stripped_space(self, token_id: int) -> str:
        piece = self._sp.id_to_piece(token_id)
        if self._sp.is_byte(token_id) or not piece.startswith("\u2581"):
            return ""
        alone = self._sp.decode([token_id])
        lead = len(piece) - len(piece.lstrip("\u2581"))
        return " " * (lead - (len(alone) - len(alone.lstrip(" "))))


def _non_negative(value: int) -> int | None:
    return value if value >= 0 else None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TokenizerError(f"{path}: cannot read JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object")
    return data


def _token_content(value: Any) -> str | None:
    """A special-token entry of tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _chat_template_of(path: Path, config: dict[str, Any]) -> str | None:
    jinja_file = path / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template") or _read_json(path / "chat_template.json").get(
        "chat_template"
    )
    if isinstance(template, list):  # named templates: take the default one
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


class Tokenizer:
    """Text to token ids and back for one model. Build it with :meth:`from_path`.

    Attributes: ``bos_id``/``pad_id`` (None when the model has none), ``eos_ids`` (every id
    that ends generation), ``vocab_size``, ``add_bos`` (whether :meth:`encode` prepends BOS by
    default), ``chat_template`` (Jinja source or None) and ``special_tokens`` (name -> text,
    e.g. ``{"bos_token": "<s>"}``, as chat templates see them).
    """

    def __init__(
        self,
        backend: _Backend,
        *,
        source: Path,
        bos_id: int | None,
        eos_ids: Sequence[int | None],
        pad_id: int | None,
        special_tokens: dict[str, str | None],
        chat_template: str | None,
    ) -> None:
        self._backend = backend
        self.source = source
        self.vocab_size: int = backend.vocab_size
        self.bos_id: int | None = bos_id
        self.eos_ids: tuple[int, ...] = tuple(dict.fromkeys(i for i in eos_ids if i is not None))
        self.pad_id: int | None = pad_id
        self.special_tokens = {k: v for k, v in special_tokens.items() if v is not None}
        self.chat_template: str | None = chat_template
        self._template: Any = None
        self._template_reads_parts = False
        self._token_bytes: tuple[bytes, ...] | None = None
        with_special, without = backend.encode("a", True), backend.encode("a", False)
        self.add_bos: bool = (
            bos_id is not None and with_special[:1] == [bos_id] and without[:1] != [bos_id]
        )

    @classmethod
    def from_path(cls, path: str | Path, *, reader: Any = None, cache_dir: str | Path | None = None,
                  digest: str | None = None, progress: bool = False) -> Tokenizer:
        """Load the tokenizer of a Hugging Face model directory or of a ``.gguf`` file.

        ``reader`` may be an already-open ``gguf.GGUFReader`` of that file, to avoid parsing it
        twice. With ``cache_dir``, a GGUF vocabulary is cached there (keyed by the file's sha256,
        ``digest`` if the caller knows it), so later loads skip the slow metadata parse. Raises
        TokenizerError naming the path when no tokenizer is found or it is corrupt. ``progress``:
        say on stderr when a GGUF's vocabulary is parsed (seconds; once per file with a cache).
        """
        path = Path(path)
        if path.is_dir():
            return cls._from_hf_dir(path)
        if path.is_file() and (reader is not None or _is_gguf(path)):
            return cls._from_gguf(path, reader, cache_dir, digest, progress)
        raise TokenizerError(
            f"{path}: no tokenizer found (expected a directory with tokenizer.json or "
            "tokenizer.model, or a .gguf file)"
        )

    @classmethod
    def _from_hf_dir(cls, path: Path) -> Tokenizer:
        config = _read_json(path / "tokenizer_config.json")
        special_map = _read_json(path / "special_tokens_map.json")
        generation = _read_json(path / "generation_config.json")
        names = {
            name: _token_content(config.get(name)) or _token_content(special_map.get(name))
            for name in SPECIAL_NAMES
        }
        json_file, spm_file = path / "tokenizer.json", path / "tokenizer.model"
        if json_file.is_file():
            backend: _Backend = _load_tokenizer_json(json_file, config, special_map, names)
        elif spm_file.is_file():
            added = {
                int(k): (v["content"], bool(v.get("special", False)))
                for k, v in (config.get("added_tokens_decoder") or {}).items()
                if isinstance(v, dict) and "content" in v
            }
            spm = _SpmBackend(
                spm_file.read_bytes(),
                spm_file,
                add_bos=bool(config.get("add_bos_token", True)),
                add_eos=bool(config.get("add_eos_token", False)),
                added=added,
                bos_token=names["bos_token"],
                eos_token=names["eos_token"],
            )
            for name, piece in spm.model_special_pieces().items():
                names[name] = names[name] or piece
            backend = spm
        else:
            raise TokenizerError(f"{path}: no tokenizer.json or tokenizer.model in this directory")

        def to_id(name: str) -> int | None:
            return backend.token_to_id(names[name]) if names[name] is not None else None

        extra_eos = generation.get("eos_token_id")
        extra_eos = extra_eos if isinstance(extra_eos, list) else [extra_eos]
        return cls(
            backend,
            source=path,
            bos_id=to_id("bos_token"),
            eos_ids=[to_id("eos_token"), *(i for i in extra_eos if isinstance(i, int))],
            pad_id=to_id("pad_token"),
            special_tokens=names,
            chat_template=_chat_template_of(path, config),
        )

    @classmethod
    def _from_gguf(cls, path: Path, reader: Any, cache_dir: str | Path | None,
                   digest: str | None, progress: bool = False) -> Tokenizer:
        if cache_dir is not None and reader is None:
            vocab = gguf_vocab.cached_gguf_vocab(path, Path(cache_dir), digest, progress)
        else:
            vocab = gguf_vocab.read_gguf_vocab(path, reader)
        if vocab.model == "gpt2":
            tok = gguf_vocab.build_bpe_tokenizer(vocab)
            backend: _Backend = _HFBackend(tok, len(vocab.tokens))
        elif vocab.model == "llama":
            backend = _SpmBackend(
                gguf_vocab.build_spm_model_proto(vocab),
                path,
                add_bos=gguf_vocab.default_add_bos(vocab),
                add_eos=bool(vocab.add_eos),
                bos_token=vocab.token_text(vocab.bos_id),
                eos_token=vocab.token_text(vocab.eos_id),
            )
        else:
            raise TokenizerError(
                f"{path}: unsupported tokenizer.ggml.model={vocab.model!r} (supported: gpt2, llama)"
            )
        names = {
            "bos_token": vocab.token_text(vocab.bos_id),
            "eos_token": vocab.token_text(vocab.eos_id),
            "unk_token": vocab.token_text(vocab.unk_id),
            "pad_token": vocab.token_text(vocab.pad_id),
        }
        return cls(
            backend,
            source=path,
            bos_id=vocab.bos_id,
            eos_ids=[vocab.eos_id, vocab.eot_id, vocab.eom_id],
            pad_id=vocab.pad_id,
            special_tokens=names,
            chat_template=vocab.chat_template,
        )

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; with ``add_special_tokens`` the model's BOS/EOS are added as
        transformers adds them. Special tokens written in the text are matched whole."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, not {type(text).__name__}")
        return self._backend.encode(text, add_special_tokens)

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        """The text of ``ids``; special tokens are dropped unless ``skip_special_tokens`` is
        False. Incomplete UTF-8 sequences decode to U+FFFD."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise TokenizerError(
                f"token ids {bad[:5]} are outside the vocabulary (0..{self.vocab_size - 1})"
            )
        return self._backend.decode(ids, skip_special_tokens)

    def apply_chat_template(
        self, messages: list[dict[str, str]], *, add_generation_prompt: bool | None = None,
        continue_final_message: bool = False, template_kwargs: Mapping[str, Any] | None = None,
    ) -> str:
        """Render ``messages`` with the model's chat template, as transformers renders it
        (chat_template.py): add_generation_prompt (default: unless continue_final_message)
        opens a new assistant turn; continue_final_message ends the text right after the last
        message's content, so that the model continues it; template_kwargs: more variables for
        the template (e.g. ``{"enable_thinking": False}``)."""
        if self.chat_template is None:
            raise TokenizerError(f"{self.source}: this model has no chat template")
        if self._template is None:
            self._template = compile_template(self.chat_template, self.source)
            self._template_reads_parts = reads_parts(self.chat_template)
        if add_generation_prompt is None:
            add_generation_prompt = not continue_final_message
        return render_chat(self._template, self.source, messages, self.special_tokens,
                           add_generation_prompt=add_generation_prompt,
                           continue_final_message=continue_final_message,
                           template_kwargs=template_kwargs, parts=self._template_reads_parts)

    def token_bytes(self) -> tuple[bytes, ...]:
        """The bytes of every token id (see llm.model.tokenizer.token_bytes: special tokens are
        0xFF + their text), computed once."""
        if self._token_bytes is None:
            self._token_bytes = tuple(self._backend.token_bytes())
        return self._token_bytes

    def stream(self, *, skip_special_tokens: bool = True) -> IncrementalDecoder:
        """A new incremental decoder for one generated sequence."""
        return IncrementalDecoder(self.decode, skip_special_tokens=skip_special_tokens)


def _is_gguf(path: Path) -> bool:
    if path.suffix.lower() == ".gguf":
        return True
    with path.open("rb") as handle:
        return handle.read(4) == b"GGUF"


def _load_tokenizer_json(
    file: Path, config: dict[str, Any], special_map: dict[str, Any], names: dict[str, str | None]
) -> _HFBackend:
    """tokenizer.json plus the named special tokens of tokenizer_config.json, as transformers
    loads it (its post-processor alone decides BOS/EOS: transformers ignores add_bos_token then)."""
    try:
        tok = HFTokenizer.from_file(str(file))
    except Exception as exc:  # tokenizers raises a bare Exception on malformed JSON
        raise TokenizerError(f"{file}: corrupt or unsupported tokenizer.json ({exc})") from exc
    extra = config.get("extra_special_tokens") or config.get("additional_special_tokens")
    extra = extra or special_map.get("additional_special_tokens") or []
    extra = list(extra.values()) if isinstance(extra, dict) else list(extra)
    present = {t.content for t in tok.get_added_tokens_decoder().values()}
    wanted = [*names.values(), *map(_token_content, extra)]
    missing = [t for t in dict.fromkeys(wanted) if t is not None and t not in present]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
    return _HFBackend(tok)
