"""EngineCore: one backend, its KV page table and the one Scheduler that runs requests on them.

Both fronts drive this one scheduler: the synchronous `Generator` (generate / stream) and the
asyncio `AsyncEngine` (the server). Backends are not thread-safe, so one front at a time may drive
it: a front claims the core while it runs, and the other front is refused with EngineBusyError
instead of sharing the page pool behind its back.
"""

from __future__ import annotations

import threading

from llm.engine.contract.backend import Backend
from llm.engine.metrics import ServingMetrics
from llm.engine.paged_kv import PageTable, PageTableSpec
from llm.engine.scheduler import Scheduler, SchedulerConfig
from llm.model.tokenizer.tokenizer import Tokenizer


class EngineBusyError(RuntimeError):
    """The other front (synchronous or asynchronous) is driving this engine."""


class EngineCore:
    """Owns the page table and the Scheduler of one backend (see module docstring)."""

    def __init__(self, backend: Backend, tokenizer: Tokenizer,
                 config: SchedulerConfig | None = None) -> None:
        self.backend = backend
        self.tokenizer = tokenizer
        rt = backend.runtime
        self.pages = PageTable(
            PageTableSpec(rt.total_blocks, rt.block_size, rt.blocks_per_seq), rt.max_batch)
        self.scheduler = Scheduler(backend, tokenizer, self.pages, config)
        self._lock = threading.Lock()
        self._holder: tuple[object, str] | None = None  # (front, its name in errors)

    def claim(self, front: object, name: str) -> None:
        """Let `front` (named `name` in errors) drive the scheduler; EngineBusyError while any
        claim is held, the same front's too (a second generate/stream while a stream is open
        would step the other's requests and take their events)."""
        with self._lock:
            self._refuse_if_held(name, front)
            self._holder = (front, name)

    def check_idle(self, name: str, but: object = None) -> None:
        """EngineBusyError (naming `name`, what wants the engine) while a front other than `but`
        holds it."""
        with self._lock:
            if self._holder is not None and self._holder[0] is not but:
                self._refuse_if_held(name)

    def _refuse_if_held(self, name: str, front: object = None) -> None:
        """EngineBusyError while a claim is held (`front`: the one asking, "another" if it is
        the holder itself); call with the lock held."""
        if self._holder is None:
            return
        same = "another " if self._holder[0] is front else ""
        raise EngineBusyError(
            f"{same}{self._holder[1]} is driving this model; {name} must wait until it "
            "finishes (a stream until it is exhausted or closed, an AsyncEngine until its "
            "shutdown())")

    def release(self, front: object) -> None:
        """End the claim of `front`."""
        with self._lock:
            if self._holder is None or self._holder[0] is not front:
                raise RuntimeError("this front holds no claim on the engine")
            self._holder = None

    def configure(self, config: SchedulerConfig,
                  metrics: ServingMetrics | None = None) -> tuple[SchedulerConfig,
                                                                    ServingMetrics | None]:
        """Set the scheduler's limits and metrics (only while it holds no request); returns the
        previous ones, so a front can restore them when it lets go.
        """
        return self.scheduler.configure(config, metrics)
