"""Prefix caching through the server, with the official openai client: a shared system prompt is
served from the cache (usage.prompt_tokens_details.cached_tokens, /metrics) with the same answers
as a server started with the cache off (`--no-prefix-cache`), and every page is free after.
"""

from __future__ import annotations

import random

import httpx
import openai
from conftest import MODEL_NAME, serve_in_thread

from llm.engine.async_engine import AsyncEngine
from llm.engine.scheduler import SchedulerConfig
from llm.serve import ServerConfig, create_app
from llm.serve.__main__ import parse_args

WORDS = "the river city mountain people market north winter bridge story old new".split()


def _system_prompt(seed: int) -> str:
    """About 300 tokens, different per seed (so no other test has cached it)."""
    rng = random.Random(seed)
    return "You are a guide. " + " ".join(rng.choice(WORDS) for _ in range(280))


def _ask(client: openai.OpenAI, system: str, question: str, stream: bool = False):
    """(answer text, cached prompt tokens) of one greedy chat request."""
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    if not stream:
        r = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=8,
                                           temperature=0)
        assert r.usage.prompt_tokens > 256 + 8
        return r.choices[0].message.content, r.usage.prompt_tokens_details.cached_tokens
    chunks = list(client.chat.completions.create(
        model=MODEL_NAME, messages=messages, max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks[-1].usage.prompt_tokens_details.cached_tokens


def _metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_shared_system_prompt_is_served_from_the_cache(live_server, client, serve_model) -> None:
    system = _system_prompt(1)
    hits_before = _metric(live_server.url, "llm_prefix_cache_hit_tokens_total")
    first = _ask(client, system, "Where is the bridge?")
    again = _ask(client, system, "Where is the bridge?")
    other = _ask(client, system, "Tell me a story.", stream=True)
    assert first[1] == 0 and again[1] == 256 and other[1] == 256  # one 256-token prefill chunk
    assert again[0] == first[0]
    assert _metric(live_server.url, "llm_prefix_cache_hit_tokens_total") == hits_before + 512
    assert _metric(live_server.url, "llm_prefix_cache_pages") >= 256 // 32
    assert 0 < _metric(live_server.url, "llm_prefix_cache_hit_rate") <= 1
    assert live_server.wait_all_free()

    assert parse_args(["--no-prefix-cache"]).no_prefix_cache and not parse_args([]).no_prefix_cache
    engine = AsyncEngine(serve_model, SchedulerConfig(prefix_cache=False))
    try:
        with serve_in_thread(create_app(engine, ServerConfig(model_name=MODEL_NAME))) as url:
            off = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
            cold = [_ask(off, system, "Where is the bridge?") for _ in range(2)]
            cold.append(_ask(off, system, "Tell me a story.", stream=True))
            assert _metric(url, "llm_prefix_cache_pages") == 0
    finally:
        engine.shutdown()
    assert cold == [(first[0], 0), (first[0], 0), (other[0], 0)]  # the same answers, uncached
