"""One request never harms another: a request with n > 1 counts once against the queue limit
(as `submit` counts it), and a request whose own grammar fails while it runs ends alone with
finish_reason "error" (a 400 naming its parameter over HTTP), its slots and pages freed, while
the engine and the other requests go on."""

from __future__ import annotations

import asyncio

import httpx
from conftest import MODEL_NAME

from llm.engine.async_engine import AsyncEngine
from llm.engine.contract.sampling_params import SamplingParams
from llm.engine.contract.structured import StructuredOutput
from llm.engine.grammar import GrammarError
from llm.engine.scheduler import SchedulerConfig
from llm.engine.sequence import RequestFailure


def all_free(model) -> bool:
    alloc = model.generator.pages.allocator
    return alloc.num_free == alloc.capacity


async def _n_then_more(engine: AsyncEngine, tok) -> list:
    wide = engine.submit(tok.encode("Hi"), SamplingParams(
        n=4, temperature=1.0, seed=3, max_new_tokens=24, ignore_eos=True))
    await wide.__anext__()  # its four sequences hold the four slots now
    more = [engine.submit(tok.encode(p), SamplingParams(max_new_tokens=4))
            for p in ("Once upon a time", "The capital of France is")]
    return [await s.result() for s in (wide, *more)]


def test_a_request_with_n_sequences_counts_once_against_the_queue(serve_model) -> None:
    # 4 slots + 1 waiting = 5 requests; the n=4 request holds 4 slots but is one request
    engine = AsyncEngine(serve_model, SchedulerConfig(max_active=4, max_queue=1))
    try:
        outs = asyncio.run(_n_then_more(engine, serve_model.tokenizer))
        assert engine.error is None and engine.in_flight == 0
    finally:
        engine.shutdown()
    assert [len(o.choices) for o in outs[:1]] == [4]
    assert [o.finish_reason for o in outs[1:]] == ["length", "length"]
    assert all_free(serve_model)


class _FailsAfter:
    """A grammar matcher that allows everything and fails at its k-th token, as llguidance
    does at a parser limit."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.spec = StructuredOutput("regex", spec=".*", param="guided_regex")
        self.stopped = False

    def consume(self, token: int) -> None:
        self.k -= 1
        if self.k <= 0:
            raise GrammarError("guided_regex: the grammar failed at output token "
                               f"{token}: limit", "guided_regex")

    def fill(self, row) -> None:
        row[:] = -1


def test_a_failing_grammar_ends_its_request_alone(serve_model) -> None:
    sched = serve_model.core.scheduler
    tok = serve_model.tokenizer
    ref = serve_model.generate(["The capital of France is"], SamplingParams(max_new_tokens=8))[0]
    doomed = sched.make_sequence(0, tok.encode("Hi"), SamplingParams(
        n=2, temperature=1.0, seed=1, max_new_tokens=20, ignore_eos=True))
    for s in doomed.group:
        s.grammar = _FailsAfter(3)
    other = sched.make_sequence(1, tok.encode("The capital of France is"),
                                SamplingParams(max_new_tokens=8))
    sched.add(doomed)
    sched.add(other)
    finals = {}
    while sched.has_work:
        for ev in sched.step():
            if ev.finished:
                finals[ev.index] = ev.output
    failed = finals[0]
    assert failed.finish_reason == "error" and len(failed.token_ids) == 3
    assert failed.error == RequestFailure(
        f"guided_regex: the grammar failed at output token {failed.token_ids[-1]}: limit",
        "guided_regex")
    assert all(c.finish_reason == "error" for c in failed.choices)
    assert finals[1].token_ids == ref.token_ids and finals[1].finish_reason == "length"
    assert all_free(serve_model) and not sched.active


def test_guided_choice_of_thousands_of_options(client, live_server) -> None:
    choices = [f"option {i}" for i in range(2500)]
    r = client.completions.create(model=MODEL_NAME, prompt="Pick one:", max_tokens=8,
                                  temperature=0, extra_body={"guided_choice": choices})
    assert r.choices[0].text in choices and r.choices[0].finish_reason == "stop"
    assert live_server.wait_all_free()


def test_grammar_failure_over_http_is_a_400_and_the_server_goes_on(live_server) -> None:
    sched = live_server.engine.scheduler
    make = sched.make_sequence

    def failing(index, ids, params, label=None):
        seq = make(index, ids, params, label)
        if params.structured is not None:
            for s in seq.group:
                s.grammar = _FailsAfter(2)
        return seq

    sched.make_sequence = failing
    body = {"model": MODEL_NAME, "prompt": "Hi", "max_tokens": 8, "guided_regex": "[a-z ]+"}
    try:
        r = httpx.post(f"{live_server.url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "guided_regex" and "grammar failed" in err["message"]
        with httpx.stream("POST", f"{live_server.url}/v1/completions",
                          json={**body, "stream": True}, timeout=60) as s:
            lines = [ln for ln in s.iter_lines() if ln.startswith("data: ")]
        assert '"param": "guided_regex"' in lines[-2] or '"param":"guided_regex"' in lines[-2]
        assert lines[-1] == "data: [DONE]"
    finally:
        sched.make_sequence = make
    ok = httpx.post(f"{live_server.url}/v1/completions", timeout=60,
                    json={"model": MODEL_NAME, "prompt": "Hi", "max_tokens": 4})
    assert ok.status_code == 200 and live_server.engine.error is None
    assert live_server.wait_all_free()


def test_a_request_with_n_sequences_is_one_ttft_and_one_finish_in_the_metrics(
        serve_model) -> None:
    from llm.engine.metrics import ServingMetrics

    metrics = ServingMetrics()
    previous = serve_model.core.configure(SchedulerConfig(), metrics)
    try:
        out = serve_model.generate(["Hi"], SamplingParams(n=4, temperature=1.0, seed=5,
                                                          max_new_tokens=3, ignore_eos=True))[0]
    finally:
        serve_model.core.configure(*previous)
    assert len(out.choices) == 4
    assert metrics.ttft.count == 1 and metrics.finished == {"length": 1}
    assert metrics.generation_tokens == 12 and metrics.itl.count == 8  # 4 x (3 - 1) gaps
