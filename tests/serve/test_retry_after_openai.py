"""The 429 of a full queue, end to end with the official openai client: its Retry-After (from the
measured drain rate, see ServingMetrics.retry_after_s) is an integer the client honours (it
sleeps Retry-After when 0 < value <= its cap, instead of its own 0.5-8 s backoff), so a burst of
concurrent requests far beyond the server's capacity all finally succeed with client retries
alone; without retries the 429 surfaces as openai.RateLimitError carrying the header.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import openai
import pytest
from conftest import MODEL_NAME, LiveServer, serve_in_thread

from llm.engine.async_engine import AsyncEngine
from llm.engine.scheduler import SchedulerConfig
from llm.serve import ServerConfig, create_app

MAX_ACTIVE = 2  # with max_queue=0: a third request in flight is refused at once
BURST = 8  # concurrent requests, 4x the capacity
MAX_TOKENS = 16


@dataclass
class Exchange:
    """One HTTP attempt as the openai client's transport saw it."""

    thread: int
    sent: float  # time.monotonic() when the request went out
    status: int | None = None
    retry_after: str | None = None


class Recorder:
    """httpx event hooks recording every attempt (openai retries a request on its own thread)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.exchanges: list[Exchange] = []
        self.pending: dict[int, Exchange] = {}

    def on_request(self, request) -> None:
        ex = Exchange(threading.get_ident(), time.monotonic())
        with self.lock:
            self.exchanges.append(ex)
            self.pending[ex.thread] = ex

    def on_response(self, response) -> None:
        with self.lock:
            ex = self.pending.pop(threading.get_ident())
        ex.status = response.status_code
        ex.retry_after = response.headers.get("retry-after")

    def client(self, url: str, max_retries: int) -> openai.OpenAI:
        # DefaultHttpxClient: the httpx flavour this openai version is built on
        http = openai.DefaultHttpxClient(event_hooks={"request": [self.on_request],
                                                      "response": [self.on_response]})
        return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=max_retries,
                             timeout=60, http_client=http)

    def refused(self) -> list[Exchange]:
        return [ex for ex in self.exchanges if ex.status == 429]


@pytest.fixture(scope="module")
def tiny_server(serve_model) -> Iterator[LiveServer]:
    """A server admitting MAX_ACTIVE requests and queueing none (every extra one is a 429)."""
    engine = AsyncEngine(serve_model, SchedulerConfig(max_active=MAX_ACTIVE, max_queue=0))
    try:
        with serve_in_thread(create_app(engine, ServerConfig(model_name=MODEL_NAME))) as url:
            yield LiveServer(url, engine, serve_model)
    finally:
        engine.shutdown()


def _rejected(url: str) -> int:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith("llm_requests_rejected_total "):
            return int(float(line.split()[1]))
    raise AssertionError("llm_requests_rejected_total not in /metrics")


def _retry_after_s(value: str | None) -> int:
    assert value is not None and value.isdigit(), value  # delta-seconds, no date, no fraction
    assert 1 <= int(value) <= 60, value
    return int(value)


def _ask(client: openai.OpenAI, i: int, max_tokens: int = MAX_TOKENS) -> int:
    """Completion tokens of one greedy request (a completion or a chat turn, by parity)."""
    extra = {"ignore_eos": True}
    if i % 2:
        r = client.chat.completions.create(
            model=MODEL_NAME, messages=[{"role": "user", "content": f"Count to {i}."}],
            max_tokens=max_tokens, temperature=0, extra_body=extra)
    else:
        r = client.completions.create(model=MODEL_NAME, prompt=f"Story {i}: once upon a time",
                                      max_tokens=max_tokens, temperature=0, extra_body=extra)
    return r.usage.completion_tokens


def test_openai_client_retries_rescue_every_refused_request(tiny_server) -> None:
    url = tiny_server.url
    rec = Recorder()
    client = rec.client(url, max_retries=8)
    assert _ask(client, 0) == MAX_TOKENS  # warm, and a finished request gives a drain rate
    rejected_before = _rejected(url)

    results: list[int | BaseException | None] = [None] * BURST
    start = threading.Barrier(BURST)

    def worker(i: int) -> None:
        start.wait()
        try:
            results[i] = _ask(client, i)
        except BaseException as e:  # reported by the assertion below
            results[i] = e

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(BURST)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    elapsed = time.monotonic() - t0

    assert results == [MAX_TOKENS] * BURST, results  # (b) every request finally succeeded
    refused = rec.refused()
    assert len(refused) >= BURST - MAX_ACTIVE  # (a) the burst was refused at first ...
    assert _rejected(url) - rejected_before == len(refused)  # ... as the server counted it
    assert {ex.status for ex in rec.exchanges} == {200, 429}
    assert sum(ex.status == 200 for ex in rec.exchanges) == BURST + 1
    waits = [_retry_after_s(ex.retry_after) for ex in refused]  # (c) integers in [1, 60]
    # the client slept what it was told (its own backoff would be 0.375-0.5 s at first)
    by_thread: dict[int, list[Exchange]] = {}
    for ex in rec.exchanges:
        by_thread.setdefault(ex.thread, []).append(ex)
    for attempts in by_thread.values():
        for ex, nxt in zip(attempts, attempts[1:]):
            assert ex.status == 429 and nxt.sent - ex.sent >= int(ex.retry_after) - 0.05
    assert elapsed < 5 * max(waits) + 10, (elapsed, waits)
    assert tiny_server.wait_all_free()  # (d) every page and slot free


def test_without_retries_a_full_queue_is_rate_limit_error(tiny_server) -> None:
    url = tiny_server.url
    rec = Recorder()
    holders_client = rec.client(url, max_retries=0)
    held: list[int | BaseException] = []

    def hold(i: int) -> None:
        try:
            held.append(_ask(holders_client, 100 + i, max_tokens=96))  # ~1 s on a CPU
        except BaseException as e:
            held.append(e)

    holders = [threading.Thread(target=hold, args=(i,)) for i in range(MAX_ACTIVE)]
    for t in holders:
        t.start()
    deadline = time.monotonic() + 30
    while tiny_server.engine.in_flight < MAX_ACTIVE:
        assert time.monotonic() < deadline, "the holders were not admitted"
        time.sleep(0.005)

    probe = Recorder()
    with pytest.raises(openai.RateLimitError) as info:
        _ask(probe.client(url, max_retries=0), 1)
    for t in holders:
        t.join(60)

    err = info.value
    assert err.status_code == 429 and err.code == "queue_full"
    assert err.body["type"] == "rate_limit_error"
    _retry_after_s(err.response.headers.get("retry-after"))
    assert [ex.status for ex in probe.exchanges] == [429]  # one attempt: no retry
    assert held == [96] * MAX_ACTIVE  # the holders ran to the end, untouched
    assert tiny_server.wait_all_free()
