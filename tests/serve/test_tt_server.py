"""A tt-backed server (the default model on llm.ttnn_emu) through the official openai client:
greedy requests give the in-process Generator's text, sampled requests (temperature, top_p, top_k,
seed) are served, not refused, and repeat per seed; what the tt backend lacks (logprobs) is a 400
naming the parameter."""

from __future__ import annotations

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
    with pytest.raises(openai.BadRequestError) as info:
        complete(temperature=0.7, logprobs=2)
    assert "logprobs" in str(info.value)
