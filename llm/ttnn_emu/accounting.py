"""Op accounting: every emulated op records the DRAM bytes it moves and the FLOPs it performs.

Costs are per chip: on a mesh every chip runs the same program on its own shard, so an op's cost is
that of one shard. The `op` decorator also feeds trace capture (see trace_capture.py).
"""

from __future__ import annotations

import functools
from collections import deque
from dataclasses import dataclass

from .memory import BufferType


@dataclass
class OpRecord:
    """Cost of one op call on one chip."""

    name: str
    dram_bytes: int | None = None
    flops: int = 0


@dataclass(frozen=True)
class StepCost:
    """Summed cost of a group of ops (for example one traced decode step)."""

    dram_bytes: int
    flops: int
    num_ops: int

    @staticmethod
    def of(records) -> StepCost:
        """Sum a list of OpRecords."""
        records = list(records)
        return StepCost(
            sum(r.dram_bytes or 0 for r in records), sum(r.flops for r in records), len(records)
        )


class OpLog:
    """Per-device log: running totals plus the most recent records."""

    def __init__(self, keep: int = 4096):
        self.recent: deque[OpRecord] = deque(maxlen=keep)
        self.total_dram_bytes = 0
        self.total_flops = 0
        self.num_ops = 0

    def add(self, rec: OpRecord) -> None:
        """Append one record."""
        self.recent.append(rec)
        self.total_dram_bytes += rec.dram_bytes or 0
        self.total_flops += rec.flops
        self.num_ops += 1

    def total(self) -> StepCost:
        """Totals since the device was opened (or reset)."""
        return StepCost(self.total_dram_bytes, self.total_flops, self.num_ops)

    def reset(self) -> None:
        """Clear the log."""
        self.recent.clear()
        self.total_dram_bytes = self.total_flops = self.num_ops = 0


_active: list[OpRecord] = []


def set_cost(*, dram_bytes: int | None = None, flops: int | None = None) -> None:
    """Inside an op: override the default DRAM byte count and/or set the FLOP count."""
    if not _active:
        raise RuntimeError("set_cost called outside an op")
    rec = _active[-1]
    if dram_bytes is not None:
        rec.dram_bytes = int(dram_bytes)
    if flops is not None:
        rec.flops = int(flops)


def tensors_in(obj):
    """Every ttnn Tensor in `obj` (nested lists, tuples and dict values), in order."""
    from .tensor import Tensor

    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from tensors_in(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from tensors_in(o)


def dram_bytes_of(*objs) -> int:
    """Bytes of the distinct DRAM-resident device tensors among `objs` (one shard each)."""
    seen = set()
    total = 0
    for t in tensors_in(objs):
        if id(t) in seen or t.device() is None or not t.is_allocated():
            continue
        seen.add(id(t))
        if t.memory_config().buffer_type == BufferType.DRAM:
            total += t.shard_nbytes()
    return total


def find_device(args, kwargs):
    """The device of the first device tensor among an op's arguments, or None."""
    for t in tensors_in((args, kwargs)):
        if t.device() is not None:
            return t.device()
    return None


def run_op(name: str, fn, args, kwargs):
    """Run op body `fn` and return (its output, its OpRecord): the FLOPs and DRAM bytes it set
    with set_cost, else the DRAM bytes of its device tensors."""
    rec = OpRecord(name)
    _active.append(rec)
    try:
        out = fn(*args, **kwargs)
    finally:
        _active.pop()
    if rec.dram_bytes is None:
        rec.dram_bytes = dram_bytes_of(args, kwargs, out)
    return out, rec


def op(name: str):
    """Decorate an emulated ttnn op: record its cost and let trace capture see it (the device's
    _before_op / _after_op hooks; see trace_capture.py).

    Ops called from inside other ops are not recorded separately.
    """

    def deco(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if _active:
                return fn(*args, **kwargs)
            device = find_device(args, kwargs)
            if device is None:
                return run_op(name, fn, args, kwargs)[0]
            guard = device._before_op(name, args, kwargs)
            out, rec = run_op(name, fn, args, kwargs)
            device._after_op(fn, out, rec, guard)
            return out

        wrapper.op_name = name
        return wrapper

    return deco
