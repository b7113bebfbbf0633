"""Responses that notice a client going away: an SSE stream and a wait for a whole result.

Both race the work against the ASGI `http.disconnect` message, so a client that disconnects
cancels its request at once (freeing its slot and KV pages) rather than when the next write fails.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from starlette.types import Receive, Scope, Send

T = TypeVar("T")


class ClientGone(Exception):
    """The client disconnected before the result was ready."""


async def wait_for_disconnect(receive: Receive) -> None:
    """Return when the client has disconnected (the request body must already be read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def race_disconnect(work: Awaitable[T], receive: Receive) -> T:
    """Await `work`, or raise ClientGone (cancelling it) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(wait_for_disconnect(receive))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (task, gone):
            if not t.done():
                t.cancel()
    if task.done() and not task.cancelled():
        return task.result()
    raise ClientGone


class EventStreamResponse:
    """An ASGI `text/event-stream` response of `chunks`; `on_close` runs however it ends."""

    def __init__(self, chunks: AsyncIterator[bytes], on_close: Callable[[], Any]) -> None:
        self.chunks = chunks
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def pump() -> None:
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", b"text/event-stream; charset=utf-8"),
                (b"cache-control", b"no-cache"),
                (b"x-accel-buffering", b"no"),
            ]})
            async for chunk in self.chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        try:
            with contextlib.suppress(ClientGone, OSError):
                await race_disconnect(pump(), receive)
        finally:
            self.on_close()
            aclose = getattr(self.chunks, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()
