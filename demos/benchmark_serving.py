"""Load-test the OpenAI-compatible server: N concurrent clients, then a request-rate sweep.

Reports per load point: TTFT p50/p99, inter-token latency p50/p99 (gaps between streamed chunks),
output tokens/s and requests/s. Starts its own server in-process (default model unless --model),
or targets a running one with --url.

    python demos/benchmark_serving.py --concurrency 1 4 16 --rates 1 4 --num-requests 32
    python demos/benchmark_serving.py --url http://127.0.0.1:8000 --model-name SmolLM2-135M-Instruct
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass, field

import httpx
import numpy as np

WORDS = "a quick survey of rivers mountains cities and the people who live near them".split()


@dataclass
class Sample:
    ttft_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    tokens: int = 0
    status: int = 0


@dataclass
class Point:
    mode: str
    load: float
    requests: int
    ok: int
    rejected: int
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float
    out_tok_s: float
    req_s: float


def prompt(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


async def one_request(client: httpx.AsyncClient, args, rng: random.Random) -> Sample:
    body = {"model": args.model_name, "prompt": prompt(rng, args.prompt_words),
            "max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
    s = Sample()
    t0 = time.perf_counter()
    last = t0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        s.status = r.status_code
        if r.status_code != 200:
            await r.aread()
            return s
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            now = time.perf_counter()
            if chunk["choices"] and chunk["choices"][0]["text"]:
                if s.ttft_s == 0.0:
                    s.ttft_s = now - t0
                else:
                    s.itl_s.append(now - last)
                last = now
            if chunk.get("usage"):
                s.tokens = chunk["usage"]["completion_tokens"]
    return s


async def closed_loop(client, args, clients: int) -> tuple[list[Sample], float]:
    """`clients` users, each sending its next request when the previous one is done."""
    samples: list[Sample] = []
    per_client = max(1, args.num_requests // clients)

    async def user(k: int) -> None:
        rng = random.Random(k)
        for _ in range(per_client):
            samples.append(await one_request(client, args, rng))

    t0 = time.perf_counter()
    await asyncio.gather(*(user(k) for k in range(clients)))
    return samples, time.perf_counter() - t0


async def open_loop(client, args, rate: float) -> tuple[list[Sample], float]:
    """Poisson arrivals at `rate` requests/s, whatever the server's progress."""
    rng = random.Random(1234)
    tasks = []
    t0 = time.perf_counter()
    for k in range(args.num_requests):
        tasks.append(asyncio.create_task(one_request(client, args, random.Random(k))))
        await asyncio.sleep(rng.expovariate(rate))
    samples = await asyncio.gather(*tasks)
    return list(samples), time.perf_counter() - t0


def summarize(mode: str, load: float, samples: list[Sample], wall: float) -> Point:
    ok = [s for s in samples if s.status == 200]
    ttft = np.array([s.ttft_s for s in ok if s.ttft_s > 0] or [np.nan]) * 1e3
    itl = np.array([g for s in ok for g in s.itl_s] or [np.nan]) * 1e3
    return Point(mode, load, len(samples), len(ok), sum(s.status == 429 for s in samples),
                 float(np.percentile(ttft, 50)), float(np.percentile(ttft, 99)),
                 float(np.percentile(itl, 50)), float(np.percentile(itl, 99)),
                 sum(s.tokens for s in ok) / wall, len(ok) / wall)


async def run(args, url: str) -> list[Point]:
    points = []
    limits = httpx.Limits(max_connections=1000)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        await one_request(client, args, random.Random(0))  # warm-up
        for c in args.concurrency:
            samples, wall = await closed_loop(client, args, c)
            points.append(summarize("clients", c, samples, wall))
            print(fmt(points[-1]), flush=True)
        for rate in args.rates:
            samples, wall = await open_loop(client, args, rate)
            points.append(summarize("req/s", rate, samples, wall))
            print(fmt(points[-1]), flush=True)
    return points


HEADER = (f"{'mode':>8} {'load':>6} {'ok/req':>8} {'429':>4} {'TTFT p50':>9} {'p99':>8} "
          f"{'ITL p50':>8} {'p99':>8} {'out tok/s':>10} {'req/s':>6}")


def fmt(p: Point) -> str:
    return (f"{p.mode:>8} {p.load:>6g} {p.ok:>4}/{p.requests:<3} {p.rejected:>4} "
            f"{p.ttft_p50_ms:>7.0f}ms {p.ttft_p99_ms:>6.0f}ms {p.itl_p50_ms:>6.0f}ms "
            f"{p.itl_p99_ms:>6.0f}ms {p.out_tok_s:>10.1f} {p.req_s:>6.2f}")


def start_server(args) -> tuple[str, object]:
    """Load the model and serve it from a background thread; (url, shutdown callable)."""
    import uvicorn

    import llm
    from llm.engine.async_engine import AsyncEngine
    from llm.engine.scheduler import SchedulerConfig
    from llm.serve import ServerConfig, create_app
    from llm.serve.__main__ import GIL_SWITCH_INTERVAL_S

    model = llm.LLM(args.model, device=args.device, dtype=args.dtype, max_batch=args.max_batch,
                    max_seq_len=args.max_seq_len, progress=False)
    print(model.backend.describe(), file=sys.stderr)
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    engine = AsyncEngine(model, SchedulerConfig(max_queue=args.max_queue,
                                                prefill_chunk=args.prefill_chunk))
    app = create_app(engine, ServerConfig(model_name=args.model_name))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    while not server.started:
        time.sleep(0.05)

    def stop() -> None:
        server.should_exit = True
        engine.shutdown()

    return f"http://127.0.0.1:{sock.getsockname()[1]}", stop


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default=None, help="benchmark a running server instead")
    p.add_argument("--model", default=None, help="model to serve in-process (default: embedded)")
    p.add_argument("--model-name", default="SmolLM2-135M-Instruct")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--max-queue", type=int, default=256)
    p.add_argument("--prefill-chunk", type=int, default=256)
    p.add_argument("--concurrency", type=int, nargs="*", default=[1, 4, 16])
    p.add_argument("--rates", type=float, nargs="*", default=[1.0, 4.0])
    p.add_argument("--num-requests", type=int, default=32, help="requests per load point")
    p.add_argument("--prompt-words", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args()
    url, stop = (args.url, None) if args.url else start_server(args)
    print(f"{args.num_requests} requests per point, ~{args.prompt_words}-word prompts, "
          f"{args.max_tokens} output tokens, greedy\n{HEADER}", flush=True)
    try:
        points = asyncio.run(run(args, url))
    finally:
        if stop is not None:
            stop()
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(pt) for pt in points], f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
