"""One Generator driving a tensor-parallel backend whose ranks are separate processes.

Rank 0 (the leader) owns the Generator, the tokenizer and all I/O. Its backend is wrapped in a
`LeaderBackend`, which sends every call (prefill, decode) to the other ranks before running it
itself; each follower runs `follow`, executing the same calls in the same order, so the ranks meet
in every collective. Every rank computes the same tokens (greedy by a distributed argmax, sampling
over the gathered vocabulary with the same counter-based noise); only the leader's are used.
"""

from __future__ import annotations

from typing import Any, Protocol

from llm.engine.contract.backend import Backend, DecodeInput, PrefillInput

_STOP = "stop"


class Channel(Protocol):
    """Host messages from the leader: `broadcast_object(obj)` on rank 0 returns obj, on the
    others it returns what rank 0 sent (e.g. `llm.backends.torch.parallel.mesh.Mesh`).
    """

    size: int

    def broadcast_object(self, obj: Any = None) -> Any: ...


class LeaderBackend(Backend):
    """Rank 0's view of a tensor-parallel backend: the Backend the Generator drives."""

    def __init__(self, backend: Backend, channel: Channel) -> None:
        self.backend, self.channel = backend, channel
        self.name, self.config, self.runtime = backend.name, backend.config, backend.runtime
        self.closed = False

    def prefill(self, inp: PrefillInput) -> int:
        self._send("prefill", inp)
        return self.backend.prefill(inp)

    def decode(self, inp: DecodeInput) -> list[int]:
        self._send("decode", inp)
        return self.backend.decode(inp)

    def describe(self) -> str:
        return f"{self.backend.describe()}; tensor parallel over {self.channel.size} ranks"

    def close(self) -> None:
        """Release the followers (their `follow` returns); later calls are an error."""
        if not self.closed:
            self.channel.broadcast_object((_STOP, None))
            self.closed = True

    def _send(self, op: str, inp: Any) -> None:
        if self.closed:
            raise RuntimeError("the tensor-parallel backend was closed")
        self.channel.broadcast_object((op, inp))


def follow(backend: Backend, channel: Channel) -> int:
    """Run the leader's calls on this rank until it closes; returns the number of calls run.

    An exception on a follower propagates (its process fails, and the leader's next collective
    fails with it) rather than letting the ranks fall out of step.
    """
    calls = 0
    while True:
        op, inp = channel.broadcast_object()
        if op == _STOP:
            return calls
        if op == "prefill":
            backend.prefill(inp)
        elif op == "decode":
            backend.decode(inp)
        else:
            raise RuntimeError(f"unknown tensor-parallel message {op!r} from the leader")
        calls += 1
