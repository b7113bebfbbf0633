"""Intra-op thread counts for the torch backend on the CPU: the cores this process may use, and a
policy choosing the count for prefill and for decode separately (issue 19).

A decode step at small batch is hundreds of small ops; with several intra-op threads each op pays
an OpenMP hand-off, and spinning workers fight any other busy process for the cores.

Measured 2026-12-03 on the 2-core CI machine (x86-64, torch 2.13 CPU, OpenMP, fp32, the default
model SmolLM2-135M, 16-token prompts then 24 decode steps, medians; /tmp script, not in the repo).
The machine was shared: other sessions kept the load average at 2.5-6 throughout, so "quiet" means
no competing process of ours, "busy" one more `python -c "while True: pass"`. Two quiet runs
(the second in brackets), one busy run:

    decode, ms per step (tok/s per user)   1 thread                2 threads
    batch 1, quiet                          78 (12.8) [65 (15.3)]   472 (2.1) [537 (1.9)]
    batch 2, quiet                          80 (12.6) [100 (10.0)]  555 (1.8) [479 (2.1)]
    batch 4, quiet                         135 (7.4)  [193 (5.2)]   739 (1.4) [603 (1.7)]
    batch 8, quiet                         180 (5.6)  [182 (5.5)]  1004 (1.0) [1032 (1.0)]
    batch 1, busy                          243 (4.1)               1962 (0.5)
    batch 2, busy                          263 (3.8)               1410 (0.7)
    batch 4, busy                          538 (1.9)               2574 (0.4)
    batch 8, busy                          760 (1.3)               5333 (0.2)

    prefill of one prompt, ms              1 thread                2 threads
    128 tokens, quiet                      350 [356]               1385 [921]
    256 tokens, quiet                     1058 [769]               2846 [3637]
    512 tokens, quiet                     2112 [1412]              5956 [3942]
    128 tokens, busy                      1808                     8116
    512 tokens, busy                      5016                    25798

The issue's own numbers (12-13 tok/s at 2 threads on a truly idle machine, 16.6 tok/s at 1 thread
with a busy process) agree for decode at batch 1. Later the same day the machine was truly idle
(load average 0.03) and a second thread did pay off beyond batch 1 (demos/generate.py, --threads 1
vs 2):
batch 1 17.2 vs 15.1 tok/s, batch 4 26.4 vs 43.1 tok/s in total, TTFT 127-194 vs 107-159 ms; and
transformers' two threads beat our one at batch 4 (docs/performance.md, "CPU: beside transformers").
So a fixed count is wrong one way or the other: the default policy (ThreadPolicy.default) looks at
the competition at each call instead. It counts the other processes' runnable tasks (the running
count of /proc/loadavg less this process's own running threads) and uses the free cores, and keeps
decode batches below 4 on one thread when the step is torch ops (from batch 1 the free cores when
the C kernels run it: ThreadPolicy.wide_decode_batch). The earlier fixed defaults, for the record:

- decode: 1 thread, always (up to batch 8 the per-step work is small and the hand-off
  dominates; larger batches and machines were not measured: the `threads` option overrides);
- prefill: 1 thread with at most 2 usable cores (measured above); all usable cores above that,
  where one thread leaves most of the machine idle on a long prompt (not measured here: no such
  machine was available).

Switching costs nothing noticeable: a set/restore pair of torch.set_num_threads takes ~0.4 us, and
batch-1 decode on 1 thread measured 101.4 ms/step with a set-to-1 and restore-to-2 around every
step against 101.8 ms/step with the process already at 1 thread (96 steps each, interleaved). The
backend sets the count only when it differs.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_LOADAVG = Path("/proc/loadavg")
PROC_SELF_TASKS = Path("/proc/self/task")
# Decode batches from this size use more than one thread when cores are free (idle 2-core machine,
# 2026-12-03: batch 4 43.1 tok/s on 2 threads vs 26.4 on 1; batch 1 15.1 vs 17.2).
WIDE_DECODE_BATCH = 4
# How long a reading of the competition stands: each reading opens a /proc file per thread of
# this process (0.15 ms a reading on the 2-core CI machine, 1.5% of a 10 ms decode step; a cached
# one 1.2 us; 2026-12-04), and the load it sees changes over seconds, not steps.
COMPETITION_TTL_S = 0.1


def cgroup_cpu_limit(root: Path = CGROUP_ROOT) -> float | None:
    """CPUs allowed by the cgroup CPU quota (quota / period), or None when unlimited or unknown.

    cgroup v2: `cpu.max` = "QUOTA PERIOD" (QUOTA "max" = no limit); cgroup v1:
    `cpu/cpu.cfs_quota_us` (-1 = no limit) over `cpu/cpu.cfs_period_us` (also read directly
    under `root`, where some containers mount the cpu controller).
    """
    v2 = root / "cpu.max"
    if v2.is_file():
        fields = v2.read_text().split()
        if len(fields) == 2 and fields[0] != "max":
            return _ratio(fields[0], fields[1])
        return None
    for d in (root / "cpu", root / "cpu,cpuacct", root):
        quota, period = d / "cpu.cfs_quota_us", d / "cpu.cfs_period_us"
        if quota.is_file() and period.is_file():
            return _ratio(quota.read_text().strip(), period.read_text().strip())
    return None


def _ratio(quota: str, period: str) -> float | None:
    try:
        q, p = int(quota), int(period)
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None


def usable_cores(root: Path = CGROUP_ROOT) -> int:
    """The cores this process may actually use: the CPU affinity mask, capped by the cgroup CPU
    quota rounded down, at least 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    limit = cgroup_cpu_limit(root)
    if limit is not None:
        cores = min(cores or 1, math.floor(limit))
    return max(1, cores or 1)


def check_threads(value: object) -> int:
    """`value` as an intra-op thread count (an int >= 1); ValueError otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"threads must be an integer >= 1, got {value!r}")
    return value


def competing_tasks(loadavg: Path = PROC_LOADAVG, tasks: Path = PROC_SELF_TASKS) -> int:
    """Runnable tasks of other processes right now: the running count of /proc/loadavg less this
    process's own running threads (its spinning OpenMP workers included); 0 where /proc cannot be
    read."""
    try:
        running = int(loadavg.read_text().split()[3].split("/")[0])
    except (OSError, ValueError, IndexError):
        return 0
    own = 0
    for stat in tasks.glob("*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # the thread ended meanwhile
            continue
        end = text.rfind(")")  # the state follows the command name, which may hold spaces
        own += text[end + 2:end + 3] == "R"
    return max(0, running - own)


@dataclass(frozen=True)
class ThreadPolicy:
    """Intra-op threads for prefill and for decode on the CPU.

    Fixed (`fixed`, the `threads` option): `prefill` / `decode` threads always. Adaptive (the
    default): per call, as many threads as cores are free of other processes' runnable tasks (at
    most `prefill` / `decode`), and one thread for decode batches below `wide_decode_batch`
    (WIDE_DECODE_BATCH for a step of torch ops; 1 when the C kernels run the step, whose few
    calls each have work for every thread: see quant/native.py).
    """

    prefill: int
    decode: int
    adaptive: bool = False
    wide_decode_batch: int = WIDE_DECODE_BATCH
    _seen: dict = field(default_factory=dict, compare=False, repr=False)  # see _competition

    def __post_init__(self) -> None:
        check_threads(self.prefill)
        check_threads(self.decode)

    @classmethod
    def default(cls, cores: int | None = None,
                wide_decode_batch: int = WIDE_DECODE_BATCH) -> ThreadPolicy:
        """The adaptive policy (module docstring) over `cores` usable cores (None: this
        process's)."""
        cores = usable_cores() if cores is None else cores
        return cls(prefill=cores, decode=cores, adaptive=cores > 1,
                   wide_decode_batch=wide_decode_batch)

    @classmethod
    def fixed(cls, threads: int) -> ThreadPolicy:
        """`threads` for both (the backend option `threads`)."""
        return cls(prefill=threads, decode=threads)

    def count(self, phase: str, batch: int = 1) -> int:
        """Threads for one `phase` ("prefill" or "decode") call of `batch` users."""
        most = self.prefill if phase == "prefill" else self.decode
        if not self.adaptive:
            return most
        if phase == "decode" and batch < self.wide_decode_batch:
            return 1
        return max(1, min(most, most - self._competition()))

    def _competition(self) -> int:
        """competing_tasks(), read again only when the last reading is older than
        COMPETITION_TTL_S."""
        now = time.monotonic()
        last = self._seen.get("reading")
        if last is None or now - last[0] > COMPETITION_TTL_S:
            last = self._seen["reading"] = (now, competing_tasks())
        return last[1]

    def describe(self) -> str:
        if self.adaptive:
            narrow = (f"; decode batches < {self.wide_decode_batch} on 1"
                      if self.wide_decode_batch > 1 else "")
            return (f"up to {max(self.prefill, self.decode)} CPU threads (fewer while other "
                    f"processes run{narrow})")
        if self.prefill == self.decode:
            return f"{self.decode} CPU thread{'s' if self.decode > 1 else ''}"
        return f"CPU threads: prefill {self.prefill}, decode {self.decode}"


@contextmanager
def intra_op_threads(n: int) -> Iterator[None]:
    """Run the block with torch's intra-op thread count at `n`, restored after; sets it only when
    it differs."""
    before = torch.get_num_threads()
    if before == n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
