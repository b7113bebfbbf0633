"""Trace capture and replay (reference 8).

Capture records every op (with its argument and output tensor objects) while running it once.
Replay re-runs the recorded ops on the same tensor objects and writes each result into the
recorded output buffers in place, so inputs updated with copy_host_to_device_tensor (or on
device, e.g. plus_one) are re-read and outputs keep their "address". During capture, host reads
and writes and new host->device allocations raise, as on hardware.
"""

from __future__ import annotations

import itertools

from .accounting import StepCost
from .tensor import Tensor

_trace_ids = itertools.count()


class MeshTraceId(int):
    """ttnn.MeshTraceId(id): one positional argument, as in ttnn 0.81.1."""

    def __new__(cls, value, /):
        return super().__new__(cls, value)


class _Capture:
    def __init__(self, trace_id: MeshTraceId):
        self.trace_id = trace_id
        self.ops: list = []
        self.records: list = []
        self.deallocated: list = []

    def record(self, wrapper, args, kwargs, out) -> None:
        self.ops.append((wrapper, args, kwargs, out))

    def note_dealloc(self, tensor: Tensor, shards) -> None:
        self.deallocated.append((tensor, shards))


class Trace:
    """A captured trace: the op list, its captured cost and the cost of the latest replay."""

    def __init__(self, capture: _Capture):
        self.id = capture.trace_id
        self.ops = capture.ops
        self.deallocated = capture.deallocated
        self.captured_cost = StepCost.of(capture.records)
        self.last_cost: StepCost | None = None
        self.replays = 0


def begin_trace_capture(mesh_device, *, cq_id=0) -> MeshTraceId:
    """ttnn.begin_trace_capture: start recording ops on `mesh_device`."""
    mesh_device._require_open()
    if mesh_device.trace_region_size <= 0:
        raise RuntimeError("Trace capture needs a device opened with trace_region_size > 0")
    if mesh_device._capture is not None:
        raise RuntimeError("A trace is already being captured on this device")
    tid = MeshTraceId(next(_trace_ids))
    mesh_device._capture = _Capture(tid)
    return tid


def end_trace_capture(mesh_device, trace_id, *, cq_id=0) -> None:
    """ttnn.end_trace_capture."""
    cap = mesh_device._capture
    if cap is None or cap.trace_id != trace_id:
        raise RuntimeError(f"No trace capture {trace_id} in progress")
    if not cap.ops:
        mesh_device._capture = None
        raise RuntimeError("Trace capture recorded no ops")
    mesh_device._traces[int(trace_id)] = Trace(cap)
    mesh_device._capture = None


def _assign(recorded, new) -> None:
    if recorded is new:
        return
    if isinstance(recorded, Tensor):
        recorded.write_shards(new.padded_shards())
    elif isinstance(recorded, (list, tuple)):
        for r, n in zip(recorded, new):
            _assign(r, n)


def execute_trace(mesh_device, trace_id, *, cq_id=0, blocking=True) -> None:
    """ttnn.execute_trace: replay the recorded ops in place; sums their cost into last_cost."""
    mesh_device._require_open()
    if mesh_device._capture is not None:
        raise RuntimeError("execute_trace is not allowed while a trace is being captured")
    trace = mesh_device._traces.get(int(trace_id))
    if trace is None:
        raise RuntimeError(f"Unknown or released trace {trace_id}")
    for tensor, shards in trace.deallocated:  # buffers freed inside the trace live in it
        tensor._shards = shards
    mesh_device._replay_records = []
    try:
        for wrapper, args, kwargs, out in trace.ops:
            _assign(out, wrapper(*args, **kwargs))
    finally:
        records = mesh_device._replay_records
        mesh_device._replay_records = None
        for tensor, _ in trace.deallocated:
            tensor._shards = None
    trace.last_cost = StepCost.of(records)
    trace.replays += 1


def release_trace(mesh_device, trace_id) -> None:
    """ttnn.release_trace."""
    if mesh_device._traces.pop(int(trace_id), None) is None:
        raise RuntimeError(f"Unknown or released trace {trace_id}")


def trace_step_cost(mesh_device, trace_id) -> StepCost:
    """Per-chip DRAM bytes and FLOPs of one replay (of the capture if never replayed)."""
    trace = mesh_device._traces.get(int(trace_id))
    if trace is None:
        raise RuntimeError(f"Unknown or released trace {trace_id}")
    return trace.last_cost or trace.captured_cost
