"""Clients that disconnect (mid-stream, or while waiting for a whole completion) cancel their
requests: the page allocator returns to completely free long before the requests could have
finished, and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import re

import httpx
from conftest import MODEL_NAME

LONG = 400  # tokens each request would run if not cancelled (minutes on a CPU for 12 users)


def cancelled_count(url: str) -> int:
    text = httpx.get(url + "/metrics").text
    m = re.search(r'llm_requests_finished_total\{reason="cancelled"\} (\d+)', text)
    return int(m.group(1)) if m else 0


async def stream_then_drop(client: httpx.AsyncClient, i: int) -> int:
    body = {"model": MODEL_NAME, "prompt": f"Tell me story number {i}.", "max_tokens": LONG,
            "temperature": 0.8, "seed": i, "ignore_eos": True, "stream": True}
    chunks = 0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            chunks += line.startswith("data: {")
            if chunks == 2 + i % 3:
                break  # leaving the block closes the connection mid-stream
    return chunks


async def wait_then_drop(client: httpx.AsyncClient, i: int) -> None:
    body = {"model": MODEL_NAME, "prompt": f"Write essay {i}.", "max_tokens": LONG,
            "ignore_eos": True}
    try:
        await client.post("/v1/completions", json=body, timeout=3.0)
    except httpx.TimeoutException:
        return
    raise AssertionError("a 400-token completion finished within 3 s")


async def drop_all(url: str) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=60) as streaming, \
            httpx.AsyncClient(base_url=url) as waiting:
        await asyncio.gather(*(stream_then_drop(streaming, i) for i in range(8)),
                             *(wait_then_drop(waiting, i) for i in range(4)))


def test_disconnects_free_every_slot_and_page(live_server) -> None:
    before = cancelled_count(live_server.url)
    asyncio.run(drop_all(live_server.url))
    assert live_server.wait_all_free(timeout=20)
    assert cancelled_count(live_server.url) - before == 12
    r = httpx.post(live_server.url + "/v1/completions", timeout=60,
                   json={"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 3})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    assert live_server.wait_all_free()
