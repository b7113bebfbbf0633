"""demos/benchmark_serving.py serves from a socket on whose connections asyncio sets TCP_NODELAY
(without it, a streamed response on a kept-alive connection stalled 40 ms on delayed ACKs)."""

from __future__ import annotations

import asyncio
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from demos.benchmark_serving import listening_socket  # noqa: E402


def _accepted_nodelay(sock: socket.socket) -> int:
    """TCP_NODELAY of the server side of one connection accepted by asyncio on `sock`."""
    async def main() -> int:
        seen: asyncio.Future = asyncio.get_running_loop().create_future()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            s = writer.get_extra_info("socket")
            seen.set_result(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(handle, sock=sock)
        _, writer = await asyncio.open_connection(*sock.getsockname())
        value = await asyncio.wait_for(seen, 10)
        writer.close()
        server.close()
        await server.wait_closed()
        return value

    return asyncio.run(main())


def test_benchmark_server_connections_have_nodelay() -> None:
    assert _accepted_nodelay(listening_socket()) != 0


def test_a_plain_socket_would_not() -> None:
    """The failure the helper avoids (if asyncio ever sets it on every socket, this test says
    the helper is no longer needed)."""
    plain = socket.socket()
    plain.bind(("127.0.0.1", 0))
    assert _accepted_nodelay(plain) == 0
