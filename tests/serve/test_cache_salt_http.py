"""vLLM's cache_salt through the server, with the official openai client: a request hits the
prefix cache only where a request of the same salt (or, unsalted, one without a salt) computed the
prefix, on both endpoints (usage.prompt_tokens_details.cached_tokens, /metrics), with the same
answers; a malformed salt, and the vLLM fields this server cannot honour (kv_transfer_params,
early_stopping, ...), are a 400 naming the field; every page and slot is free after.
"""

from __future__ import annotations

import random

import httpx
import openai
import pytest
from conftest import MODEL_NAME

WORDS = "lake tower forest garden harbor valley summer road lamp field stone song".split()


def _system_prompt(seed: int) -> str:
    """About 300 tokens, different per seed (so no other test has cached it)."""
    rng = random.Random(seed)
    return "You are a guide. " + " ".join(rng.choice(WORDS) for _ in range(280))


def _ask(client: openai.OpenAI, system: str, salt: str | None, stream: bool = False):
    """(answer text, cached prompt tokens) of one greedy chat request with cache_salt `salt`."""
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "Where?"}]
    extra = {} if salt is None else {"cache_salt": salt}
    if not stream:
        r = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=6,
                                           temperature=0, extra_body=extra)
        assert r.usage.prompt_tokens > 256 + 8
        return r.choices[0].message.content, r.usage.prompt_tokens_details.cached_tokens
    chunks = list(client.chat.completions.create(
        model=MODEL_NAME, messages=messages, max_tokens=6, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body=extra))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks[-1].usage.prompt_tokens_details.cached_tokens


def _hit_tokens(url: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith("llm_prefix_cache_hit_tokens_total "):
            return float(line.split()[1])
    raise AssertionError("llm_prefix_cache_hit_tokens_total not in /metrics")


def test_chat_requests_share_the_cache_only_within_one_salt(live_server, client) -> None:
    system = _system_prompt(21)
    before = _hit_tokens(live_server.url)
    order = [(None, False), ("tenant-a", False), ("tenant-a", True), ("tenant-b", False),
             (None, True), ("tenant-b", False)]
    answers = [_ask(client, system, salt, stream) for salt, stream in order]
    assert [cached for _, cached in answers] == [0, 0, 256, 0, 256, 256]  # one 256-token chunk
    assert len({text for text, _ in answers}) == 1  # the same greedy answer, cached or not
    assert _hit_tokens(live_server.url) == before + 3 * 256
    assert live_server.wait_all_free()


def test_completions_share_the_cache_only_within_one_salt(live_server, client) -> None:
    prompt = _system_prompt(22)

    def cached(salt: str) -> tuple[str, int]:
        r = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=4,
                                      temperature=0, extra_body={"cache_salt": salt})
        return r.choices[0].text, r.usage.prompt_tokens_details.cached_tokens

    runs = [cached(s) for s in ("x" * 1024, "x" * 1024, "x" * 1023, "\u00e9t\u00e9 \U0001f600")]
    assert [c for _, c in runs] == [0, 256, 0, 0] and len({t for t, _ in runs}) == 1
    assert live_server.wait_all_free()


# (a lone surrogate, which the openai client cannot send: test_hostile.py's raw bodies)
@pytest.mark.parametrize("salt", ["", 5, True, ["a"], {"salt": "a"}, "x" * 1025])
@pytest.mark.parametrize("chat", [False, True])
def test_a_malformed_salt_is_a_400_naming_it(live_server, client, salt, chat) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        if chat:
            client.chat.completions.create(model=MODEL_NAME, max_tokens=2, extra_body={
                "cache_salt": salt}, messages=[{"role": "user", "content": "Hi"}])
        else:
            client.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=2,
                                      extra_body={"cache_salt": salt})
    assert e.value.body["param"] == "cache_salt"
    assert "cache_salt" in e.value.message and "1024 characters" in e.value.message
    assert live_server.wait_all_free()


UNHONOURED = [("kv_transfer_params", {"do_remote_decode": True}), ("early_stopping", True),
              ("ec_transfer_params", {"x": 1}), ("watermarking", True),
              ("thinking_token_budget", 64), ("logprob_token_ids", [5]),
              ("repetition_detection", {"max_pattern_size": 4}), ("stream_interval", 4),
              ("truncation_side", "right"), ("media_io_kwargs", {"image": {}}),
              ("routed_experts_prompt_start", 2), ("return_prompt_text", True)]


@pytest.mark.parametrize("field, value", UNHONOURED)
def test_vllm_fields_this_server_cannot_honour_are_refused(live_server, client, field,
                                                           value) -> None:
    for send in (lambda extra: client.completions.create(
                     model=MODEL_NAME, prompt="Hi", max_tokens=2, extra_body=extra),
                 lambda extra: client.chat.completions.create(
                     model=MODEL_NAME, max_tokens=2, extra_body=extra,
                     messages=[{"role": "user", "content": "Hi"}])):
        with pytest.raises(openai.BadRequestError) as e:
            send({field: value})
        assert e.value.body["param"] == field and f"'{field}' is not supported" in e.value.message
    assert live_server.wait_all_free()


def test_their_not_used_values_pass(client) -> None:
    neutral = {"kv_transfer_params": {}, "early_stopping": False, "watermarking": False,
               "thinking_token_budget": -1, "stream_interval": 1, "truncation_side": "left",
               "routed_experts_prompt_start": 0, "return_prompt_text": False,
               "session_id": "s1", "return_token_offsets": True}
    r = client.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=2,
                                  extra_body=neutral)
    assert r.usage.completion_tokens >= 1
