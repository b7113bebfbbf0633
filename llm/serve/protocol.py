"""OpenAI request bodies -> validated requests, with a 4xx `ApiError` naming what is wrong.

Accepted fields (any other is refused, as OpenAI's API refuses it, unless it changes nothing of
the output, like user or metadata: refusals.py): model, prompt (completions: a
string, token ids, or a list of either: a batch, whose choices come prompt after prompt, n each,
indexed in that order as OpenAI and vLLM index them) or messages (chat), max_tokens
(max_completion_tokens for chat), temperature, top_p, top_k and min_p (extensions; top_k -1 or 0 =
off), seed, stop, stop_token_ids, include_stop_str_in_output and skip_special_tokens (extensions),
stream, stream_options.include_usage (with it, vLLM's continuous_usage_stats), n, best_of
(completions; not streamed when > n), add_generation_prompt, continue_final_message and
chat_template_kwargs (chat, vLLM's extensions),
add_special_tokens (chat_options.py), ignore_eos (extension), presence_penalty, frequency_penalty,
repetition_penalty (extension), logit_bias, allowed_token_ids, bad_words and min_tokens
(extensions); logprobs (completions: 0..20 alternatives; chat: true, with top_logprobs 0..20) and
echo (completions; with logprobs, the prompt's logprobs too); prompt_logprobs (vLLM's extension,
both endpoints, not streamed: 0..20 alternatives for every prompt token, in vLLM's shape);
return_token_ids, return_tokens_as_token_ids, truncate_prompt_tokens and cache_salt (vLLM's
extensions; cache_salt: llm.engine.prefix_cache); request_id (vLLM's: the response's id, and every
streamed chunk's, is "cmpl-<request_id>" / "chatcmpl-<request_id>" instead of a generated one);
structured output (structured_output.py): response_format (text, json_object, json_schema) and
vLLM's guided_json / guided_regex / guided_choice / guided_grammar or structured_outputs, one at a
time; n choices (best_of on /v1/completions). Fields this server cannot honour (suffix, tools /
functions / tool_choice / function_call, chat's echo, stream_options without stream, and the
vLLM / OpenAI fields of refusals.py, such as use_beam_search or chat_template, unless they hold
the value meaning "not used") are refused rather than silently ignored; a parameter the backend
cannot serve is refused at submission, naming it.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from typing import Any

from llm.engine.contract.sampling_params import (
    MAX_LOGPROBS,
    SamplingParams,
    SamplingParamsError,
    finite_number,
)
from llm.model.tokenizer.chat_template import message_text
from llm.serve.chat_options import ChatOptions, chat_options
from llm.serve.errors import ApiError, opt_bool, short_repr
from llm.serve.refusals import refuse_unsupported
from llm.serve.structured_output import structured_output

INT64_MAX = 2**63 - 1
MAX_STOP_STRINGS = 16
MAX_STOP_TOKEN_IDS = 256
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
MAX_REQUEST_ID = 256  # characters of a request_id
# characters a request_id may not hold: controls, lone surrogates, line and paragraph separators
_UNPRINTABLE = frozenset(("Cc", "Cs", "Zl", "Zp"))


@dataclass(frozen=True)
class ParsedRequest:
    """A validated request. prompts: text to encode or token ids, each a request of its own (a
    completions batch: its choices follow one another, n for each prompt); max_tokens None =
    default.

    chat: prompt is the rendered chat template; options: how it is rendered and encoded
    (chat_options.py).
    echo (completions): the response text begins with the prompt (and, with logprobs, so do the
    logprobs, from params.prompt_logprobs).
    token_ids (vLLM's return_token_ids): the response carries the prompt's and each choice's
    generated token ids. tokens_as_ids (vLLM's return_tokens_as_token_ids): logprobs name each
    token "token_id:<id>" instead of its text. truncate (vLLM's truncate_prompt_tokens): keep
    only the prompt's last `truncate` tokens (-1: as many as the context holds), None: all.
    prompt_logprobs (vLLM's): the alternatives wanted for every prompt token in the response's
    prompt_logprobs, None: no such field (params.prompt_logprobs is the larger of it and an
    echo's logprobs: what the engine computes).
    request_id (vLLM's): what the response's id is built from (None: a generated one).
    """

    prompts: tuple[str | list[int], ...]  # completions: one, or a batch; chat: ("",)
    chat: bool
    max_tokens: int | None
    params: SamplingParams  # max_new_tokens is set once the prompt length is known
    stream: bool
    include_usage: bool
    echo: bool = False
    options: ChatOptions = ChatOptions(add_special_tokens=True)
    token_ids: bool = False
    tokens_as_ids: bool = False
    truncate: int | None = None
    continuous_usage: bool = False
    prompt_logprobs: int | None = None
    request_id: str | None = None


def parse_request(body: Any, *, chat: bool, model_name: str) -> tuple[ParsedRequest, Any]:
    """Validate a request body; returns the request and the raw messages (chat) or None."""
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {_kind(body)}")
    model = body.get("model")
    if not isinstance(model, str):
        raise ApiError(400, "'model' is required and must be a string", "model")
    if model != model_name:
        raise ApiError(404, f"the model {short_repr(model)} does not exist; this server serves "
                            f"'{model_name}'", "model", code="model_not_found")
    refuse_unsupported(body, chat)
    request_id = _request_id(body.get("request_id"))
    messages = None
    rendering = chat_options(body, chat)
    if chat:
        messages = _messages(body.get("messages"))
        prompts: tuple[str | list[int], ...] = ("",)
        max_tokens = _opt_int(body, "max_completion_tokens", 1)
        if max_tokens is None:
            max_tokens = _opt_int(body, "max_tokens", 1)
    else:
        prompts = _prompts(body.get("prompt"))
        max_tokens = _opt_int(body, "max_tokens", 1)
    top_k = _opt_int(body, "top_k", -1)
    seed = _opt_int(body, "seed", -2**63)  # any int64, as OpenAI's API
    stream = opt_bool(body, "stream") or False
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise ApiError(400, "'stream_options' must be an object", "stream_options")
    if options is not None and not stream:
        raise ApiError(400, "'stream_options' is only allowed when 'stream' is true",
                       "stream_options")
    include_usage = opt_bool(options or {}, "include_usage", "stream_options.include_usage")
    continuous = opt_bool(options or {}, "continuous_usage_stats",
                          "stream_options.continuous_usage_stats") or False
    if continuous and not include_usage:
        raise ApiError(400, "'stream_options.continuous_usage_stats' needs "
                            "'stream_options.include_usage': true", "stream_options")
    logprobs = _chat_logprobs(body) if chat else _opt_int(body, "logprobs", 0, MAX_LOGPROBS)
    echo = opt_bool(body, "echo") or False
    prompt_logprobs = _opt_int(body, "prompt_logprobs", 0, MAX_LOGPROBS)
    if prompt_logprobs is not None and stream:
        raise ApiError(400, "'prompt_logprobs' is not available when 'stream' is true (send the "
                            "request unstreamed; or, on /v1/completions, 'echo' with 'logprobs' "
                            "streams the prompt's logprobs first)", "prompt_logprobs")
    wanted = [k for k in (prompt_logprobs, logprobs if echo else None) if k is not None]
    min_tokens = _opt_int(body, "min_tokens", 0) or 0
    n = _opt_int(body, "n", 1) or 1
    best_of = _opt_int(body, "best_of", 1)
    # vLLM's spaces_between_special_tokens only needs to be a bool: special tokens' texts are
    # joined without spaces whatever its value, as Hugging Face's fast tokenizers (and vLLM
    # with one) join them: what false asks for, and what true gives there
    opt_bool(body, "spaces_between_special_tokens")
    if best_of is not None and best_of > n and stream:
        raise ApiError(400, f"best_of={best_of} > n={n} cannot be streamed (the best are known "
                            "only at the end)", "best_of")
    try:
        params = SamplingParams(
            temperature=_opt_number(body, "temperature", 1.0),
            top_p=_opt_number(body, "top_p", 1.0),
            min_p=_opt_number(body, "min_p", 0.0),
            top_k=0 if top_k in (None, -1) else top_k,
            seed=seed,
            stop=_stop(body.get("stop")),
            stop_token_ids=_stop_token_ids(body.get("stop_token_ids")),
            ignore_eos=opt_bool(body, "ignore_eos") or False,
            include_stop_str_in_output=opt_bool(body, "include_stop_str_in_output") or False,
            skip_special_tokens=opt_bool(body, "skip_special_tokens") is not False,
            max_new_tokens=max(max_tokens or 1, min_tokens, 1),  # the real limit comes later
            logprobs=logprobs,
            prompt_logprobs=max(wanted) if wanted else None,
            presence_penalty=_opt_number(body, "presence_penalty", 0.0),
            frequency_penalty=_opt_number(body, "frequency_penalty", 0.0),
            repetition_penalty=_opt_number(body, "repetition_penalty", 1.0),
            logit_bias=_logit_bias(body.get("logit_bias")),
            allowed_token_ids=_allowed_token_ids(body.get("allowed_token_ids")),
            bad_words=_bad_words(body.get("bad_words")),
            min_tokens=min_tokens,
            structured=structured_output(body),
            n=n,
            best_of=best_of,
            cache_salt=body.get("cache_salt"),  # (checked there: a non-empty string, bounded)
        )
    except SamplingParamsError as e:
        raise ApiError(400, str(e), api_param(e.param)) from e
    return ParsedRequest(prompts, chat, max_tokens, params, stream, bool(include_usage),
                         echo, rendering, opt_bool(body, "return_token_ids") or False,
                         opt_bool(body, "return_tokens_as_token_ids") or False,
                         _truncation(body), continuous, prompt_logprobs, request_id), messages


def _request_id(value: Any) -> str | None:
    """request_id (vLLM's): a non-empty string of at most MAX_REQUEST_ID printable characters
    (valid Unicode: no lone surrogate, which JSON can smuggle in), or None (absent or null)."""
    if value is None:
        return None
    if (not isinstance(value, str) or not 0 < len(value) <= MAX_REQUEST_ID
            or any(unicodedata.category(c) in _UNPRINTABLE for c in value)):
        raise ApiError(400, f"'request_id' must be a non-empty string of at most "
                            f"{MAX_REQUEST_ID} printable characters (valid Unicode, no control "
                            f"characters or line breaks), got {short_repr(value)}", "request_id")
    return value


def _stop_token_ids(value: Any) -> tuple[int, ...]:
    """stop_token_ids (vLLM's extension): token ids that end generation besides EOS (checked
    against the vocabulary at submission)."""
    if value is None:
        return ()
    if (not isinstance(value, list) or len(value) > MAX_STOP_TOKEN_IDS
            or not all(_is_int(t) and 0 <= t <= INT64_MAX for t in value)):
        raise ApiError(400, f"'stop_token_ids' must be a list of at most {MAX_STOP_TOKEN_IDS} "
                            f"token ids (integers >= 0), got {short_repr(value)}",
                       "stop_token_ids")
    return tuple(value)


def _chat_logprobs(body: dict[str, Any]) -> int | None:
    """Chat's logprobs (true/false) and top_logprobs (0..20) -> the number of alternatives."""
    wanted = opt_bool(body, "logprobs")
    top = _opt_int(body, "top_logprobs", 0, MAX_LOGPROBS)
    if top and not wanted:  # 0 is the default: vLLM's clients send it
        raise ApiError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
    return (top or 0) if wanted else None


def _logit_bias(value: Any) -> dict[int, float]:
    """logit_bias: an object of token ids (as strings) to numbers (range checked by
    SamplingParams, ids against the vocabulary at submission)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ApiError(400, "'logit_bias' must be an object mapping token ids to numbers",
                       "logit_bias")
    out = {}
    for key, bias in value.items():
        if not (key.isascii() and key.isdigit()) or len(key) > 19:
            raise ApiError(400, f"'logit_bias' key {short_repr(key)} is not a token id",
                           "logit_bias")
        if not finite_number(bias):
            raise ApiError(400, f"'logit_bias' value of {short_repr(key)} must be a finite "
                                f"number, got {short_repr(bias)}", "logit_bias")
        out[int(key)] = bias
    return out


def _prompts(value: Any) -> tuple[str | list[int], ...]:
    """completions' prompt: a string or token ids (one prompt), or a non-empty list of those
    (a batch: one prompt each)."""
    if isinstance(value, list) and value and all(isinstance(p, (str, list)) for p in value):
        return tuple(_one_prompt(p, f"prompt[{i}]") for i, p in enumerate(value))
    return (_one_prompt(value, "prompt"),)


def _one_prompt(value: Any, where: str) -> str | list[int]:
    if isinstance(value, str):
        return _utf8(value, "prompt")
    if isinstance(value, list) and (set(map(type, value)) <= {int}  # fast path of the next
                                    or all(_is_int(t) for t in value)):
        return value  # (the parsed body's own list: no copy)
    if where != "prompt":
        raise ApiError(400, f"'{where}' must be a string or a list of token ids", "prompt")
    raise ApiError(400, "'prompt' must be a string, a list of token ids, or a non-empty list of "
                        "those (a batch of prompts)", "prompt")


def _messages(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise ApiError(400, "'messages' must be a non-empty list of messages", "messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(400, f"messages[{i}] must be an object with a string 'role'",
                           "messages")
        if m["role"] not in ("system", "user", "assistant", "developer"):
            raise ApiError(400, f"messages[{i}].role {short_repr(m['role'])} is not one of system, "
                                "user, assistant, developer", "messages")
        for field in ("tool_calls", "function_call"):  # no tool use: not silently dropped
            if m.get(field) is not None and not (field == "tool_calls" and m[field] == []):
                raise ApiError(400, f"messages[{i}].{field} is not supported (this server runs "
                                    "no tools)", "messages")
        content = message_text(m.get("content"), m["role"])
        if content is None and isinstance(m.get("content"), list):
            raise ApiError(400, f"messages[{i}].content: only text parts "
                                "({'type': 'text', 'text': ...}) are supported", "messages")
        if content is None:
            raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts",
                           "messages")
        _utf8(content, "messages")
        parts = m.get("content")  # text parts stay parts: the chat template picks its form
        out.append({"role": "system" if m["role"] == "developer" else m["role"],
                    "content": parts if isinstance(parts, list) else content})
    return out


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if (not isinstance(stops, list) or len(stops) > MAX_STOP_STRINGS
            or not all(isinstance(s, str) and s for s in stops)):
        raise ApiError(400, f"'stop' must be a non-empty string or a list of at most "
                            f"{MAX_STOP_STRINGS} non-empty strings", "stop")
    return tuple(_utf8(s, "stop") for s in stops)


def _utf8(text: str, param: str) -> str:
    """`text` if it is valid Unicode (JSON can smuggle in lone surrogates), else a 400."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ApiError(400, f"'{param}' is not valid Unicode text: {e.reason} at index {e.start}",
                       param) from e
    return text


def _allowed_token_ids(value: Any) -> tuple[int, ...]:
    """allowed_token_ids: absent, or a non-empty list of token ids."""
    if value is None:
        return ()
    if not isinstance(value, list) or not value:  # (the ids themselves: SamplingParams)
        raise ApiError(400, f"'allowed_token_ids' must be a non-empty list of token ids "
                            f"(integers >= 0), got {short_repr(value)}", "allowed_token_ids")
    return tuple(value)


def _bad_words(value: Any) -> tuple[str, ...]:
    """bad_words: absent, or a list of non-blank strings (at most MAX_STOP_STRINGS * 4)."""
    if value is None:
        return ()
    if (not isinstance(value, list) or len(value) > 4 * MAX_STOP_STRINGS
            or not all(isinstance(w, str) and w.strip() for w in value)):
        raise ApiError(400, f"'bad_words' must be a list of at most {4 * MAX_STOP_STRINGS} "
                            f"non-blank strings, got {short_repr(value)}", "bad_words")
    return tuple(_utf8(w, "bad_words") for w in value)


def _truncation(body: dict[str, Any]) -> int | None:
    """truncate_prompt_tokens: a positive count of tokens, or -1 (the context's size)."""
    value = body.get("truncate_prompt_tokens")
    if value is None or (_is_int(value) and (value == -1 or 1 <= value <= INT64_MAX)):
        return value
    raise ApiError(400, f"'truncate_prompt_tokens' must be -1 or an integer >= 1, got "
                        f"{short_repr(value)}", "truncate_prompt_tokens")


def _opt_int(body: dict[str, Any], name: str, lo: int, hi: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not _is_int(value) or not lo <= value <= (INT64_MAX if hi is None else hi):
        bounds = f"[{lo}, 2**63)" if hi is None else f"[{lo}, {hi}]"
        raise ApiError(400, f"'{name}' must be an integer in {bounds}, got "
                            f"{short_repr(value)}", name)
    return value


def _opt_number(body: dict[str, Any], name: str, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not finite_number(value):
        raise ApiError(400, f"'{name}' must be a finite number, got {short_repr(value)}", name)
    return float(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _kind(value: Any) -> str:
    return {list: "an array", str: "a string", type(None): "null", bool: "a boolean"}.get(
        type(value), "a number")


def api_param(param: str | None, req: ParsedRequest | None = None) -> str | None:
    """The request field of a SamplingParams parameter (the API calls max_new_tokens max_tokens;
    prompt_logprobs is the request's own field where it sent one, else what echo asked for)."""
    if param == "prompt_logprobs" and req is not None and req.prompt_logprobs is not None:
        return param
    return {"max_new_tokens": "max_tokens", "prompt_logprobs": "echo"}.get(param or "", param)
