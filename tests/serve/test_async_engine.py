"""The in-process AsyncEngine and chunked prefill on the real default model."""

from __future__ import annotations

import asyncio

import pytest

from llm.engine.async_engine import AsyncEngine, EngineClosedError
from llm.engine.contract.sampling_params import SamplingParams
from llm.engine.core import EngineBusyError
from llm.engine.scheduler import QueueFullError, SchedulerConfig
from llm.engine.sequence import RequestError

LONG_PROMPT = ("Here is a long list of reasons why people enjoy hiking in the mountains during "
               "summer, written out in full detail: " + "fresh air, quiet trails, views, " * 6)


def all_free(model) -> bool:
    alloc = model.generator.pages.allocator
    return alloc.num_free == alloc.capacity


def test_chunked_prefill_equals_whole_prefill(serve_model) -> None:
    ids = serve_model.tokenizer.encode(LONG_PROMPT)
    assert len(ids) > 64
    params = SamplingParams(max_new_tokens=6)
    whole = serve_model.generate([ids], params)[0]
    previous = serve_model.core.configure(SchedulerConfig(prefill_chunk=16))
    try:
        short = serve_model.tokenizer.encode("Once upon a time")
        both = serve_model.generate([short, ids], [SamplingParams(max_new_tokens=8), params])
    finally:
        serve_model.core.configure(*previous)
    assert both[1].token_ids == whole.token_ids
    assert both[0].token_ids == serve_model.generate([short], SamplingParams(
        max_new_tokens=8))[0].token_ids
    assert all_free(serve_model)


async def _engine_session(engine: AsyncEngine, tok) -> dict:
    got: dict = {}
    greedy = SamplingParams(max_new_tokens=6)
    streams = [engine.submit(tok.encode(p), greedy) for p in ("Once upon a time",
                                                              "The capital of France is")]
    deltas = []
    async for ev in streams[0]:
        deltas.append(ev.text)
    got["stream0"] = ("".join(deltas), ev.output)
    assert await streams[0].result() is ev.output  # after the events were read too
    got["result1"] = await streams[1].result()
    doomed = engine.submit(tok.encode("Tell me a long story"),
                           SamplingParams(max_new_tokens=300, ignore_eos=True))
    first = await doomed.__anext__()
    doomed.cancel()
    rest = [ev async for ev in doomed]
    got["cancelled"] = (first, rest)
    with pytest.raises(RequestError, match="empty"):
        engine.submit([], greedy)
    with pytest.raises(RequestError, match=r"^prompt\[1\]: the prompt is empty"):
        engine.submit_all([(tok.encode("a"), greedy), ([], greedy)], ["prompt[0]", "prompt[1]"])
    assert engine.in_flight == 0  # all or none: the valid first one was not queued
    with pytest.raises(QueueFullError, match="capacity"):  # room for 2 in flight, not 3
        engine.submit_all([(tok.encode(p), greedy) for p in "abc"])
    assert engine.in_flight == 0
    blockers = [engine.submit(tok.encode("a"), SamplingParams(max_new_tokens=50))
                for _ in range(2)]
    with pytest.raises(QueueFullError, match="capacity"):
        engine.submit(tok.encode("b"), greedy)
    for b in blockers:
        b.cancel()
    await asyncio.gather(*(b.result() for b in blockers))
    return got


def test_async_engine_stream_result_cancel_and_limits(serve_model) -> None:
    engine = AsyncEngine(serve_model, SchedulerConfig(max_active=1, max_queue=1))
    try:
        with pytest.raises(EngineBusyError, match="close\\(\\) must wait"):
            serve_model.close()  # its thread may be in a step on the backend
        got = asyncio.run(_engine_session(engine, serve_model.tokenizer))
        assert engine.in_flight == 0
    finally:
        engine.shutdown()
    ref = serve_model.generate(["Once upon a time", "The capital of France is"],
                               SamplingParams(max_new_tokens=6))
    text, out = got["stream0"]
    assert text == out.text == ref[0].text and out.token_ids == ref[0].token_ids
    assert got["result1"].token_ids == ref[1].token_ids
    first, rest = got["cancelled"]
    assert rest[-1].finished and rest[-1].output.finish_reason == "cancelled"
    assert len(rest[-1].output.token_ids) < 300
    assert all_free(serve_model)

    async def after_shutdown() -> None:
        engine.submit([1, 2], SamplingParams())

    with pytest.raises(EngineClosedError):
        asyncio.run(after_shutdown())
