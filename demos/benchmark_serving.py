"""Load-test the OpenAI-compatible server: N concurrent clients, then a request-rate sweep.

Reports per load point: TTFT p50/p99, inter-token latency p50/p99 (gaps between streamed chunks),
output tokens/s and requests/s. Starts its own server in-process (default model unless --model;
--random 1b: random weights of Llama-3.2-1B's shapes, prompts and outputs as token ids), or
targets a running one with --url. The clients run in a child process, as real clients do in
their own (--clients-in-process: in the server's, where they share its interpreter lock and
added ~1.5 ms to each TTFT measured on a CPU).

--shared-prefix measures the prefix cache instead: every request is one long prefix (a system
prompt of --prefix-tokens token ids) plus its own --suffix-tokens; the first request computes
the prefix, the others can find it cached. In-process, it runs twice, on a server with the cache
and on one without (--url: the running server only), and reports the hit rate (/metrics) and the
TTFT of the first request and p50/p99 of the others.

    python demos/benchmark_serving.py --concurrency 1 4 16 --rates 1 4 --num-requests 32
    python demos/benchmark_serving.py --url http://127.0.0.1:8000 --model-name SmolLM2-135M-Instruct
    python demos/benchmark_serving.py --shared-prefix --prefix-tokens 512 --num-requests 8  # CPU
    python demos/benchmark_serving.py --shared-prefix --random 1b --device cuda --dtype bfloat16
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
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

WORDS = "a quick survey of rivers mountains cities and the people who live near them".split()


@dataclass
class Sample:
    t_send: float = 0.0  # host clock (time.perf_counter) when the request was sent
    ttft_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    tokens: int = 0
    status: int = 0
    t_last: float = 0.0

    def on_line(self, line: str) -> None:
        """One line of the streamed response, read now."""
        if not line.startswith("data: {"):
            return
        chunk = json.loads(line[6:])
        now = time.perf_counter()
        if chunk["choices"] and chunk["choices"][0]["text"]:
            if self.ttft_s == 0.0:
                self.ttft_s = now - self.t_send
            else:
                self.itl_s.append(now - self.t_last)
            self.t_last = now
        if chunk.get("usage"):
            self.tokens = chunk["usage"]["completion_tokens"]


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


class HttpxClient:
    """The clients' HTTP over httpx (the library of the official openai client)."""

    def __init__(self, url: str) -> None:
        self._c = httpx.AsyncClient(base_url=url, timeout=600,
                                    limits=httpx.Limits(max_connections=1000))

    async def __aenter__(self) -> HttpxClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self._c.aclose()

    async def stream(self, path: str, body: dict, on_line) -> int:
        """POST `body` as JSON; each line of the response to `on_line`; the status."""
        async with self._c.stream("POST", path, json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return r.status_code
            async for line in r.aiter_lines():
                on_line(line)
        return 200

    async def text(self, path: str) -> str:
        return (await self._c.get(path)).text


class AiohttpClient:
    """The clients' HTTP over aiohttp (what vLLM's serving benchmark uses; less client time per
    request than httpx)."""

    def __init__(self, url: str) -> None:
        import aiohttp

        self._s = aiohttp.ClientSession(url, timeout=aiohttp.ClientTimeout(total=600),
                                        connector=aiohttp.TCPConnector(limit=1000))

    async def __aenter__(self) -> AiohttpClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self._s.close()

    async def stream(self, path: str, body: dict, on_line) -> int:
        """POST `body` as JSON; each line of the response to `on_line`; the status."""
        async with self._s.post(path, json=body) as r:
            if r.status != 200:
                await r.read()
                return r.status
            async for raw in r.content:
                on_line(raw.decode().rstrip("\r\n"))
        return 200

    async def text(self, path: str) -> str:
        async with self._s.get(path) as r:
            return await r.text()


CLIENTS = {"httpx": HttpxClient, "aiohttp": AiohttpClient}


def run_clients(fn, args, url: str, *extra):
    """asyncio.run(fn(args, url, *extra)) in this process, or by default in a spawned child
    process (its result pickled back)."""
    if args.clients_in_process:
        return _client_main(fn, args, url, *extra)
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_client_main, (fn, args, url, *extra))


def _client_main(fn, args, url: str, *extra):
    return asyncio.run(fn(args, url, *extra))


def prompt(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


async def one_request(client, args, text: str | list[int]) -> Sample:
    """One streamed greedy completion of `text` (a string or token ids) through `client` (one of
    CLIENTS)."""
    body = {"model": args.model_name, "prompt": text,
            "max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}  # the token count, in a last chunk
    s = Sample()
    s.t_send = time.perf_counter()
    s.status = await client.stream("/v1/completions", body, s.on_line)
    return s


async def closed_loop(client, args, clients: int) -> tuple[list[Sample], float]:
    """`clients` users, each sending its next request when the previous one is done."""
    samples: list[Sample] = []
    per_client = max(1, args.num_requests // clients)

    async def user(k: int) -> None:
        rng = random.Random(k)
        for _ in range(per_client):
            samples.append(await one_request(client, args, prompt(rng, args.prompt_words)))

    t0 = time.perf_counter()
    await asyncio.gather(*(user(k) for k in range(clients)))
    return samples, time.perf_counter() - t0


async def open_loop(client, args, rate: float) -> tuple[list[Sample], float]:
    """Poisson arrivals at `rate` requests/s, whatever the server's progress."""
    rng = random.Random(1234)
    tasks = []
    t0 = time.perf_counter()
    for k in range(args.num_requests):
        text = prompt(random.Random(k), args.prompt_words)
        tasks.append(asyncio.create_task(one_request(client, args, text)))
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
    async with CLIENTS[args.client](url) as client:
        await one_request(client, args, prompt(random.Random(0), args.prompt_words))  # warm-up
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


@dataclass
class PrefixPoint:
    cache: str
    requests: int
    ok: int
    hit_rate: float
    first_ttft_ms: float
    ttft_p50_ms: float
    ttft_p99_ms: float


async def metric_values(client) -> dict[str, float]:
    """The server's /metrics samples, by name."""
    text = await client.text("/metrics")
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line and not line.startswith("#")}


async def shared_prefix(args, url: str, cache: str) -> PrefixPoint:
    """--shared-prefix on the server at `url`: a warm-up request of the same length (nothing
    shared), then the first request with the prefix (it computes it), then the others, from
    --concurrency's first value of clients."""
    rng = random.Random(args.seed)

    def ids(n: int) -> list[int]:
        return [rng.randrange(10, args.max_token_id) for _ in range(n)]

    prefix = ids(args.prefix_tokens)
    prompts = [prefix + ids(args.suffix_tokens) for _ in range(args.num_requests)]
    async with CLIENTS[args.client](url) as client:
        await one_request(client, args, ids(args.prefix_tokens + args.suffix_tokens))
        before = await metric_values(client)
        first = await one_request(client, args, prompts[0])
        queue = list(prompts[1:])
        rest: list[Sample] = []

        async def user() -> None:
            while queue:
                rest.append(await one_request(client, args, queue.pop()))

        await asyncio.gather(*(user() for _ in range(args.concurrency[0])))
        after = await metric_values(client)
    prompt_tokens = after["llm_prompt_tokens_total"] - before["llm_prompt_tokens_total"]
    hits = (after.get("llm_prefix_cache_hit_tokens_total", 0)
            - before.get("llm_prefix_cache_hit_tokens_total", 0))
    ok = [s for s in [first, *rest] if s.status == 200]
    ttft = np.array([s.ttft_s for s in rest if s.status == 200] or [np.nan]) * 1e3
    return PrefixPoint(cache, len(prompts), len(ok), hits / prompt_tokens if prompt_tokens else 0,
                       first.ttft_s * 1e3, float(np.percentile(ttft, 50)),
                       float(np.percentile(ttft, 99)))


PREFIX_HEADER = (f"{'cache':>6} {'ok/req':>8} {'hit rate':>9} {'first TTFT':>11} "
                 f"{'TTFT p50':>9} {'p99':>8}   (p50/p99: requests 2..N)")


def fmt_prefix(p: PrefixPoint) -> str:
    return (f"{p.cache:>6} {p.ok:>4}/{p.requests:<3} {p.hit_rate:>9.3f} {p.first_ttft_ms:>9.1f}ms "
            f"{p.ttft_p50_ms:>7.1f}ms {p.ttft_p99_ms:>6.1f}ms")


class IdTokenizer:
    """The tokenizer of a random-weight model: prompts are token ids, token t reads " t"."""

    eos_ids = ()

    @staticmethod
    def decode(ids, skip_special_tokens: bool = True) -> str:
        return "".join(f" {i}" for i in ids)

    def stream(self, *, skip_special_tokens: bool = True):
        from llm.model.tokenizer.detokenizer import IncrementalDecoder

        return IncrementalDecoder(self.decode, skip_special_tokens=skip_special_tokens)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        raise TypeError("a random-weight model has no tokenizer: send token ids")

    def apply_chat_template(self, messages, **kwargs) -> str:
        raise TypeError("a random-weight model has no chat template: use /v1/completions")


def load_model(args) -> SimpleNamespace:
    """The model to serve: its engine core (`core`) and a description."""
    import llm

    if args.random is None:
        model = llm.LLM(args.model, device=args.device, dtype=args.dtype,
                        max_batch=args.max_batch, max_seq_len=args.max_seq_len, progress=False)
        return SimpleNamespace(core=model.core, describe=model.backend.describe())
    import torch

    from demos.benchmark import SHAPES, random_checkpoint
    from llm.engine.contract.backend import BackendSpec, create_backend
    from llm.engine.core import EngineCore

    ck = random_checkpoint(SHAPES[args.random], torch.device(args.device),
                           getattr(torch, args.dtype))
    backend = create_backend("torch", BackendSpec(ck, device=args.device, dtype=args.dtype,
                                                  max_batch=args.max_batch,
                                                  max_seq_len=args.max_seq_len))
    return SimpleNamespace(core=EngineCore(backend, IdTokenizer()),
                           describe=f"random {args.random} weights, {backend.describe()}")


def listening_socket() -> socket.socket:
    """A socket bound to a free port of 127.0.0.1 for uvicorn, made as uvicorn makes its own: with
    proto IPPROTO_TCP, the sockets on which asyncio sets TCP_NODELAY. (A plain socket.socket() has
    proto 0: then each streamed chunk after the headers waited for the client's delayed ACK on a
    kept-alive connection, 40 ms added to the TTFT of every request but a connection's first.)"""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    return sock


def start_server(args, model: SimpleNamespace, prefix_cache: bool = True) -> tuple[str, object]:
    """Serve `model` from a background thread; (url, shutdown callable)."""
    import uvicorn

    from llm.engine.async_engine import AsyncEngine
    from llm.engine.scheduler import SchedulerConfig
    from llm.serve import ServerConfig, create_app
    from llm.serve.__main__ import GIL_SWITCH_INTERVAL_S

    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    engine = AsyncEngine(model, SchedulerConfig(max_queue=args.max_queue,
                                                prefill_chunk=args.prefill_chunk,
                                                prefix_cache=prefix_cache))
    app = create_app(engine, ServerConfig(model_name=args.model_name))
    sock = listening_socket()
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)

    def stop() -> None:
        server.should_exit = True
        thread.join(10)
        engine.shutdown()

    return f"http://127.0.0.1:{sock.getsockname()[1]}", stop


def run_shared_prefix(args) -> list[PrefixPoint]:
    """--shared-prefix: with and without the cache in-process, or the server at --url."""
    print(f"{args.num_requests} requests of {args.prefix_tokens} shared + {args.suffix_tokens} "
          f"own prompt tokens, {args.max_tokens} output tokens, greedy, "
          f"{args.concurrency[0]} client(s)\n{PREFIX_HEADER}", flush=True)
    points = []
    if args.url:
        points.append(run_clients(shared_prefix, args, args.url, "server"))
        print(fmt_prefix(points[-1]), flush=True)
        return points
    args.max_seq_len = max(args.max_seq_len,
                           args.prefix_tokens + args.suffix_tokens + args.max_tokens)
    model = load_model(args)
    print(model.describe, file=sys.stderr)
    for cache in (True, False):
        url, stop = start_server(args, model, prefix_cache=cache)
        try:
            points.append(run_clients(shared_prefix, args, url, "on" if cache else "off"))
        finally:
            stop()
        print(fmt_prefix(points[-1]), flush=True)
    on, off = points
    print(f"TTFT p50 with the cache / without: {on.ttft_p50_ms / off.ttft_p50_ms:.3f}")
    return points


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
    p.add_argument("--random", default=None, choices=["1b", "8b"],
                   help="serve random weights of these shapes (torch backend; token-id prompts)")
    p.add_argument("--shared-prefix", action="store_true",
                   help="measure the prefix cache (see the module docstring)")
    p.add_argument("--prefix-tokens", type=int, default=1536, help="--shared-prefix: shared part")
    p.add_argument("--suffix-tokens", type=int, default=64, help="--shared-prefix: own part")
    p.add_argument("--max-token-id", type=int, default=32000,
                   help="--shared-prefix prompts use token ids in [10, this)")
    p.add_argument("--seed", type=int, default=0, help="--shared-prefix prompts' seed")
    p.add_argument("--client", default="httpx", choices=sorted(CLIENTS),
                   help="the clients' HTTP library (aiohttp: less client time per request)")
    p.add_argument("--clients-in-process", action="store_true",
                   help="run the clients in the server's process (they share its GIL)")
    args = p.parse_args()
    check_args(p, args)
    if args.random and not args.shared_prefix:
        p.error("--random serves token-id prompts: it goes with --shared-prefix")
    if args.shared_prefix:
        points = run_shared_prefix(args)
        if args.json:
            with open(args.json, "w") as f:
                json.dump([asdict(pt) for pt in points], f, indent=1)
        return 0
    url, stop = args.url, None
    if not args.url:
        model = load_model(args)
        print(model.describe, file=sys.stderr)
        url, stop = start_server(args, model)
    print(f"{args.num_requests} requests per point, ~{args.prompt_words}-word prompts, "
          f"{args.max_tokens} output tokens, greedy\n{HEADER}", flush=True)
    try:
        points = run_clients(run, args, url)
    finally:
        if stop is not None:
            stop()
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(pt) for pt in points], f, indent=1)
    failed = [f"{pt.mode} {pt.load:g}" for pt in points if pt.ok == 0]
    if failed:
        print(f"error: no request succeeded at {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse (argparse's error, naming the flag) what cannot be measured."""
    for flag in ("max_batch", "max_seq_len", "max_queue", "prefill_chunk", "num_requests",
                 "prompt_words", "max_tokens", "prefix_tokens", "suffix_tokens"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if any(c < 1 for c in args.concurrency):
        p.error(f"--concurrency values must be >= 1, got {args.concurrency}")
    if any(not r > 0 for r in args.rates):
        p.error(f"--rates values must be > 0 requests/s, got {args.rates}")
    if not args.concurrency and not args.rates and not args.shared_prefix:
        p.error("nothing to measure: give --concurrency or --rates values")
    if args.url:
        try:
            httpx.get(args.url.rstrip("/") + "/models", timeout=10)
        except httpx.HTTPError as e:
            p.error(f"--url {args.url}: cannot reach the server: {e!r}")


if __name__ == "__main__":
    sys.exit(main())
