"""OpenAI response bodies: whole completions and SSE chunks, for /v1/completions and
/v1/chat/completions.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from llm.engine.sequence import RequestOutput


@dataclass
class ResponseShape:
    """The identity of one response: kind (chat or not), id, model and creation time."""

    chat: bool
    model: str
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        if not self.id:
            self.id = f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}"

    def _head(self, chunk: bool) -> dict[str, Any]:
        if self.chat:
            kind = "chat.completion.chunk" if chunk else "chat.completion"
        else:
            kind = "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def full(self, out: RequestOutput) -> dict[str, Any]:
        """The non-streamed response of a finished request."""
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": out.text},
                      "finish_reason": out.finish_reason, "logprobs": None}
        else:
            choice = {"index": 0, "text": out.text, "finish_reason": out.finish_reason,
                      "logprobs": None}
        return {**self._head(False), "choices": [choice], "usage": usage(out)}

    def chunk(self, text: str, finish_reason: str | None = None, first: bool = False,
              usage_field: bool = False) -> bytes:
        """One SSE event carrying a text delta. Usage is never in it: with
        stream_options.include_usage it comes in the extra last chunk (`usage_chunk`) and every
        other chunk has "usage": null (`usage_field`), as OpenAI streams it; without, no chunk has
        the field (a client summing usage over chunks counts it once)."""
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant"} if first else {}
            if text or not first:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason,
                      "logprobs": None}
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
        body = {**self._head(True), "choices": [choice]}
        if usage_field:
            body["usage"] = None
        return sse(body)

    def usage_chunk(self, out: RequestOutput) -> bytes:
        """The extra final chunk of stream_options.include_usage (empty choices)."""
        return sse({**self._head(True), "choices": [], "usage": usage(out)})


def usage(out: RequestOutput) -> dict[str, int]:
    p, c = len(out.prompt_token_ids), len(out.token_ids)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def sse(body: dict[str, Any] | str) -> bytes:
    """One Server-Sent Event `data:` line pair."""
    data = body if isinstance(body, str) else json.dumps(body, ensure_ascii=False)
    return f"data: {data}\n\n".encode()


SSE_DONE = sse("[DONE]")
