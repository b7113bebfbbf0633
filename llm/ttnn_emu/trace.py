"""Trace capture and replay (reference 8).

begin_trace_capture / end_trace_capture record the ops run in between (trace_capture.py: each
op with its resolved buffers and frozen arguments); execute_trace replays exactly that sequence
on the captured buffers, allocating nothing. Inside a capture, host reads and writes
(to_torch, from_device, copy_host_to_device_tensor, from_torch/to_device onto the device),
synchronize_device, nested captures, execute_trace, and ops that were never run outside a
capture raise, as on hardware; allocate_tensor_on_device is allowed.
"""

from __future__ import annotations

import itertools
import warnings

from .accounting import StepCost, run_op
from .trace_capture import Capture

_trace_ids = itertools.count()


class MeshTraceId(int):
    """ttnn.MeshTraceId(id): one positional argument, as in ttnn 0.81.1."""

    def __new__(cls, value, /):
        return super().__new__(cls, value)


class Trace:
    """A captured trace: the recorded ops, the pre-existing buffers they use, the tensors the
    capture produced (unreadable until the first replay), and the captured / latest cost."""

    def __init__(self, capture: Capture):
        self.id = capture.trace_id
        self.ops = capture.ops
        self.inputs = [(buf, buf.owner) for buf in capture.inputs()]
        self.produced = capture.finish()
        self.captured_cost = StepCost.of(capture.records)
        self.last_cost: StepCost | None = None
        self.replays = 0
        self.alloc_mark = max(capture.device._allocs, default=-1)  # later buffers: after capture
        self.warned = False

    def check_inputs(self) -> None:
        """Every pre-existing buffer the trace uses must still be allocated."""
        for buf, owner in self.inputs:
            tensor = owner()
            if tensor is None or tensor._shards is None:
                raise RuntimeError(
                    f"execute_trace: trace {self.id} uses a device buffer ({buf.describe()}) that"
                    " was deallocated after capture; on a device the trace would read or"
                    " overwrite whatever is now at that address"
                )


def begin_trace_capture(mesh_device, *, cq_id=0) -> MeshTraceId:
    """ttnn.begin_trace_capture: start recording ops on `mesh_device`."""
    mesh_device._require_open()
    if mesh_device.trace_region_size <= 0:
        raise RuntimeError("Trace capture needs a device opened with trace_region_size > 0")
    if mesh_device._capture is not None:
        raise RuntimeError("A trace is already being captured on this device")
    tid = MeshTraceId(next(_trace_ids))
    mesh_device._capture = Capture(tid, mesh_device)
    return tid


def end_trace_capture(mesh_device, trace_id, *, cq_id=0) -> None:
    """ttnn.end_trace_capture: store the recorded trace. The capture run's writes to buffers
    that existed before it are undone, and tensors it produced are undefined until replayed."""
    cap = mesh_device._capture
    if cap is None or cap.trace_id != trace_id:
        raise RuntimeError(f"No trace capture {trace_id} in progress")
    mesh_device._capture = None
    trace = Trace(cap)
    if not trace.ops:
        raise RuntimeError("Trace capture recorded no ops")
    mesh_device._traces[int(trace_id)] = trace


def execute_trace(mesh_device, trace_id, *, cq_id=0, blocking=True) -> None:
    """ttnn.execute_trace: run the recorded ops on the captured buffers; sums their cost into
    the trace's last_cost (and the device op log)."""
    mesh_device._require_open()
    if mesh_device._capture is not None:
        raise RuntimeError("execute_trace is not allowed while a trace is being captured")
    trace = mesh_device._traces.get(int(trace_id))
    if trace is None:
        raise RuntimeError(f"Unknown or released trace {trace_id}")
    trace.check_inputs()
    _warn_on_buffers_allocated_after_capture(mesh_device, trace)
    views: dict = {}
    records = []
    mesh_device._replaying = True
    try:
        for traced in trace.ops:
            records.append(traced.replay(views, run_op))
    finally:
        mesh_device._replaying = False
    for rec in records:
        mesh_device.op_log.add(rec)
    for ref in trace.produced:
        tensor = ref()
        if tensor is not None:
            tensor._unwritten = False
    trace.produced = []
    trace.last_cost = StepCost.of(records)
    trace.replays += 1


def _warn_on_buffers_allocated_after_capture(mesh_device, trace: Trace) -> None:
    """tt-metal's allocator rule: a buffer allocated while a trace exists must be freed before
    the trace runs, or the trace may overwrite it (addresses its own buffers used). The emulator
    keeps them apart, so it warns (once per trace) where a device could corrupt them."""
    live = sum(1 for token in mesh_device._allocs if token > trace.alloc_mark)
    if live and not trace.warned:
        trace.warned = True
        warnings.warn(
            f"execute_trace: {live} device buffer(s) allocated after trace {trace.id} was"
            " captured are still allocated; on a device the trace may overwrite them"
            " (tt-metal: allocating device buffers is unsafe while a trace exists)",
            RuntimeWarning, stacklevel=3,
        )


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
