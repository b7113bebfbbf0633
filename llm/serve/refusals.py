"""Request fields this server cannot honour: a 400 naming the field, never accepted and ignored.

A field is refused unless it holds the value that means "not used" (clients such as the openai
SDK, LangChain or LiteLLM send defaults: those pass). Fields that change nothing of the output
(user, metadata, store, service_tier, safety_identifier, prompt_cache_key / _retention,
parallel_tool_calls without tools; vLLM's session_id, a routing key, and include_reasoning,
which only splits out what a reasoning parser finds, and this server runs none) are ignored, as
OpenAI-compatible servers do, and so are vLLM's return_token_offsets / return_mm_kwargs, which
vLLM itself reads only on its render endpoints. Any other field, one the endpoint does not read
(a misspelt `max_token`, chat's `messages` sent to /v1/completions), is refused as OpenAI's API
refuses it ("unrecognized request argument"), with the nearest field's name where one is close.
"""

from __future__ import annotations

import difflib
from typing import Any

from llm.serve.errors import ApiError, short_repr

# vLLM's and OpenAI's fields that would change the output or the response, each with its
# "not used" values (numbers compare as numbers: priority 0 and 0.0 alike)
UNHONOURED: dict[str, tuple[Any, ...]] = {
    "use_beam_search": (False,), "length_penalty": (1,), "chat_template": (),
    "documents": ([],), "mm_processor_kwargs": ({},),
    "logits_processors": ([],), "guided_decoding_backend": (), "structural_tag": (),
    "prompt_embeds": (), "vllm_xargs": ({},), "priority": (0,), "prediction": (), "audio": (),
    "modalities": (["text"],), "reasoning_effort": (), "verbosity": (),
    "web_search_options": (), "suffix": ("",), "tools": ([],), "functions": ([],),
    # vLLM's: disaggregated serving, beam search (older releases), watermarks, reasoning budget,
    # logprobs of chosen ids, repetition stops, chunks of several tokens, truncation keeping the
    # first tokens (we keep the last: "left"), multimodal and MoE-routing options, prompt text
    "kv_transfer_params": ({},), "ec_transfer_params": ({},), "early_stopping": (False,),
    "watermarking": (False,), "thinking_token_budget": (-1,), "logprob_token_ids": (),
    "repetition_detection": (), "stream_interval": (1,), "truncation_side": ("left",),
    "media_io_kwargs": ({},), "routed_experts_prompt_start": (0,), "return_prompt_text": (False,),
}
# chat-only fields and their "not used" values on /v1/completions (no chat template there)
CHAT_ONLY = {"add_generation_prompt": (True,), "continue_final_message": (False,),
             "chat_template_kwargs": ({},), "top_logprobs": (0,), "tool_choice": ("none",)}


# the fields the parsers read (protocol.py, chat_options.py, structured_output.py), on both
# endpoints and on one of them
READ = frozenset((
    "model", "max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop",
    "stop_token_ids", "include_stop_str_in_output", "skip_special_tokens",
    "spaces_between_special_tokens", "stream", "stream_options", "n", "best_of", "echo",
    "logprobs", "prompt_logprobs", "min_tokens", "presence_penalty", "frequency_penalty",
    "repetition_penalty", "logit_bias", "allowed_token_ids", "bad_words", "ignore_eos",
    "return_token_ids", "return_tokens_as_token_ids", "truncate_prompt_tokens", "cache_salt",
    "request_id", "add_special_tokens", "response_format", "structured_outputs", "guided_json",
    "guided_regex", "guided_choice", "guided_grammar", "guided_whitespace_pattern"))
READ_CHAT = frozenset(("messages", "max_completion_tokens", "top_logprobs",
                       "add_generation_prompt", "continue_final_message", "chat_template_kwargs"))
READ_COMPLETIONS = frozenset(("prompt",))
# fields that change nothing of the output: accepted, not used (the module's docstring)
NEUTRAL = frozenset(("user", "metadata", "store", "service_tier", "safety_identifier",
                     "prompt_cache_key", "prompt_cache_retention", "parallel_tool_calls",
                     "session_id", "return_token_offsets", "return_mm_kwargs",
                     "include_reasoning"))


_SHARED = READ | NEUTRAL | frozenset(UNHONOURED) | {"tool_choice", "function_call"}
_KNOWN = {True: _SHARED | READ_CHAT, False: _SHARED | READ_COMPLETIONS | frozenset(CHAT_ONLY)}


def known_fields(chat: bool) -> frozenset[str]:
    """Every field the chat (chat) or completions endpoint reads, refuses by value or ignores."""
    return _KNOWN[chat]


def refuse_unsupported(body: dict[str, Any], chat: bool) -> None:
    """ApiError (400) naming the first field of `body` this server cannot honour on the chat
    (chat) or completions endpoint: one it does not know there, or one whose value it cannot
    honour."""
    known = known_fields(chat)
    for name in body:
        if name not in known:
            if name in READ_CHAT or name in READ_COMPLETIONS:
                hint = f" (a field of the {'completions' if chat else 'chat'} endpoint)"
            else:
                near = difflib.get_close_matches(name, sorted(known), n=1) if len(name) < 64 else []
                hint = f"; did you mean '{near[0]}'?" if near else ""
            raise ApiError(400, f"unrecognized request argument {short_repr(name)}{hint}",
                           name if len(name) <= 64 else name[:61] + "...")
    for name, unused in UNHONOURED.items():
        _refuse_unless(body, name, unused, f"'{name}' is not supported by this server")
    for name in ("tool_choice", "function_call"):
        _refuse_unless(body, name, ("none",), f"'{name}' is not supported by this server (no "
                                              "tools)")
    if chat:
        _refuse_unless(body, "best_of", (1,), "'best_of' > 1 is a /v1/completions parameter")
        _refuse_unless(body, "echo", (False,), "'echo' is a /v1/completions parameter")
        return
    for name, unused in CHAT_ONLY.items():
        _refuse_unless(body, name, unused, f"'{name}' is a chat parameter"
                       + ("; /v1/completions takes 'logprobs': <number of alternatives>"
                          if name == "top_logprobs" else ""))


def _refuse_unless(body: dict[str, Any], name: str, unused: tuple[Any, ...], what: str) -> None:
    value = body.get(name)
    if value is not None and not any(_same(value, u) for u in unused):
        raise ApiError(400, f"{what} (got {short_repr(value)})", name)


def _same(value: Any, unused: Any) -> bool:
    """value is the "not used" value: equal numbers (not bools), else equal values of one type."""
    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if number(value) and number(unused):
        return value == unused
    return type(value) is type(unused) and value == unused
