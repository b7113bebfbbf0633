"""The official `openai` client against the live server: completions and chat, streamed and not,
models, usage, and the same greedy text as the in-process Generator.
"""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest
from conftest import MODEL_NAME

from llm.engine.contract.sampling_params import SamplingParams

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def reference(serve_model):
    """Greedy results of the in-process Generator (before the server engine runs anything)."""
    prompt = serve_model.generate([PROMPT], SamplingParams(max_new_tokens=12))[0]
    chat = serve_model.chat([{"role": "user", "content": "What is the capital of France?"}],
                            SamplingParams(max_new_tokens=12))
    return prompt, chat


def test_models(client) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL_NAME]
    card = client.models.retrieve(MODEL_NAME)
    assert card.id == MODEL_NAME
    assert 0 < card.created <= time.time() and client.models.list().data[0].created == card.created


def test_completion(client, reference) -> None:
    want, _ = reference
    r = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=12, temperature=0)
    assert r.choices[0].text == want.text and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(want.prompt_token_ids)
    assert r.usage.completion_tokens == 12 and r.usage.total_tokens == r.usage.prompt_tokens + 12


def test_completion_streamed(client, reference) -> None:
    want, _ = reference
    chunks = list(client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=12,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert len([c for c in chunks if c.choices and c.choices[0].text]) > 3  # really incremental
    assert chunks[-1].usage.completion_tokens == 12 and not chunks[-1].choices


def test_chat(client, reference) -> None:
    _, want = reference
    r = client.chat.completions.create(
        model=MODEL_NAME, max_tokens=12, temperature=0,
        messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want.text and "Paris" in want.text
    assert r.usage.prompt_tokens == len(want.prompt_token_ids)
    assert r.usage.completion_tokens == len(want.token_ids)


def test_chat_streamed_with_stop_and_seed(client, reference) -> None:
    _, want = reference
    stream = client.chat.completions.create(
        model=MODEL_NAME, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "What is the capital of France?"}])
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == want.text
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")
    assert chunks[-2].usage is None and not chunks[-1].choices
    assert chunks[-1].usage.completion_tokens == len(want.token_ids)
    word = want.text.split()[2]
    r = client.chat.completions.create(
        model=MODEL_NAME, max_tokens=12, temperature=0, stop=[word],
        messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == want.text[:want.text.index(word)]
    sampled = [client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=8,
                                         temperature=0.9, top_p=0.95, seed=7,
                                         extra_body={"top_k": 40}).choices[0].text
               for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_client_sees_clean_errors(client) -> None:
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=MODEL_NAME, prompt="hi", max_tokens=2, temperature=-1)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model=MODEL_NAME, prompt="hi " * 600, max_tokens=2)


def test_streamed_usage_is_counted_once(live_server) -> None:
    """Usage only in the extra last chunk of include_usage (every other chunk: usage null), and in
    no chunk without it: a client summing usage over the chunks counts the request once."""
    body = {"model": MODEL_NAME, "prompt": "Once upon a time", "max_tokens": 5,
            "temperature": 0, "stream": True}
    for include, want_total in ((True, 5), (False, 0)):
        r = httpx.post(live_server.url + "/v1/completions",
                       json={**body, "stream_options": {"include_usage": include}}, timeout=60)
        chunks = [json.loads(line[6:]) for line in r.text.splitlines()
                  if line.startswith("data: {")]
        assert all(("usage" in c) == include for c in chunks), chunks
        assert sum((c.get("usage") or {}).get("completion_tokens", 0) for c in chunks) == want_total
        if include:
            assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5



@pytest.mark.parametrize("path", ["/completions", "/chat/completions"])
def test_continuous_usage_stats(live_server, path) -> None:
    """vLLM's stream_options.continuous_usage_stats (with include_usage): every chunk carries
    the usage so far, the prompt's tokens and its choice's tokens, growing to the final chunk's
    count; without include_usage it is a 400 naming stream_options."""
    body = {"model": MODEL_NAME, "max_tokens": 6, "temperature": 0, "stream": True, "n": 2,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    body.update({"messages": [{"role": "user", "content": "Hi"}]} if path.startswith("/chat")
                else {"prompt": "Once upon a time", "echo": True})
    r = httpx.post(f"{live_server.url}/v1{path}", json=body, timeout=60)
    chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    *per_choice, final = chunks
    prompt = final["usage"]["prompt_tokens"]
    seen = {0: 0, 1: 0}
    for c in per_choice:
        (choice,) = c["choices"]
        u = c["usage"]
        assert u["prompt_tokens"] == prompt and u["total_tokens"] == prompt + u["completion_tokens"]
        assert u["completion_tokens"] >= seen[choice["index"]]
        seen[choice["index"]] = u["completion_tokens"]
    assert seen == {0: 6, 1: 6} and final["usage"]["completion_tokens"] == 12
    bad = {**body, "stream_options": {"continuous_usage_stats": True}}
    r = httpx.post(f"{live_server.url}/v1{path}", json=bad, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream_options"
    assert "continuous_usage_stats" in r.json()["error"]["message"]
    assert live_server.wait_all_free()
