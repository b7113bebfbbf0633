"""The Python API returns log probabilities and applies penalties: `LLM.generate` / `stream`
with the default model against transformers (its logits, and its own generate with
repetition_penalty), and bad values are errors naming the parameter with nothing left held.
"""

from __future__ import annotations

import pytest
import torch

import llm
from llm import SamplingParams
from llm.engine.contract.sampling_params import SamplingParamsError

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def engine() -> llm.LLM:
    return llm.LLM(max_batch=4, max_seq_len=256, progress=False)


def _all_free(engine: llm.LLM) -> bool:
    alloc = engine.generator.pages.allocator
    return alloc.num_free == alloc.capacity and not engine.generator.scheduler.has_work


def test_logprobs_and_prompt_logprobs_equal_transformers(engine, hf_default_model) -> None:
    model, _ = hf_default_model
    out = engine.generate([PROMPT], SamplingParams(max_new_tokens=8, logprobs=3,
                                                   prompt_logprobs=2))[0]
    ids = out.prompt_token_ids + out.token_ids
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)  # [S, V]
    n = len(out.prompt_token_ids)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == n
    pairs = list(zip(out.prompt_logprobs[1:], range(n - 1))) + list(
        zip(out.logprobs, range(n - 1, len(ids) - 1)))
    for entry, i in pairs:
        assert entry.token == ids[i + 1]
        assert entry.logprob == pytest.approx(float(lp[i, ids[i + 1]]), abs=2e-3)
        k = 3 if i >= n - 1 else 2
        assert len(entry.top) == k
        assert [t for t, _ in entry.top][:1] == lp[i].topk(1).indices.tolist()
        for t, v in entry.top:
            assert v == pytest.approx(float(lp[i, t]), abs=2e-3)
        if i < n - 1:  # a prompt token's rank: tokens at least as likely (vLLM's)
            ahead = int((lp[i] > lp[i, ids[i + 1]] + 2e-3).sum())
            tied = int((lp[i] >= lp[i, ids[i + 1]] - 2e-3).sum())
            assert ahead < entry.rank <= tied, (i, entry.rank, ahead, tied)
        else:
            assert entry.rank is None  # generated tokens carry none
    assert [e.token for e in out.logprobs] == out.token_ids
    assert out.logprobs[0].top[0][0] == out.token_ids[0]  # greedy: the best is the chosen one


def test_streamed_logprobs_add_up_to_the_output(engine) -> None:
    params = SamplingParams(max_new_tokens=10, logprobs=1, temperature=0.7, seed=5)
    events = list(engine.stream([PROMPT], params))
    final = events[-1].output
    assert [lp for ev in events for lp in ev.logprobs] == final.logprobs
    assert len(final.logprobs) == len(final.token_ids) == 10
    assert engine.generate([PROMPT], SamplingParams(max_new_tokens=4)).pop().logprobs is None


def test_repetition_penalty_equals_transformers_generate(engine, hf_default_model) -> None:
    model, tok = hf_default_model
    prompt = "List the numbers: one, two, one, two, one, two,"
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=24, do_sample=False, repetition_penalty=1.3)
    got = engine.generate([prompt], SamplingParams(max_new_tokens=24, repetition_penalty=1.3,
                                                   ignore_eos=True))[0]
    assert got.token_ids == want[0, ids.shape[1]:].tolist()
    plain = engine.generate([prompt], SamplingParams(max_new_tokens=24, ignore_eos=True))[0]
    assert plain.token_ids != got.token_ids  # the penalty changed the greedy continuation


def test_presence_frequency_bias_and_min_tokens_through_the_api(engine) -> None:
    plain = engine.generate([PROMPT], SamplingParams(max_new_tokens=12))[0].token_ids
    biased = engine.generate([PROMPT], SamplingParams(max_new_tokens=12,
                                                      logit_bias={plain[0]: -100}))[0]
    assert biased.token_ids[0] != plain[0]
    forced = engine.generate([PROMPT], SamplingParams(max_new_tokens=3, logit_bias={42: 100}))
    assert forced[0].token_ids == [42, 42, 42]
    loop = "one, two, one, two, one, two,"
    plain = engine.generate([loop], SamplingParams(max_new_tokens=16, ignore_eos=True))[0]
    fresh = engine.generate([loop], SamplingParams(max_new_tokens=16, ignore_eos=True,
                                                   frequency_penalty=2.0, presence_penalty=2.0))[0]
    assert max(map(fresh.token_ids.count, fresh.token_ids)) < max(
        map(plain.token_ids.count, plain.token_ids))  # fewer repeats of generated tokens
    eos = engine.tokenizer.eos_ids[0]
    stops = engine.generate([PROMPT], SamplingParams(max_new_tokens=4, logit_bias={eos: 100}))[0]
    assert stops.token_ids == [eos] and stops.finish_reason == "stop"
    late = engine.generate([PROMPT], SamplingParams(max_new_tokens=6, logit_bias={eos: 100},
                                                    min_tokens=3))[0]
    assert len(late.token_ids) == 4 and late.token_ids[-1] == eos
    assert eos not in late.token_ids[:3]
    assert _all_free(engine)


def test_bad_values_name_the_parameter_and_hold_nothing(engine) -> None:
    with pytest.raises(SamplingParamsError, match=r"logit_bias keys \[49152\]") as e:
        engine.generate([PROMPT], SamplingParams(logit_bias={49152: 1.0}))
    assert e.value.param == "logit_bias"
    with pytest.raises(SamplingParamsError) as e:
        engine.generate([PROMPT], SamplingParams(logprobs=21))
    assert e.value.param == "logprobs"
    assert _all_free(engine)


def test_tokens_and_logprobs_do_not_depend_on_the_batch(engine) -> None:
    """A sampled, penalized request with logprobs gives the same tokens and logprobs alone and
    next to others (plain, penalized, with prompt logprobs)."""
    mine = SamplingParams(max_new_tokens=12, temperature=0.8, seed=11, logprobs=4,
                          presence_penalty=0.7, repetition_penalty=1.1, logit_bias={13: 2.0})
    others = [SamplingParams(max_new_tokens=5),
              SamplingParams(max_new_tokens=9, frequency_penalty=1.0, logprobs=1),
              SamplingParams(max_new_tokens=7, prompt_logprobs=2, temperature=1.0, seed=2)]
    alone = engine.generate([PROMPT], mine)[0]
    together = engine.generate([PROMPT, "Once upon a time", "Hello", PROMPT],
                               [mine, *others])[0]
    assert together.token_ids == alone.token_ids
    for a, b in zip(together.logprobs, alone.logprobs, strict=True):
        assert a.token == b.token and a.logprob == pytest.approx(b.logprob, abs=1e-5)
        assert [t for t, _ in a.top] == [t for t, _ in b.top]
    assert _all_free(engine)


def test_min_tokens_holds_off_stop_strings_too(engine) -> None:
    plain = engine.generate([PROMPT], SamplingParams(max_new_tokens=8))[0]
    word = engine.tokenizer.decode(plain.token_ids[:1])  # the first token's text
    early = engine.generate([PROMPT], SamplingParams(max_new_tokens=8, stop=(word,)))[0]
    assert early.text == "" and early.finish_reason == "stop" and len(early.token_ids) == 1
    held = engine.generate([PROMPT], SamplingParams(max_new_tokens=8, stop=(word,),
                                                    min_tokens=3))[0]
    assert held.token_ids[:3] == plain.token_ids[:3]  # not ended by the early occurrence
    assert held.text.startswith(word) and len(held.token_ids) >= 3
    assert _all_free(engine)


def test_streamed_best_of_text_stays_with_its_sequence(engine) -> None:
    params = SamplingParams(max_new_tokens=8, n=1, best_of=3, temperature=1.0, seed=2)
    texts: dict[int, str] = {}
    for ev in engine.stream(["Once upon a time"], params):
        texts[ev.choice] = texts.get(ev.choice, "") + ev.text
        if ev.finished:
            final = ev.output
    assert len(texts) == 3 and final.text in texts.values()
    assert final.choice == 0 and _all_free(engine)
    two = SamplingParams(max_new_tokens=8, n=2, best_of=4, temperature=1.0, seed=1)
    texts = {}
    for ev in engine.stream(["Once upon a time"], two):
        texts[ev.choice] = texts.get(ev.choice, "") + ev.text
        if ev.finished:
            final = ev.output
    assert [c.choice for c in final.choices] == [0, 1]  # renumbered, best first
    assert [texts[c.sequence] for c in final.choices] == [c.text for c in final.choices]
