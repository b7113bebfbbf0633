"""How a request's prompt is rendered and encoded: vLLM's chat extensions and add_special_tokens.

add_generation_prompt (default: unless continue_final_message) opens a new assistant turn after
the messages; continue_final_message leaves the last message open for the model to continue;
chat_template_kwargs are extra variables of the chat template (e.g. {"enable_thinking": false})
and may not replace the ones the server sets; add_special_tokens adds the tokenizer's BOS/EOS
when encoding (default: true for a completions prompt, false for a rendered chat, whose template
writes them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llm.model.tokenizer.chat_template import TEMPLATE_VARIABLES
from llm.serve.errors import ApiError, opt_bool, short_repr


@dataclass(frozen=True)
class ChatOptions:
    """The rendering and encoding of one request's prompt (see the module)."""

    add_special_tokens: bool
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    template_kwargs: dict[str, Any] = field(default_factory=dict)


def chat_options(body: dict[str, Any], chat: bool) -> ChatOptions:
    """The request's ChatOptions; a 400 naming the field for a bad value (the chat-only fields
    on /v1/completions are refused before, by refusals.py, unless neutral)."""
    add_special = opt_bool(body, "add_special_tokens")
    default = ChatOptions(add_special_tokens=not chat if add_special is None else add_special)
    if not chat:
        return default
    opened = opt_bool(body, "add_generation_prompt")
    continued = opt_bool(body, "continue_final_message") or False
    if opened and continued:
        raise ApiError(400, "'continue_final_message' and 'add_generation_prompt' cannot both be "
                            "true: a continued message gets no new turn after it",
                       "continue_final_message")
    kwargs = body.get("chat_template_kwargs")
    if kwargs is None:
        kwargs = {}
    if not isinstance(kwargs, dict):
        raise ApiError(400, f"'chat_template_kwargs' must be an object, got {short_repr(kwargs)}",
                       "chat_template_kwargs")
    taken = sorted(set(kwargs) & TEMPLATE_VARIABLES)
    if taken:
        raise ApiError(400, f"'chat_template_kwargs' may not set {taken}: the server sets them",
                       "chat_template_kwargs")
    return ChatOptions(default.add_special_tokens,
                       (not continued) if opened is None else opened, continued, dict(kwargs))
