"""A tt-backed server (the default model on llm.ttnn_emu) through the official openai client:
greedy requests give the in-process Generator's text, sampled requests (temperature, top_p, top_k,
seed) are served, not refused, and repeat per seed; so are logprobs (completions and chat, echo
with prompt logprobs), penalties, logit_bias, min_tokens, structured output (valid JSON), n and
best_of; malformed values of each are a 400 naming the parameter."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
import torch
from conftest import serve_in_thread

import llm
from llm.engine.async_engine import AsyncEngine
from llm.engine.contract.sampling_params import SamplingParams
from llm.serve import ServerConfig, create_app

PROMPT = "Once upon a time"
TOKENS = 5


@pytest.fixture(scope="module")
def tt_client():
    """(openai client on a live tt server, the in-process greedy reference)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the emulator's small ops only contend with intra-op threads
    model = llm.LLM(backend="tt", max_batch=2, max_seq_len=64, progress=False,
                    backend_options={"implementation": "emulator"})
    want = model.generate([PROMPT], SamplingParams(max_new_tokens=TOKENS))[0].text
    engine = AsyncEngine(model)
    app = create_app(engine, ServerConfig(model_name="tt-test"))
    with serve_in_thread(app) as url:
        yield openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0,
                            timeout=300), want
    engine.shutdown()
    model.close()
    torch.set_num_threads(threads)


def test_greedy_and_sampled_requests(tt_client) -> None:
    client, want = tt_client

    def complete(**kw) -> str:
        r = client.completions.create(model="tt-test", prompt=PROMPT, max_tokens=TOKENS, **kw)
        assert r.usage.completion_tokens == TOKENS
        return r.choices[0].text

    assert complete(temperature=0) == want
    sampled = dict(temperature=1.3, top_p=0.95, seed=11, extra_body={"top_k": 40})
    first = complete(**sampled)
    assert complete(**sampled) == first  # the same seed, the same tokens
    others = {complete(temperature=1.3, top_p=0.95, seed=s) for s in (1, 2, 3)}
    assert len(others | {first}) > 1  # different seeds do sample different continuations
    chat = client.chat.completions.create(
        model="tt-test", max_tokens=TOKENS, temperature=0.7, seed=3,
        messages=[{"role": "user", "content": "Say hello."}])
    assert chat.choices[0].message.content


def test_every_parameter_the_torch_server_serves(tt_client) -> None:
    client, want = tt_client

    def complete(**kw):
        return client.completions.create(model="tt-test", prompt=PROMPT, max_tokens=TOKENS, **kw)

    r = complete(temperature=0, logprobs=2, echo=True)  # prompt logprobs too
    lp = r.choices[0].logprobs
    assert r.choices[0].text.endswith(want) and lp.token_logprobs[0] is None
    assert len(lp.tokens) == r.usage.total_tokens
    assert all(2 <= len(top) <= 3 for top in lp.top_logprobs[1:])  # + the chosen token
    assert all(v <= 0 for v in lp.token_logprobs[1:])
    chat = client.chat.completions.create(
        model="tt-test", max_tokens=TOKENS, temperature=0.7, seed=3, logprobs=True,
        top_logprobs=3, messages=[{"role": "user", "content": "Say hello."}])
    content = chat.choices[0].logprobs.content
    assert len(content) == TOKENS and all(len(c.top_logprobs) == 3 for c in content)
    penalized = complete(temperature=0, presence_penalty=1.5, frequency_penalty=1.0,
                         logit_bias={"30": 5}, extra_body={"repetition_penalty": 1.3,
                                                          "min_tokens": TOKENS})
    assert penalized.usage.completion_tokens == TOKENS
    biased = complete(temperature=0, logit_bias={"30": 100}, logprobs=0)
    tokens = biased.choices[0].logprobs.tokens
    assert len(set(tokens)) == 1 and biased.choices[0].text != want  # token 30 every time
    assert biased.choices[0].logprobs.token_logprobs[0] > -0.01  # the biased distribution's
    schema = {"type": "object", "additionalProperties": False, "required": ["age"],
              "properties": {"age": {"type": "integer", "minimum": 0, "maximum": 99}}}
    r = client.completions.create(model="tt-test", prompt="Age in JSON:", max_tokens=16,
                                  temperature=0, extra_body={"guided_json": schema})
    assert r.choices[0].finish_reason == "stop"
    assert set(json.loads(r.choices[0].text)) == {"age"}
    r = complete(temperature=0.9, seed=5, n=2, logprobs=0)
    assert [c.index for c in r.choices] == [0, 1]
    best = complete(temperature=0.9, seed=5, best_of=2)  # ranked by logprobs (not returned)
    scores = [sum(c.logprobs.token_logprobs) for c in r.choices]
    assert len(best.choices) == 1 and best.choices[0].logprobs is None
    assert best.choices[0].text == r.choices[scores.index(max(scores))].text


BAD = [("logprobs", 21), ("presence_penalty", 2.5), ("frequency_penalty", "x"),
       ("repetition_penalty", 0), ("logit_bias", {"abc": 1}), ("logit_bias", {"49152": 1}),
       ("min_tokens", -1), ("best_of", 1), ("response_format", {"type": "xml"})]


def test_malformed_values_are_400s_naming_the_parameter(tt_client) -> None:
    client, _ = tt_client
    url = str(client.base_url).rstrip("/")
    for field, value in BAD:
        body = {"model": "tt-test", "max_tokens": 2, "temperature": 0, field: value}
        if field == "best_of":
            body["n"] = 2
        path = "/chat/completions" if field == "response_format" else "/completions"
        body.update({"messages": [{"role": "user", "content": "Hi"}]} if path.startswith("/chat")
                    else {"prompt": PROMPT})
        r = httpx.post(url + path, json=body, timeout=60)
        assert r.status_code == 400, (field, value, r.text)
        assert r.json()["error"]["param"] == field, (field, r.text)
