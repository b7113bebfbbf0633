"""64 concurrent requests of mixed prompt and output lengths through the live server: every greedy
output equals the same request run alone through the same engine; afterwards every page is free.

The 64 are 8 distinct requests sent 8 times each, in an interleaved order (so copies land in
different slots, at different times and in different batch compositions): running only 8 requests
alone keeps the test within its CI budget on a 2-core CPU.
"""

from __future__ import annotations

import asyncio
import time

import httpx
from conftest import MODEL_NAME

WORDS = "the river bends past old stone mills where children once fished in spring".split()


def distinct_requests(n: int = 8) -> list[dict]:
    """Mixed lengths: prompts of ~4 to ~50 tokens, max_tokens 8..12."""
    out = []
    for i in range(n):
        words = [WORDS[(i * 7 + k) % len(WORDS)] for k in range((i * 37) % 41 + 1)]
        out.append({"model": MODEL_NAME, "prompt": f"Story {i}: " + " ".join(words),
                    "max_tokens": 8 + i % 5, "temperature": 0})
    return out


def concurrent_requests(distinct: list[dict], copies: int = 8) -> list[tuple[int, dict]]:
    """(index into distinct, body) in an interleaved order, half of them streamed."""
    n = len(distinct) * copies
    order = [(k * 13) % n for k in range(n)]  # 13 is coprime with 64: a permutation
    return [(j % len(distinct), {**distinct[j % len(distinct)], "stream": k % 2 == 0})
            for k, j in enumerate(order)]


async def run_one(client: httpx.AsyncClient, body: dict) -> tuple[str, int]:
    """(text, completion_tokens) of one request, streamed or not."""
    if not body["stream"]:
        r = await client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        data = r.json()
        return data["choices"][0]["text"], data["usage"]["completion_tokens"]
    text, usage = [], None
    body = {**body, "stream_options": {"include_usage": True}}  # usage in a last extra chunk
    async with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                chunk = httpx.Response(200, content=line[6:]).json()
                text += [c["text"] for c in chunk["choices"]]
                usage = chunk.get("usage") or usage
    assert usage is not None
    return "".join(text), usage["completion_tokens"]


async def concurrent_then_alone(url: str, distinct: list[dict],
                                together: list[tuple[int, dict]]):
    limits = httpx.Limits(max_connections=len(together))
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(run_one(client, b) for _, b in together))
        t1 = time.perf_counter()
        alone = [await run_one(client, {**b, "stream": False}) for b in distinct]
        print(f"\n64 concurrent: {t1 - t0:.1f} s; {len(distinct)} alone: "
              f"{time.perf_counter() - t1:.1f} s")
    return results, alone


def test_64_concurrent_greedy_requests_equal_running_alone(live_server) -> None:
    distinct = distinct_requests()
    together = concurrent_requests(distinct)
    assert len(together) == 64
    results, alone = asyncio.run(concurrent_then_alone(live_server.url, distinct, together))
    for (j, body), got in zip(together, results):
        assert got == alone[j], (j, body["prompt"], body["stream"])
        assert 1 <= got[1] <= body["max_tokens"]
    assert sum(a[1] for a in alone) > 8 * 6  # mostly full-length outputs
    assert live_server.wait_all_free()
