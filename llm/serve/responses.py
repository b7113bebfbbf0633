"""OpenAI response bodies: whole completions and SSE chunks, for /v1/completions and
/v1/chat/completions.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from llm.engine.contract.outputs import TokenLogprobs
from llm.engine.sequence import RequestOutput
from llm.serve.logprobs import LogprobsFormatter


@dataclass
class ResponseShape:
    """The identity of one response: kind (chat or not), id, model and creation time; and what
    it carries besides the completion: the echoed prompt's text (completions with echo, else
    None), the logprobs formatter (requests with logprobs, else None) and whether token ids come
    too (vLLM's return_token_ids: completions put "prompt_token_ids" and "token_ids" in each
    choice; chat puts "prompt_token_ids" in the response, or the chunk, and "token_ids" in each
    choice; streamed, the prompt's go in each choice's first chunk, the generated ones as
    deltas). logprobs_k: the alternatives a logprobs object shows (an echo's prompt entries may
    hold more, for prompt_logprobs). prompt (vLLM's prompt_logprobs, whole responses only): its
    formatter, prompt_k alternatives, in each choice (completions) or the response (chat).
    first_index: the index of its request's first choice in the response (a completions batch:
    the prompt's position times n; its shape's echo and formatters are that prompt's).
    """

    chat: bool
    model: str
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))
    echo: str | None = None
    logprobs: LogprobsFormatter | None = None
    token_ids: bool = False
    logprobs_k: int | None = None
    prompt: LogprobsFormatter | None = None
    prompt_k: int = 0
    first_index: int = 0

    def __post_init__(self) -> None:
        if not self.id:
            self.id = response_id(self.chat)

    def _head(self, chunk: bool) -> dict[str, Any]:
        if self.chat:
            kind = "chat.completion.chunk" if chunk else "chat.completion"
        else:
            kind = "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def full(self, out: RequestOutput) -> dict[str, Any]:
        """The non-streamed response of a finished request (one choice per returned sequence,
        n > 1)."""
        choices = [self._choice(o) for o in (out.choices or [out])]
        body = {**self._head(False), "choices": choices, "usage": usage(out)}
        if self.token_ids and self.chat:
            body["prompt_token_ids"] = list(out.prompt_token_ids)
        if self.prompt is not None and self.chat:
            body["prompt_logprobs"] = self._prompt_logprobs(out)
        return body

    def _prompt_logprobs(self, out: RequestOutput) -> list[dict[str, Any] | None]:
        assert self.prompt is not None
        return self.prompt.prompt(out.prompt_logprobs or [], self.prompt_k)

    def _choice(self, out: RequestOutput) -> dict[str, Any]:
        """One choice of a whole response."""
        if self.chat:
            choice = {"index": self.first_index + out.choice,
                      "message": {"role": "assistant", "content": out.text},
                      "finish_reason": out.finish_reason, "stop_reason": out.stop_reason,
                      "logprobs": self._logprobs(self.generated(out), out.choice)}
        else:
            text, logprobs = out.text, None
            if self.echo is not None:
                text = self.echo + text
            if self.logprobs is not None:
                entries: list[TokenLogprobs | None] = list(self.generated(out))
                tokens = [e.token for e in entries]  # those of the text (see RequestOutput)
                if self.echo is not None:
                    tokens = out.prompt_token_ids + tokens
                    entries = list(out.prompt_logprobs or []) + entries
                logprobs = self.logprobs.completion(tokens, entries, out.choice, self.logprobs_k)
            choice = {"index": self.first_index + out.choice, "text": text,
                      "finish_reason": out.finish_reason,
                      "stop_reason": out.stop_reason, "logprobs": logprobs}
            if self.prompt is not None:
                choice["prompt_logprobs"] = self._prompt_logprobs(out)
            if self.token_ids:
                choice["prompt_token_ids"] = list(out.prompt_token_ids)
        if self.token_ids:
            choice["token_ids"] = list(out.token_ids)
        return choice

    def generated(self, out: RequestOutput) -> list[TokenLogprobs]:
        """The logprobs entries of a choice's generated tokens: those of its text; with token ids
        wanted, of every token id (also those a stop string cut, as vLLM gives them)."""
        entries = list(out.logprobs or [])
        return entries + out.cut_logprobs if self.token_ids else entries

    def echo_chunk(self, out: RequestOutput, usage_field: bool = False, index: int = 0,
                   usage_now: dict[str, Any] | None = None) -> bytes:
        """The first SSE event of an echoing completion's choice `index`: the prompt (and its
        logprobs); usage_now as `chunk`'s."""
        assert self.echo is not None and not self.chat
        logprobs = None
        if self.logprobs is not None:
            logprobs = self.logprobs.completion(out.prompt_token_ids, out.prompt_logprobs or [],
                                                index, self.logprobs_k)
        choice = {"index": self.first_index + index, "text": self.echo, "finish_reason": None,
                  "logprobs": logprobs}
        if self.token_ids:
            choice.update(prompt_token_ids=list(out.prompt_token_ids), token_ids=[])
        return sse({**self._head(True), "choices": [choice],
                    **({"usage": usage_now} if usage_field else {})})

    def chunk(self, text: str, finish_reason: str | None = None, first: bool = False,
              usage_field: bool = False, logprobs: Sequence[TokenLogprobs] = (),
              index: int = 0, token_ids: Sequence[int] = (),
              prompt_ids: Sequence[int] | None = None,
              stop_reason: int | str | None = None,
              usage_now: dict[str, Any] | None = None) -> bytes:
        """One SSE event carrying a text delta of choice `index` (and the logprobs of its
        tokens); first: the choice's first chunk (chat: it carries the role). With token ids
        wanted: `token_ids`, the ids generated since the choice's previous chunk, and
        `prompt_ids`, the prompt's (given on the choice's first chunk). A chunk with a
        finish_reason carries the choice's vLLM `stop_reason`. Usage is never
        in it: with stream_options.include_usage it comes in the extra last chunk (`usage_chunk`)
        and every other chunk has "usage": null (`usage_field`), as OpenAI streams it, or with
        vLLM's continuous_usage_stats the usage so far (`usage_now`); without, no chunk has the
        field (a client summing usage over chunks counts it once)."""
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant"} if first else {}
            if text or not first:
                delta["content"] = text
            choice = {"index": self.first_index + index, "delta": delta,
                      "finish_reason": finish_reason,
                      "logprobs": self._logprobs(logprobs, index) if logprobs else None}
        else:
            choice = {"index": self.first_index + index, "text": text,
                      "finish_reason": finish_reason,
                      "logprobs": self._logprobs(logprobs, index) if logprobs else None}
        if finish_reason is not None:
            choice["stop_reason"] = stop_reason
        body = {**self._head(True), "choices": [choice]}
        if self.token_ids:
            if prompt_ids is not None:
                (body if self.chat else choice)["prompt_token_ids"] = list(prompt_ids)
            choice["token_ids"] = list(token_ids)
        if usage_field:
            body["usage"] = usage_now
        return sse(body)

    def _logprobs(self, entries: Sequence[TokenLogprobs], choice: int) -> dict[str, Any] | None:
        """The logprobs object of choice `choice`'s generated tokens' `entries` (None without
        logprobs)."""
        if self.logprobs is None:
            return None
        if self.chat:
            return self.logprobs.chat(entries)
        return self.logprobs.completion([e.token for e in entries], entries, choice)

    def usage_chunk(self, outs: Sequence[RequestOutput]) -> bytes:
        """The extra final chunk of stream_options.include_usage (empty choices): the usage of
        the response's requests (a completions batch: of every prompt)."""
        return sse({**self._head(True), "choices": [], "usage": usage(*outs)})


def merged(bodies: Sequence[dict[str, Any]], outs: Sequence[RequestOutput]) -> dict[str, Any]:
    """The whole response of a completions batch from its prompts' responses (`full`, each
    with its shape's first_index) and requests: their choices one after the other, the usage of
    them all."""
    if len(bodies) == 1:
        return bodies[0]
    return {**bodies[0], "choices": [c for b in bodies for c in b["choices"]],
            "usage": usage(*outs)}


def response_id(chat: bool, request_id: str | None = None) -> str:
    """The id of a response (and of each of its streamed chunks): "chatcmpl-" (chat) or "cmpl-"
    and the request's request_id (vLLM's field, as vLLM builds it), else a random hex uuid."""
    return f"{'chatcmpl' if chat else 'cmpl'}-{request_id or uuid.uuid4().hex}"


def usage_so_far(request: RequestOutput, choice: RequestOutput) -> dict[str, int]:
    """vLLM's continuous usage of a streamed chunk: the prompt's tokens and those choice `choice`
    has generated so far."""
    p, c = len(request.prompt_token_ids), len(choice.token_ids)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def usage(*outs: RequestOutput) -> dict[str, Any]:
    """OpenAI's usage object of one request or of a completions batch's (completion tokens: of
    every returned choice); prompt_tokens_details.cached_tokens: prompt tokens served by the
    prefix cache."""
    p = sum(len(out.prompt_token_ids) for out in outs)
    c = sum(len(o.token_ids) for out in outs for o in (out.choices or [out]))
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
            "prompt_tokens_details": {"cached_tokens": sum(out.cached_tokens for out in outs)}}


def sse(body: dict[str, Any] | str) -> bytes:
    """One Server-Sent Event `data:` line pair."""
    data = body if isinstance(body, str) else json.dumps(body, ensure_ascii=False)
    return f"data: {data}\n\n".encode()


SSE_DONE = sse("[DONE]")
