"""Where a served request's time to first token goes: a timeline of one request at a time.

Serves a model in-process as `demos/benchmark_serving.py --shared-prefix` does (the same
server, the same prompts: --prefix-tokens shared + --suffix-tokens own token ids), sends the
requests one after another from a spawned client process, and stamps, on the host clock
(CLOCK_MONOTONIC, shared by the two processes), when each request passes the server's phases:

  handler      the route's handler starts (after uvicorn read and parsed the headers)
  submit       the request is parsed and handed to the AsyncEngine
  admit        the engine thread's next admission pass starts
  prefill      the backend's prefill_step starts / returns (the request's last chunk)
  stage        the prefill graphs' staging of the chunk (torch backend on CUDA)
  replayed     the graph replay is enqueued
  select       the first token's selection starts (sampling tensors, sample, host copy)
  deliver      the engine thread hands the first token to the event loop
  sse          the first token's chunk is written to the response
  client       the client has parsed the first token's chunk

Printed: each phase's median offset from the client's send (ms) over the requests after the
first, for the server with the prefix cache and without it; with CUDA, also the GPU time of the
request's prefill graph calls (CUDA events around `PrefillGraphs.run`).

    python bench/serving_timeline.py --random 1b --device cuda --dtype bfloat16
    python bench/serving_timeline.py --smoke   # CPU, a tiny random model
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import functools
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from demos import benchmark_serving as bs  # noqa: E402

PHASES = ("handler", "submit", "admit", "prefill", "stage", "replayed", "select", "deliver",
          "sse", "prefill_end", "client")


class Marks:
    """(label, time) stamps of the server's phases, appended from any thread."""

    def __init__(self) -> None:
        self.items: list[tuple[str, float]] = []

    def wrap(self, owner: object, name: str, label: str, after: str | None = None) -> None:
        """Stamp `label` when owner.name is called (and `after` when it returns)."""
        fn = getattr(owner, name)
        items = self.items
        if asyncio.iscoroutinefunction(fn):
            @functools.wraps(fn)
            async def awrapped(*a, **k):
                items.append((label, time.perf_counter()))
                return await fn(*a, **k)
            setattr(owner, name, awrapped)
            return

        @functools.wraps(fn)
        def wrapped(*a, **k):
            items.append((label, time.perf_counter()))
            out = fn(*a, **k)
            if after is not None:
                items.append((after, time.perf_counter()))
            return out
        setattr(owner, name, wrapped)


def instrument(marks: Marks, gpu: list) -> None:
    """Stamp the server's phases (class attributes: every instance made afterwards)."""
    from llm.engine.async_engine import AsyncEngine
    from llm.engine.scheduler import Scheduler
    from llm.serve import app, streaming

    marks.wrap(app._Handlers, "completions", "handler")
    marks.wrap(AsyncEngine, "submit_all", "submit")
    marks.wrap(Scheduler, "_admit", "admit")
    marks.wrap(AsyncEngine, "_deliver", "deliver")
    send_items = marks.items
    call = streaming.EventStreamResponse.__call__

    async def stamped_call(self, scope, receive, send):
        async def stamped_send(message):
            if message.get("type") == "http.response.body" and message.get("body"):
                send_items.append(("sse", time.perf_counter()))
            await send(message)
        await call(self, scope, receive, stamped_send)
    streaming.EventStreamResponse.__call__ = stamped_call
    try:
        import torch

        from llm.backends.torch import runner
        from llm.backends.torch.prefill_graphs import PrefillGraphs
    except ImportError:
        return
    marks.wrap(runner.TorchBackend, "prefill_step", "prefill", after="prefill_end")
    marks.wrap(runner.TorchBackend, "_select", "select")
    marks.wrap(PrefillGraphs, "_stage", "stage", after="replayed")
    run = PrefillGraphs.run

    def timed_run(self, *a, **k):
        if not torch.cuda.is_available():
            return run(self, *a, **k)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = run(self, *a, **k)
        end.record()
        gpu.append((time.perf_counter(), start, end))
        return out
    PrefillGraphs.run = timed_run


async def requests(args, url: str, prompts: list[list[int]]) -> list[tuple[float, float]]:
    """Send `prompts` one after another, streamed; (send time, first token time) of each."""
    times = []
    async with bs.CLIENTS[args.client](url) as client:
        for p in prompts:
            s = await bs.one_request(client, args, p)
            times.append((s.t_send, s.t_send + s.ttft_s))
    return times


def request_of(t: float, sends: list[tuple[float, float]]) -> int:
    """The request a host-clock time `t` belongs to: the last one sent at or before it (-1:
    before the first)."""
    return bisect.bisect_right([t0 for t0, _ in sends], t) - 1


def timeline(marks: list[tuple[str, float]], sends: list[tuple[float, float]]) -> list[dict]:
    """Per request: each phase's first stamp after its send, as ms from the send."""
    rows: list[dict[str, float]] = [{"client": (t1 - t0) * 1e3} for t0, t1 in sends]
    for label, t in marks:
        i = request_of(t, sends)
        if i >= 0 and label not in rows[i]:
            rows[i][label] = (t - sends[i][0]) * 1e3
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--random", default="1b", choices=["1b", "8b"])
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--num-requests", type=int, default=24)
    p.add_argument("--prefix-tokens", type=int, default=None,
                   help="shared prompt tokens (default 1,536; 512 with --smoke)")
    p.add_argument("--suffix-tokens", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--prefill-chunk", type=int, default=256)
    p.add_argument("--max-batch", type=int, default=4,
                   help="the engine's slots (demos/benchmark_serving.py's default is 16)")
    p.add_argument("--client", default="httpx", choices=sorted(bs.CLIENTS))
    p.add_argument("--cache", default="both", choices=["on", "off", "both"],
                   help="serve with the prefix cache, without it, or both in turn")
    p.add_argument("--switch-interval", type=float, default=None,
                   help="the server's GIL switch interval in seconds (default: llm.serve's)")
    p.add_argument("--smoke", action="store_true", help="CPU, a tiny random model, short prompts")
    args = p.parse_args()
    import torch

    import demos.benchmark as db
    from bench.common import SHAPES

    if args.smoke:
        db.SHAPES["1b"] = SHAPES["tiny"]
        args.random, args.device, args.dtype = "1b", "cpu", "float32"
    if args.prefix_tokens is None:
        args.prefix_tokens = 512 if args.smoke else 1536
    defaults = dict(model=None, model_name="m", max_queue=64,
                    max_seq_len=args.prefix_tokens + args.suffix_tokens + args.max_tokens,
                    concurrency=[1], clients_in_process=False)
    for k, v in defaults.items():
        setattr(args, k, v)
    marks, gpu = Marks(), []
    instrument(marks, gpu)
    model = bs.load_model(args)
    print(model.describe, flush=True)
    rng = random.Random(0)
    prefix = [rng.randrange(10, 32000 if not args.smoke else 500)
              for _ in range(args.prefix_tokens)]
    for cache in {"on": (True,), "off": (False,), "both": (True, False)}[args.cache]:
        marks.items.clear()
        gpu.clear()
        prompts = [prefix + [rng.randrange(10, 500) for _ in range(args.suffix_tokens)]
                   for _ in range(args.num_requests)]
        url, stop = bs.start_server(args, model, prefix_cache=cache)
        if args.switch_interval is not None:
            sys.setswitchinterval(args.switch_interval)
        try:
            sends = bs.run_clients(requests, args, url, prompts)
        finally:
            stop()
        rows = timeline(marks.items, sends)[1:]  # the first computes the prefix
        print(f"\nprefix cache {'on' if cache else 'off'}: median ms from the client's send "
              f"({len(rows)} requests)")
        for label in PHASES:
            vals = [r[label] for r in rows if label in r]
            if vals:
                print(f"  {label:<12} {statistics.median(vals):8.2f}   "
                      f"(min {min(vals):.2f}, max {max(vals):.2f})")
        if gpu:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            per_request: dict[int, float] = {}
            for t, start, end in gpu:
                i = request_of(t, sends)
                per_request[i] = per_request.get(i, 0.0) + start.elapsed_time(end)
            vals = [v for i, v in per_request.items() if i > 0]
            if vals:
                print(f"  prefill GPU (CUDA events, all chunks) {statistics.median(vals):.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
