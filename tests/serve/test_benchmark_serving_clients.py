"""demos/benchmark_serving.py's two HTTP clients read a streamed completion the same way: the
first token's time, the gaps between the next ones, the usage chunk's token count, and the
status of a refused request."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from demos.benchmark_serving import CLIENTS, one_request  # noqa: E402

TEXTS = [" a", " b", "", " c"]  # one empty chunk: not a token for the timings


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A server of streamed completions over HTTP/1.1 keep-alive; 429 to a prompt of "busy"."""
    while True:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):  # the client closed
            break
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length"))
        body = json.loads(await reader.readexactly(length))
        if body["prompt"] == "busy":
            msg = b'{"error": {"message": "busy"}}'
            writer.write(b"HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\n"
                         b"content-length: %d\r\n\r\n%s" % (len(msg), msg))
            await writer.drain()
            continue
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                     b"transfer-encoding: chunked\r\n\r\n")
        for text in TEXTS:
            event = {"choices": [{"index": 0, "text": text}]}
            writer.write(_chunk(b"data: " + json.dumps(event).encode() + b"\n\n"))
            await writer.drain()
            await asyncio.sleep(0.002)
        usage = {"choices": [], "usage": {"completion_tokens": 3}}
        writer.write(_chunk(b"data: " + json.dumps(usage).encode() + b"\n\n"))
        writer.write(_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
        await writer.drain()
    writer.close()


@pytest.mark.parametrize("name", sorted(CLIENTS))
def test_client_reads_a_stream_and_a_refusal(name: str) -> None:
    if name == "aiohttp":
        pytest.importorskip("aiohttp")
    args = SimpleNamespace(model_name="m", max_tokens=3)

    async def main():
        server = await asyncio.start_server(_serve, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        async with CLIENTS[name](url) as client:
            samples = [await one_request(client, args, [1, 2, 3]) for _ in range(2)]
            refused = await one_request(client, args, "busy")
        await asyncio.sleep(0.05)  # the handler sees the client's close and returns
        server.close()
        await server.wait_closed()
        return samples, refused

    samples, refused = asyncio.run(main())
    for s in samples:  # the second on the kept-alive connection
        assert s.status == 200 and s.tokens == 3
        assert s.ttft_s > 0 and len(s.itl_s) == 2 and all(g > 0 for g in s.itl_s)
        assert s.ttft_s + sum(s.itl_s) >= 0.004  # the server paused 2 ms after each chunk
    assert refused.status == 429 and refused.ttft_s == 0.0 and refused.tokens == 0
