"""The AsyncEngine's hand-overs: an idle engine thread launches a request's first prefill chunk
before `submit` returns where the backend computes off the host, and the first token reaches the
event loop before the decode step that follows its prefill starts."""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

import pytest

from llm.engine import async_engine
from llm.engine.async_engine import AsyncEngine
from llm.engine.contract.sampling_params import SamplingParams
from llm.engine.core import EngineCore
from llm.engine.scheduler import SchedulerConfig
from tests.fakes import expected_tokens, fake_parts


def _engine(host_compute: bool) -> tuple[AsyncEngine, list[str]]:
    """An AsyncEngine over the fake backend; the log of its prefill / decode calls and of the
    event loop reading first tokens."""
    backend, tok, _ = fake_parts()
    backend.host_compute = host_compute
    log: list[str] = []
    prefill, decode = backend.prefill_step, backend.decode_step

    def logged(name, fn):
        def call(inp, *launched):
            log.append(name)
            return fn(inp, *launched)
        return call

    backend.prefill_step = logged("prefill", prefill)
    backend.decode_step = logged("decode", decode)
    return AsyncEngine(SimpleNamespace(core=EngineCore(backend, tok)),
                       SchedulerConfig(max_queue=8)), log


@pytest.mark.parametrize("host_compute", [False, True])
def test_submit_to_an_idle_engine_waits_for_the_launch(monkeypatch, host_compute: bool) -> None:
    """submit returns once the backend said the first chunk was launched, while that chunk's
    prefill_step still runs (the device computing); where the backend computes on the host it
    does not wait at all."""
    monkeypatch.setattr(async_engine, "HAND_OVER_S", 10.0)  # a slow machine cannot make it flaky
    engine, log = _engine(host_compute)
    backend = engine.core.backend
    step = backend.prefill_step
    computing, seen = threading.Event(), []

    def prefill_step(inp, launched=None):
        def launch() -> None:
            log.append("launched")
            launched()
        out = step(inp, launch)
        computing.wait(10)  # the device still computes: the token is not read yet
        log.append("read back")
        return out

    backend.prefill_step = prefill_step

    async def go() -> list[int]:
        await asyncio.sleep(0.05)  # the engine thread is waiting for work by now
        stream = engine.submit([1, 2, 3], SamplingParams(max_new_tokens=4))
        seen.append(list(log))
        computing.set()
        return (await stream.result()).token_ids

    try:
        assert asyncio.run(go()) == expected_tokens([1, 2, 3], 4)
    finally:
        engine.shutdown()
    if host_compute:  # submit did not wait (the engine may not have started yet)
        assert "read back" not in seen[0]
    else:  # it waited for the launch, and not for the chunk's result
        assert seen == [["prefill", "launched"]]


def test_submit_stops_waiting_when_the_step_launches_nothing(monkeypatch) -> None:
    """A backend that never calls `launched` (or a step without a prefill) still lets submit go
    once the step's prefill phase is over, not after HAND_OVER_S."""
    monkeypatch.setattr(async_engine, "HAND_OVER_S", 10.0)
    engine, log = _engine(host_compute=False)
    backend = engine.core.backend
    step = backend.prefill_step
    backend.prefill_step = lambda inp, launched=None: step(inp)  # never says launched

    async def go() -> float:
        await asyncio.sleep(0.05)
        t0 = time.monotonic()
        stream = engine.submit([1, 2, 3], SamplingParams(max_new_tokens=2))
        waited = time.monotonic() - t0
        await stream.result()
        return waited

    try:
        assert asyncio.run(go()) < 5.0
    finally:
        engine.shutdown()


def test_first_token_is_read_before_the_next_decode_step(monkeypatch) -> None:
    monkeypatch.setattr(async_engine, "HAND_OVER_S", 10.0)
    engine, log = _engine(host_compute=False)

    async def go() -> None:
        stream = engine.submit([4, 5, 6], SamplingParams(max_new_tokens=3))
        first = await stream.__anext__()
        log.append(f"read {first.text!r}")
        await stream.result()

    try:
        asyncio.run(go())
    finally:
        engine.shutdown()
    assert log[:3] == ["prefill", log[1], "decode"] and log[1].startswith("read ")


def test_no_hand_over_while_other_sequences_decode() -> None:
    """The engine waits for the event loop only when no running sequence is past its first
    token (else their decode step would wait for the loop)."""
    def seq(tokens: int) -> SimpleNamespace:
        return SimpleNamespace(out=SimpleNamespace(token_ids=[5] * tokens))

    assert async_engine._only_new(SimpleNamespace(active={0: seq(1), 1: seq(0)}))
    assert not async_engine._only_new(SimpleNamespace(active={0: seq(1), 1: seq(2)}))
