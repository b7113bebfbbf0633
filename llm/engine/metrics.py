"""Serving metrics: counters, latency histograms and a token-rate window, rendered in the
Prometheus text exposition format (version 0.0.4).

The Scheduler records into a `ServingMetrics` from the engine thread; the server renders it from
the event loop, so every update and the rendering hold one lock. Gauges that are state of the
scheduler (queue depth, active slots) are read through callables at render time.
"""

from __future__ import annotations

import bisect
import math
import threading
import time
from collections import deque
from collections.abc import Callable

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
RATE_WINDOW_S = 10.0
MAX_RETRY_AFTER_S = 60  # openai-python honours a Retry-After up to 60 s (1.x; 3.x: 120 s)
BUSY_BUCKET_S = 0.125  # the drain rate counts time in slices of this holding a generated token


class Histogram:
    """A cumulative-bucket histogram (Prometheus semantics: `le` upper bounds plus +Inf)."""

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS_S) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # last: above every bound
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def render(self, name: str) -> list[str]:
        lines, running = [], 0
        for bound, n in zip(self.bounds, self.counts):
            running += n
            lines.append(f'{name}_bucket{{le="{bound}"}} {running}')
        lines.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        lines.append(f"{name}_sum {self.sum:.6f}")
        lines.append(f"{name}_count {self.count}")
        return lines


class ServingMetrics:
    """Everything `/metrics` reports; the update methods are called by the Scheduler."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self.ttft = Histogram()
        self.itl = Histogram()
        self.prompt_tokens = 0
        self.cached_prompt_tokens = 0
        self.generation_tokens = 0
        self.finished: dict[str, int] = {}
        self.rejected = 0
        self._recent: deque[float] = deque()  # times of recent generated tokens
        self._finished_at: deque[float] = deque()  # ... of recently finished requests
        self._promised: list[float] = []  # when the refused clients were told to come back
        self._busy: deque[int] = deque()  # BUSY_BUCKET_S slices of time with a token generated
        self.gauges: dict[str, tuple[str, Callable[[], float]]] = {}

    def add_gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        """Report `read()` as gauge `name` at every render."""
        self.gauges[name] = (help_text, read)

    def on_prompt(self, num_tokens: int, cached_tokens: int = 0) -> None:
        """A request admitted with a prompt of num_tokens, cached_tokens of them served by the
        prefix cache."""
        with self._lock:
            self.prompt_tokens += num_tokens
            self.cached_prompt_tokens += cached_tokens

    def prefix_cache_hit_rate(self) -> float:
        """Prompt tokens served by the prefix cache / prompt tokens admitted (0 before any)."""
        with self._lock:
            return self.cached_prompt_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    def on_token(self, latency_s: float | None, first: bool) -> None:
        """A generated token; latency_s is the TTFT (first) or the gap since the previous one
        (None: counted, not observed, e.g. the first token of a request's second sequence)."""
        with self._lock:
            if latency_s is not None:
                (self.ttft if first else self.itl).observe(latency_s)
            self.generation_tokens += 1
            now = self._clock()
            self._recent.append(now)
            bucket = int(now // BUSY_BUCKET_S)
            if not self._busy or self._busy[-1] != bucket:
                self._busy.append(bucket)
            self._trim(now)

    def on_finish(self, reason: str) -> None:
        with self._lock:
            self.finished[reason] = self.finished.get(reason, 0) + 1
            self._finished_at.append(self._clock())

    def on_reject(self) -> None:
        with self._lock:
            self.rejected += 1

    def retry_after_s(self, fallback_s: int) -> int:
        """Seconds a client refused just now should wait, and that promise recorded: with r
        requests finished per second of busy time over the last RATE_WINDOW_S (time while no
        token was generated does not count: BUSY_BUCKET_S slices holding a token) and k refused
        clients still waiting for the time they were told, ceil((k + 1) / r), between 1 and
        MAX_RETRY_AFTER_S; `fallback_s` while nothing finished in the window (no rate)."""
        with self._lock:
            now = self._clock()
            self._trim(now)
            self._promised = [t for t in self._promised if t > now]
            busy_s = len(self._busy) * BUSY_BUCKET_S
            if not self._finished_at or not busy_s:
                wait = fallback_s
            else:
                rate = len(self._finished_at) / busy_s
                wait = min(MAX_RETRY_AFTER_S,
                           max(1, math.ceil((len(self._promised) + 1) / rate)))
            self._promised.append(now + wait)
            return wait

    def tokens_per_second(self) -> float:
        """Generated tokens per second over the last RATE_WINDOW_S seconds."""
        with self._lock:
            self._trim(self._clock())
            return len(self._recent) / RATE_WINDOW_S

    def _trim(self, now: float) -> None:
        for times in (self._recent, self._finished_at):
            while times and times[0] < now - RATE_WINDOW_S:
                times.popleft()
        while self._busy and self._busy[0] < (now - RATE_WINDOW_S) // BUSY_BUCKET_S:
            self._busy.popleft()

    def render(self) -> str:
        """The Prometheus text format of every metric."""
        rate = self.tokens_per_second()
        hit_rate = self.prefix_cache_hit_rate()
        out: list[str] = []

        def metric(name: str, kind: str, help_text: str, lines: list[str]) -> None:
            out.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *lines])

        for name, (help_text, read) in self.gauges.items():
            metric(name, "gauge", help_text, [f"{name} {read()}"])
        with self._lock:
            metric("llm_generation_tokens_per_second", "gauge",
                   f"Generated tokens per second over the last {RATE_WINDOW_S:g} s",
                   [f"llm_generation_tokens_per_second {rate:.3f}"])
            metric("llm_prompt_tokens_total", "counter", "Prompt tokens admitted",
                   [f"llm_prompt_tokens_total {self.prompt_tokens}"])
            metric("llm_prefix_cache_hit_tokens_total", "counter",
                   "Prompt tokens whose KV came from the prefix cache",
                   [f"llm_prefix_cache_hit_tokens_total {self.cached_prompt_tokens}"])
            metric("llm_prefix_cache_hit_rate", "gauge",
                   "Prompt tokens served by the prefix cache / prompt tokens admitted",
                   [f"llm_prefix_cache_hit_rate {hit_rate:.6f}"])
            metric("llm_generation_tokens_total", "counter", "Tokens generated",
                   [f"llm_generation_tokens_total {self.generation_tokens}"])
            metric("llm_requests_finished_total", "counter", "Requests finished, by reason",
                   [f'llm_requests_finished_total{{reason="{r}"}} {n}'
                    for r, n in sorted(self.finished.items())])
            metric("llm_requests_rejected_total", "counter", "Requests refused: queue full",
                   [f"llm_requests_rejected_total {self.rejected}"])
            metric("llm_time_to_first_token_seconds", "histogram",
                   "Time from arrival to the first generated token",
                   self.ttft.render("llm_time_to_first_token_seconds"))
            metric("llm_inter_token_latency_seconds", "histogram",
                   "Time between consecutive generated tokens of a request",
                   self.itl.render("llm_inter_token_latency_seconds"))
        return "\n".join(out) + "\n"
