"""AsyncEngine: the continuous-batching Scheduler for asyncio applications.

Every backend call runs on one engine thread (backends are not thread-safe); the asyncio side only
validates and enqueues requests and cancellations, and reads events. `submit` returns at once with
a `RequestStream` (an async iterator of StreamEvent) or raises: RequestError for a bad request,
QueueFullError when the configured queue is full, EngineClosedError after `shutdown`.

    engine = AsyncEngine(llm.LLM(), SchedulerConfig(max_queue=64))
    stream = engine.submit(engine.tokenizer.encode("Once upon a time"), SamplingParams())
    async for ev in stream:
        print(ev.text, end="")
    engine.shutdown()

The AsyncEngine drives the LLM's one scheduler (`LLM.core`) from its construction until `shutdown`;
meanwhile the LLM's own generate/stream are refused with EngineBusyError (and an AsyncEngine cannot
start while they run).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from typing import Protocol

from llm.engine.contract.sampling_params import SamplingParams
from llm.engine.core import EngineCore
from llm.engine.metrics import ServingMetrics
from llm.engine.scheduler import QueueFullError, Scheduler, SchedulerConfig
from llm.engine.sequence import RequestOutput, Sequence, StreamEvent


class _HasCore(Protocol):
    """What the AsyncEngine drives: an `llm.LLM` (or anything holding an EngineCore as `core`)."""

    core: EngineCore


_log = logging.getLogger(__name__)
# The longest the engine thread waits, after a step's prefill, for the event loops to stream the
# first tokens it just produced before it starts the decode step (see _hand_over), and the
# longest `submit` waits for an idle engine thread to launch a request's first prefill chunk.
HAND_OVER_S = 0.002


class EngineClosedError(RuntimeError):
    """The engine was shut down (or its thread died) and takes no more requests."""


class RequestStream:
    """The events of one submitted request; iterate it, or await `result()`. `cancel()` frees its
    slot and pages; the stream then ends with a final event whose finish_reason is "cancelled".
    """

    def __init__(self, engine: AsyncEngine, seq: Sequence) -> None:
        self._engine = engine
        self.seq = seq
        self.request_id = seq.index
        self.prompt_tokens = seq.prompt_len
        self._queue: asyncio.Queue[StreamEvent | BaseException] = asyncio.Queue()
        self._done = False
        self._output: RequestOutput | None = None  # the final event's, once read

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> StreamEvent:
        if self._done:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self._done = True
            raise item
        self._done = item.finished
        if item.finished:
            self._output = item.output
        return item

    async def result(self) -> RequestOutput:
        """Wait for the end of the request; its RequestOutput (also after the events were
        iterated)."""
        if self._output is not None:
            return self._output
        async for ev in self:
            if ev.finished:
                assert ev.output is not None
                return ev.output
        raise EngineClosedError("the request ended without a result")

    def cancel(self) -> None:
        """Ask the engine to drop this request (no-op once its final event was read)."""
        if not self._done:
            self._engine._post(("cancel", self))


class AsyncEngine:
    """The asynchronous front of an LLM's EngineCore: its one Scheduler, stepped by a dedicated
    thread (see module docstring). It claims the core until `shutdown`."""

    def __init__(self, model: _HasCore, config: SchedulerConfig | None = None,
                 metrics: ServingMetrics | None = None) -> None:
        self.model = model
        self.core = model.core
        self.tokenizer = self.core.tokenizer
        self.metrics = metrics if metrics is not None else ServingMetrics()
        self.core.claim(self, "an AsyncEngine")  # EngineBusyError while a generate/stream runs
        try:
            self._previous = self.core.configure(config or SchedulerConfig(), self.metrics)
        except BaseException:
            self.core.release(self)
            raise
        self.scheduler = self.core.scheduler
        self.max_seq_len = self.scheduler.max_seq_len
        self.metrics.add_gauge("llm_queue_depth", "Requests waiting for a slot",
                               lambda: len(self.scheduler.waiting))
        self.metrics.add_gauge("llm_active_slots", "Batch slots running a request",
                               lambda: len(self.scheduler.active))
        alloc = self.scheduler.pages.allocator
        self.metrics.add_gauge("llm_kv_pages_free",
                               "KV-cache pages free (including cached pages no request holds)",
                               lambda: alloc.num_free)
        self.metrics.add_gauge("llm_prefix_cache_pages",
                               "KV-cache pages holding a cached prompt prefix",
                               lambda: alloc.num_cached)
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._idle = False  # the engine thread waits for work (set and cleared by it)
        # set by the engine thread once a step's first prefill chunk is launched, or the step
        # ended without one (what `submit` to an idle engine waits for)
        self._launched = threading.Event()
        self._inbox: list[tuple[str, RequestStream]] = []
        self._streams: dict[int, tuple[RequestStream, asyncio.AbstractEventLoop]] = {}
        self._in_flight = 0
        self._closed = False
        self._released = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="llm-engine", daemon=True)
        self._thread.start()

    @property
    def in_flight(self) -> int:
        """Requests submitted and not yet finished."""
        return self._in_flight

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> RequestStream:
        """Validate and queue one request (call from a running event loop). Where the engine
        thread was idle and the backend computes off this host's cores, it waits (at most
        HAND_OVER_S, the GIL released) until the engine has launched the request's first prefill
        chunk on the device (the backend's `launched`), or finished its step without one: the
        engine's admission and launch then run without the event loop's work beside them, and
        the loop's work (the response's setup) runs while the device computes."""
        return self.submit_all([(prompt_ids, params)])[0]

    def submit_all(self, requests: list[tuple[list[int], SamplingParams]],
                   labels: list[str] | None = None) -> list[RequestStream]:
        """Validate every request, then queue them all or none (call from a running event loop):
        a request that fails validation (its error begins with its `labels` entry, e.g.
        "prompt[1]") or room for fewer than all of them in flight (QueueFullError) queues none.
        The hand-over wait of `submit` as for one request."""
        loop = asyncio.get_running_loop()
        seqs = [self.scheduler.make_sequence(next(self._ids), ids, params,
                                             labels[i] if labels else None)
                for i, (ids, params) in enumerate(requests)]
        streams = [RequestStream(self, seq) for seq in seqs]
        with self._lock:
            if self._closed:
                raise EngineClosedError("the engine is shut down")
            cap = self.scheduler.capacity
            if cap is not None and self._in_flight + len(streams) > cap:
                self.metrics.on_reject()
                raise QueueFullError(
                    f"the server is at capacity ({self._in_flight} requests in flight, limit "
                    f"{cap}); retry later")
            self._in_flight += len(streams)
            for stream in streams:
                self._streams[stream.seq.index] = (stream, loop)
                self._inbox.append(("add", stream))
            idle = self._idle and not self.core.backend.host_compute
            if idle:
                self._launched.clear()
        self._wake.set()
        if idle:
            self._launched.wait(HAND_OVER_S)
        return streams

    def _post(self, command: tuple[str, RequestStream]) -> None:
        with self._lock:
            self._inbox.append(command)
        self._wake.set()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Cancel everything in flight, stop the engine thread and hand the model back to its
        synchronous front (its own scheduler limits restored).
        """
        with self._lock:
            self._closed = True
            released, self._released = self._released, True
        self._wake.set()
        self._thread.join(timeout)
        if released or self._thread.is_alive():
            return
        if not self.scheduler.has_work:
            self.core.configure(*self._previous)
        self.core.release(self)

    def _run(self) -> None:
        sched = self.scheduler
        try:
            while True:
                self._wake.clear()
                with self._lock:
                    commands, self._inbox = self._inbox, []
                    closed = self._closed
                    self._idle = False
                for kind, stream in commands:
                    if kind == "add" and not closed:
                        try:
                            sched.add(stream.seq)
                        except QueueFullError as exc:  # submit counts the same: a guard
                            self._deliver(stream.seq.index, exc)
                    elif kind == "cancel":
                        for event in _cancel(sched, stream.seq):
                            self._deliver(event)
                if closed:
                    self._launched.set()
                    for stream, _ in list(self._streams.values()):
                        for event in _cancel(sched, stream.seq):
                            self._deliver(event)
                    return
                if sched.has_work:
                    for phase, events in enumerate(sched.step_phases(self._launched.set)):
                        if phase == 0:  # no chunk launched (no prefill this step): done too
                            self._launched.set()
                        loops = {self._deliver(ev) for ev in events} - {None}
                        if phase == 0 and loops and _only_new(sched):  # first tokens go out
                            _hand_over(loops, HAND_OVER_S)  # before the decode step
                else:
                    with self._lock:  # (set under the lock: a submit clears it after)
                        self._idle = not self._inbox
                        self._launched.set()
                    self._wake.wait()
        except BaseException as exc:  # a backend failure: fail every request, free every page
            self.error = exc
            with self._lock:
                self._closed = True
            self._launched.set()
            for stream, _ in list(self._streams.values()):
                with contextlib.suppress(Exception):  # free what can be freed
                    sched.cancel(stream.seq)
                self._deliver(stream.seq.index, EngineClosedError(f"engine failed: {exc!r:.500}"))
            _log.exception("engine thread failed; every request was failed and the engine closed")

    def _deliver(self, event: StreamEvent | int | None,
                 error: BaseException | None = None) -> asyncio.AbstractEventLoop | None:
        """Hand an event (or an error for request id `event`) to its stream's event loop; that
        loop, or None where nobody listens."""
        if event is None:
            return None
        index = event if isinstance(event, int) else event.index
        finished = error is not None or (isinstance(event, StreamEvent) and event.finished)
        with self._lock:
            entry = self._streams.get(index)
            if entry is not None and finished:
                del self._streams[index]
                self._in_flight -= 1
        if entry is None:
            return None
        stream, loop = entry
        try:
            loop.call_soon_threadsafe(stream._queue.put_nowait, error or event)
        except RuntimeError:  # the submitting loop is closed: nobody is listening any more
            return None
        return loop


def _only_new(sched: Scheduler) -> bool:
    """Whether no running sequence has more than its first token: then streaming the first
    tokens before the decode step delays no other stream's next token (under load the engine
    does not wait: the decode step of the others goes first)."""
    return all(len(s.out.token_ids) <= 1 for s in sched.active.values())


def _hand_over(loops: set[asyncio.AbstractEventLoop], timeout_s: float) -> None:
    """Wait (the GIL released) until each of `loops` has run the callbacks posted to it so far
    and the tasks they woke, at most `timeout_s` in all. The engine thread calls it between a
    step's prefill and its decode step: the decode step's host work would otherwise hold the
    interpreter lock while the loop waits to stream the first tokens (up to the switch
    interval)."""
    deadline = time.monotonic() + timeout_s
    for loop in loops:
        done = threading.Event()
        try:  # one iteration for the deliveries, the next for the tasks they woke
            loop.call_soon_threadsafe(loop.call_soon, done.set)
        except RuntimeError:  # closed meanwhile
            continue
        if not done.wait(max(0.0, deadline - time.monotonic())):
            return


def _cancel(sched: Scheduler, seq: Sequence) -> list[StreamEvent]:
    """Cancel `seq` wherever it is (scheduler or not yet added); the final events for its stream
    (one per sequence of the request still running; the last ends the stream)."""
    events = sched.cancel(seq)
    if events:
        return events
    if not seq.finished:  # submitted but never handed to the scheduler
        return seq.cancel()
    return [StreamEvent(seq.index, "", True, seq.out)]  # already finished: a no-op for its stream
