"""OpenAI's logprobs objects from the engine's TokenLogprobs.

/v1/completions: {"tokens", "token_logprobs", "top_logprobs", "text_offset"}, one entry per token
(an echoed prompt's first token has null logprob and alternatives); each top_logprobs entry maps
token text to logprob for the best alternatives and always holds the chosen token too (so up to
logprobs + 1 entries, as OpenAI documents). /v1/chat/completions: {"content": [{"token",
"logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}, ...]}]}.

A token's text is that token decoded alone (special tokens included): a token holding only part
of a UTF-8 character decodes to U+FFFD, but its "bytes" are the token's own (the tokenizer's
`token_bytes`; a special token's: its text's), as OpenAI documents them: joined over the tokens
of a character they give that character back (a SentencePiece token's keep its leading space,
which the text drops at its start). text_offset is where each token starts in the choice's text,
in characters: the text the engine's incremental decoder has emitted before it (so a token that
starts inside a character gets that character's offset, and skipped special tokens add
nothing), counted from the start of the choice's text across the chunks of a stream (each choice
of an n > 1 response from 0).
Masked alternatives (-inf: where fewer tokens can be chosen than alternatives were asked for, as
under allowed_token_ids, bad words, a grammar or min_tokens) are left out of top_logprobs; a -inf
that remains (a chosen token's) is written as -9999.0, as vLLM does, since JSON has no -inf.
With as_ids (vLLM's return_tokens_as_token_ids) each token is named "token_id:<id>" instead of
its text, in "tokens", the top_logprobs keys and chat's "token" (chat's "bytes" are the label's
for the alternatives, the text's for the chosen token, as vLLM has them); text_offset still
counts the characters of the tokens' texts, so that it indexes the choice's text.

vLLM's prompt_logprobs (`prompt`): one entry per prompt token, null for the first, else an object
keyed by token id (as a string): the prompt token's own {"logprob", "rank", "decoded_token"}
first, then the best alternatives' (rank 1, 2, ...; a prompt token among them takes its place
there, as vLLM's does); decoded_token is the token decoded alone (with as_ids too: the key
names the id, as vLLM leaves it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from llm.engine.contract.outputs import TokenLogprobs
from llm.model.tokenizer.detokenizer import IncrementalDecoder
from llm.model.tokenizer.tokenizer import Tokenizer

MASKED_LOGPROB = -9999.0


class LogprobsFormatter:
    """The logprobs objects of one response (it keeps each choice's text offset between
    chunks)."""

    def __init__(self, tokenizer: Tokenizer, as_ids: bool = False,
                 skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.as_ids = as_ids
        self.skip_special_tokens = skip_special_tokens  # as the choices' texts are decoded
        self._decoders: dict[int, IncrementalDecoder] = {}  # choice -> its text so far
        self._texts: dict[int, str] = {}
        self._raw: tuple[bytes, ...] | None = None

    def raw(self, token: int) -> bytes:
        """The token's own bytes (a special token's, or an id the tokenizer has no bytes for:
        its text's)."""
        if self._raw is None:
            self._raw = tuple(self.tokenizer.token_bytes())
        raw = self._raw[token] if token < len(self._raw) else b""
        if not raw or (len(raw) > 1 and raw[0] == 0xFF):  # special (0xFF + text) or none
            return self.text(token).encode("utf-8", "surrogatepass")
        return raw

    def text(self, token: int) -> str:
        """The token decoded alone."""
        text = self._texts.get(token)
        if text is None:
            text = self._texts[token] = self.tokenizer.decode([token], skip_special_tokens=False)
        return text

    def label(self, token: int) -> str:
        """How the response names a token: its text, or "token_id:<id>" with as_ids."""
        return f"token_id:{token}" if self.as_ids else self.text(token)

    def completion(self, tokens: Sequence[int], entries: Sequence[TokenLogprobs | None],
                   choice: int = 0, k: int | None = None) -> dict[str, Any]:
        """/v1/completions' object for `tokens` of choice `choice` and their logprobs (None: the
        prompt's first); k: at most that many alternatives of each entry (None: all)."""
        out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                                     "text_offset": []}
        decoder = self._decoders.get(choice)
        if decoder is None:
            decoder = self._decoders[choice] = self.tokenizer.stream(
                skip_special_tokens=self.skip_special_tokens)
        for token, entry in zip(tokens, entries, strict=True):
            out["tokens"].append(self.label(token))
            out["text_offset"].append(len(decoder.text))  # the choice's text before the token
            decoder.add(token)
            if entry is None:
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            top = {self.label(t): _finite(v) for t, v in entry.top[:k] if v != -math.inf}
            top.setdefault(self.label(token), _finite(entry.logprob))
            out["token_logprobs"].append(_finite(entry.logprob))
            out["top_logprobs"].append(top)
        return out

    def prompt(self, entries: Sequence[TokenLogprobs | None],
               k: int) -> list[dict[str, dict[str, Any]] | None]:
        """vLLM's prompt_logprobs from a request's prompt entries (None for the first token),
        k alternatives each."""
        out: list[dict[str, dict[str, Any]] | None] = []
        for entry in entries:
            if entry is None:
                out.append(None)
                continue
            best = {str(entry.token): self._ranked(entry.token, entry.logprob, entry.rank)}
            for rank, (t, v) in enumerate(entry.top[:k], 1):
                best[str(t)] = self._ranked(t, v, rank)
            out.append(best)
        return out

    def _ranked(self, token: int, logprob: float, rank: int | None) -> dict[str, Any]:
        return {"logprob": _finite(logprob), "rank": rank, "decoded_token": self.text(token)}

    def chat(self, entries: Sequence[TokenLogprobs]) -> dict[str, Any]:
        """/v1/chat/completions' object for generated tokens' logprobs."""
        content = [{**self._chat_entry(e.token, e.logprob, chosen=True),
                    "top_logprobs": [self._chat_entry(t, v) for t, v in e.top
                                     if v != -math.inf]}
                   for e in entries]
        return {"content": content, "refusal": None}

    def _chat_entry(self, token: int, logprob: float, chosen: bool = False) -> dict[str, Any]:
        """One entry; its "bytes" are the token's own, but an alternative's with as_ids are its
        label's (as vLLM's: the chosen tokens' bytes stay those of the output)."""
        label = self.label(token)
        raw = self.raw(token) if chosen or not self.as_ids else label.encode()
        return {"token": label, "logprob": _finite(logprob), "bytes": list(raw)}


def _finite(value: float) -> float:
    return value if math.isfinite(value) else MASKED_LOGPROB
