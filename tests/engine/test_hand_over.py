"""The AsyncEngine's hand-overs: an idle engine thread takes a request before `submit` returns
where the backend computes off the host, and the first token reaches the event loop before the
decode step that follows its prefill starts."""

from __future__ import annotations

import asyncio
import threading
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
        def call(inp):
            log.append(name)
            return fn(inp)
        return call

    backend.prefill_step = logged("prefill", prefill)
    backend.decode_step = logged("decode", decode)
    return AsyncEngine(SimpleNamespace(core=EngineCore(backend, tok)),
                       SchedulerConfig(max_queue=8)), log


@pytest.mark.parametrize("host_compute", [False, True])
def test_submit_to_an_idle_engine(monkeypatch, host_compute: bool) -> None:
    monkeypatch.setattr(async_engine, "HAND_OVER_S", 10.0)  # a slow machine cannot make it flaky
    engine, log = _engine(host_compute)
    gate = threading.Event()
    taken = []

    async def go() -> list[int]:
        await asyncio.sleep(0.05)  # the engine thread is waiting for work by now
        engine.scheduler.add = _gated(engine.scheduler.add, gate)
        engine._picked_up = picked = _CountedEvent()
        stream = engine.submit([1, 2, 3], SamplingParams(max_new_tokens=4))
        taken.append((picked.waits, not engine._inbox))
        gate.set()
        return (await stream.result()).token_ids

    try:
        assert asyncio.run(go()) == expected_tokens([1, 2, 3], 4)
    finally:
        engine.shutdown()
    if host_compute:  # submit did not wait
        assert taken[0][0] == 0
    else:  # it waited, and the engine thread took the request before submit returned
        assert taken == [(1, True)]


class _CountedEvent(threading.Event):
    """An Event that counts the waits on it."""

    def __init__(self) -> None:
        super().__init__()
        self.waits = 0

    def wait(self, timeout: float | None = None) -> bool:
        self.waits += 1
        return super().wait(timeout)


def _gated(add, gate: threading.Event):
    """`add` that blocks until `gate` is set (so a request taken stays visible as taken)."""
    def call(seq):
        gate.wait(10)
        return add(seq)
    return call


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
