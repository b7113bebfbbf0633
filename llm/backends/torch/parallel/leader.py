"""One engine driving a tensor-parallel backend whose ranks are separate processes.

Rank 0 (the leader) owns the engine, the tokenizer and all I/O. Its backend is wrapped in a
`LeaderBackend`, which sends every call (prefill, decode) to the other ranks before running it
itself; each follower (a `FollowerBackend`) runs `follow`, executing the same calls in the same
order, so the ranks meet in every collective. Every rank computes the same tokens (greedy by a
distributed argmax, sampling over the gathered vocabulary with the same counter-based noise); only
the leader's are used.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol

from llm.engine.contract.backend import Backend, Capabilities, DecodeInput, PrefillInput
from llm.engine.contract.outputs import StepOutput

_STOP = "stop"


class Channel(Protocol):
    """Host messages from the leader: `broadcast_object(obj)` on rank 0 returns obj, on the
    others it returns what rank 0 sent (e.g. `llm.backends.torch.parallel.mesh.Mesh`).
    """

    size: int

    def broadcast_object(self, obj: Any = None) -> Any: ...


class _Rank(Backend):
    """What a leader and a follower share: this rank's backend, the channel, and its description
    (name, config, runtime, source, capabilities) taken from the rank's backend.
    """

    def __init__(self, backend: Backend, channel: Channel,
                 on_close: Callable[[], None] | None = None) -> None:
        self.backend, self.channel, self._on_close = backend, channel, on_close
        self.config, self.runtime = backend.config, backend.runtime
        # as errors name it: "... not supported by the torch (tensor parallel over 2 ranks)
        # backend" (the one-process backend may support it)
        self.name = f"{backend.name} (tensor parallel over {channel.size} ranks)"
        self.source, self.source_sha256 = backend.source, backend.source_sha256
        self.weight_bytes, self.host_compute = backend.weight_bytes, backend.host_compute
        self.closed = False

    @property
    def capabilities(self) -> Capabilities:
        return self.backend.capabilities

    def _release(self) -> None:
        self.backend.close()
        if self._on_close is not None:
            self._on_close()


class LeaderBackend(_Rank):
    """Rank 0's view of a tensor-parallel backend: the Backend the engine drives.

    on_close: called once after the followers were released (e.g. to leave the process group).
    """

    def prefill(self, inp: PrefillInput) -> int:
        inp = dataclasses.replace(inp, select=True)  # a token wanted: the followers select too
        self._send("prefill", inp)
        return self.backend.prefill(inp)

    def decode(self, inp: DecodeInput) -> list[int]:
        self._send("decode", inp)
        return self.backend.decode(inp)

    def copy_pages(self, pairs) -> None:
        self._send("copy_pages", list(pairs))
        self.backend.copy_pages(pairs)

    def prefill_step(self, inp: PrefillInput,
                     launched: Callable[[], None] | None = None) -> StepOutput:
        """`prefill` with log probabilities (the followers run the same `prefill_step`;
        `launched` is this rank's, as the contract says)."""
        self._send("prefill", inp)
        return self.backend.prefill_step(inp, launched)

    def decode_step(self, inp: DecodeInput) -> StepOutput:
        """`decode` with log probabilities (the followers run the same work in `decode`)."""
        self._send("decode", inp)
        return self.backend.decode_step(inp)

    def describe(self) -> str:
        return f"{self.backend.describe()}; tensor parallel over {self.channel.size} ranks"

    def close(self) -> None:
        """Release the followers (their `follow` returns), then this rank's backend; later calls
        are an error.
        """
        if self.closed:
            return
        self.channel.broadcast_object((_STOP, None))
        self.closed = True
        self._release()

    def _send(self, op: str, inp: Any) -> None:
        if self.closed:
            raise RuntimeError("the tensor-parallel backend was closed")
        self.channel.broadcast_object((op, inp))


class FollowerBackend(_Rank):
    """A rank > 0 of a tensor-parallel backend: it is never driven directly, it `follow`s the
    leader's calls until the leader closes.
    """

    @property
    def leader(self) -> bool:
        return False

    def prefill(self, inp: PrefillInput) -> int:
        raise RuntimeError("a tensor-parallel follower runs the leader's calls: call follow()")

    def decode(self, inp: DecodeInput) -> list[int]:
        raise RuntimeError("a tensor-parallel follower runs the leader's calls: call follow()")

    def copy_pages(self, pairs) -> None:
        raise RuntimeError("a tensor-parallel follower runs the leader's calls: call follow()")

    def describe(self) -> str:
        return f"{self.backend.describe()}; follows rank 0"

    def follow(self) -> int:
        """Run the leader's calls until it closes, then close this rank; the number of calls."""
        try:
            return follow(self.backend, self.channel)
        finally:
            self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._release()


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
        if op == "prefill":  # the leader's prefill_step (or prefill, whose inp selects)
            backend.prefill_step(inp)
        elif op == "decode":
            backend.decode(inp)
        elif op == "copy_pages":
            backend.copy_pages(inp)
        else:
            raise RuntimeError(f"unknown tensor-parallel message {op!r} from the leader")
        calls += 1
