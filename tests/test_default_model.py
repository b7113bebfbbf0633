"""End-to-end on the real default model (SmolLM2-135M-Instruct GGUF).

Greedy tokens equal transformers' greedy tokens, batched and alone; streaming, stop strings, seeds,
chat and bad input through the Generator.
"""

from __future__ import annotations

import time

import pytest
import torch

import llm
from llm.engine.contract.sampling_params import SamplingParams
from llm.engine.generator import RequestError

PROMPTS = [
    "Once upon a time",
    "The capital of France is",
    "Here is a short list of reasons why people enjoy hiking in the mountains during summer:",
]
NEW_TOKENS = 48


@pytest.fixture(scope="module")
def engine() -> llm.LLM:
    return llm.LLM(max_batch=4, max_seq_len=256, progress=False)


@pytest.fixture(scope="module")
def hf_greedy(hf_default_model) -> tuple[list[list[int]], float]:
    """transformers' greedy continuation of each prompt (and its decode tok/s), fp32."""
    model, tok = hf_default_model
    outs, rates = [], []
    for p in PROMPTS:
        ids = tok(p, return_tensors="pt").input_ids
        t0 = time.perf_counter()
        with torch.no_grad():
            g = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
        rates.append(NEW_TOKENS / (time.perf_counter() - t0))
        outs.append(g[0, ids.shape[1]:].tolist())
    return outs, sum(rates) / len(rates)


def test_prompt_tokens_match_transformers(engine, hf_default_model) -> None:
    _, tok = hf_default_model
    for p in PROMPTS:
        assert engine.tokenizer.encode(p) == tok(p).input_ids


def test_greedy_equals_transformers_batched_and_alone(engine, hf_greedy) -> None:
    ref, hf_rate = hf_greedy
    params = SamplingParams(max_new_tokens=NEW_TOKENS)
    batch = engine.generate(PROMPTS, params)
    for out, want in zip(batch, ref):
        assert out.token_ids == want, (out.index, out.text)
    for i, p in enumerate(PROMPTS):
        assert engine.generate([p], params)[0].token_ids == batch[i].token_ids
    rate = sum(o.decode_tok_s for o in batch) / len(batch)
    print(f"\ndecode tok/s/user, batch of 3: ours {rate:.1f}; transformers generate "
          f"(one prompt at a time) {hf_rate:.1f}")


def test_known_continuation(engine) -> None:
    out = engine.generate(["Once upon a time"], SamplingParams(max_new_tokens=20))[0]
    assert out.text.startswith(", the city of Nova Haven was a thriving metropolis, with towering")
    assert out.finish_reason == "length" and len(out.token_ids) == 20
    assert out.ttft_s > 0 and out.decode_tok_s > 0


def test_stream_deltas_and_stop_string(engine) -> None:
    params = SamplingParams(max_new_tokens=30, stop=("Haven",))
    events = list(engine.stream(["Once upon a time"], params))
    final = events[-1]
    assert final.finished and final.output.finish_reason == "stop"
    assert "".join(e.text for e in events) == final.output.text == ", the city of Nova "


def test_sampling_is_reproducible_whatever_the_batch(engine) -> None:
    p = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=1234, max_new_tokens=16)
    alone = engine.generate(["Once upon a time"], p)[0].token_ids
    mixed = engine.generate(["Once upon a time", "The capital of France is"],
                            [p, SamplingParams(max_new_tokens=5)])
    assert mixed[0].token_ids == alone
    other = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=99, max_new_tokens=16)
    assert engine.generate(["Once upon a time"], other)[0].token_ids != alone


def test_chat_template_answer(engine) -> None:
    out = engine.chat([{"role": "user", "content": "What is the capital of France?"}],
                      SamplingParams(max_new_tokens=24))
    assert "Paris" in out.text
    assert out.finish_reason in ("stop", "length")


def test_more_requests_than_slots_and_pages_all_freed(engine) -> None:
    prompts = [f"Number {i} is" for i in range(7)]  # 7 requests through 4 slots
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=6))
    assert [o.index for o in outs] == list(range(7))
    alone = engine.generate([prompts[5]], SamplingParams(max_new_tokens=6))[0]
    assert outs[5].token_ids == alone.token_ids
    pt = engine.generator.pages
    assert pt.allocator.num_free == pt.allocator.capacity


def test_bad_requests_are_clear_errors(engine) -> None:
    with pytest.raises(RequestError, match="prompt has 300 tokens but the context limit is 256"):
        engine.generate([[5] * 300])
    with pytest.raises(RequestError, match="the prompt is empty"):
        engine.generate([""])
    with pytest.raises(RequestError, match=r"token ids \[49152\] outside \[0, 49152\)"):
        engine.generate([[1, 49152]])
    with pytest.raises(ValueError, match="got 2 SamplingParams for 1 prompts"):
        engine.generate(["a"], [SamplingParams(), SamplingParams()])
    pt = engine.generator.pages
    assert pt.allocator.num_free == pt.allocator.capacity
