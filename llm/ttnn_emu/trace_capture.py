"""What a trace capture records: each op with its resolved buffers and frozen arguments.

During capture every op runs once (so the model code gets output tensors of the right spec),
and is recorded as a TracedOp: the op body, its arguments with every device tensor replaced by
the CapturedBuffer it resolved to (the per-chip storage it read or wrote, like a device
address) and every other argument deep-copied, and its outputs as CapturedBuffers. A replay runs
exactly that list on those buffers, so nothing the Python side does after the capture (rebinding
a variable, mutating a config or list, replacing a function, writing another tensor) reaches it;
host writes into the captured buffers do.

As on a device, a capture changes nothing: writes the capture run made into buffers that existed
before it (KV caches, plus_one counters, output_tensor= targets) are undone at the end, the
device RNG is restored, and tensors the capture produced hold no readable data until the first
execute_trace. An op whose program was never run outside a capture cannot be captured.
"""

from __future__ import annotations

import copy
import weakref

import torch

from .accounting import tensors_in
from .tensor import Tensor


def _spec(t: Tensor) -> tuple:
    return tuple(t.shape), tuple(t.padded_shape), t.dtype, t.layout, t.memory_config()


def program_key(name: str, args, kwargs) -> tuple:
    """What distinguishes compiled programs here: the op, the spec of each device tensor it
    takes, and which keyword arguments are set. Real ttnn hashes more (op attributes), so this
    is a lower bound: a key missing here is certainly a program-cache miss on a device."""
    specs = tuple(_spec(t) for t in tensors_in((args, kwargs)) if t.device() is not None)
    return name, specs, tuple(sorted(k for k, v in kwargs.items() if v is not None))


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()


class CapturedBuffer:
    """One device buffer as the capture resolved it: its per-chip storage and tensor spec."""

    def __init__(self, tensor: Tensor, internal: bool):
        self.shards = tuple(tensor._check_alive())
        self.spec = (tensor.shape, tensor.padded_shape, tensor.dtype, tensor.layout,
                     tensor.memory_config(), tensor.device())
        self.internal = internal  # allocated inside the capture: the trace owns it
        self.owner = weakref.ref(tensor)

    def describe(self) -> str:
        """Shape, dtype and memory of the buffer, for error messages."""
        shape, _, dtype, _, mem, _ = self.spec
        return (f"{list(shape)} {dtype.name} {mem.memory_layout.name}/"
                f"{mem.buffer_type.name}")

    def view(self) -> Tensor:
        """A tensor over this storage that allocates nothing."""
        return Tensor.borrow(self.shards, *self.spec)

    def store(self, result: Tensor) -> None:
        """Write an op's freshly computed output into this buffer (nothing to do when the op
        wrote this buffer in place)."""
        src = result.padded_shards()
        if len(src) != len(self.shards) or tuple(result.padded_shape) != tuple(self.spec[1]):
            raise RuntimeError(f"execute_trace: an op's output no longer fits its captured buffer"
                               f" {self.describe()}")
        for dst, s in zip(self.shards, src):
            if s is dst or _same_memory(s, dst):
                continue
            if s.untyped_storage().data_ptr() == dst.untyped_storage().data_ptr():
                s = s.clone()
            dst.copy_(s)


def _freeze(obj, capture: Capture, memo: dict):
    if isinstance(obj, Tensor):
        if obj.device() is None:  # a host operand: the trace holds the values it had
            return Tensor.borrow([s.clone() for s in obj.padded_shards()], obj.shape,
                                 obj.padded_shape, obj.dtype, obj.layout, obj.memory_config(),
                                 None)
        return capture.buffer(obj)
    if type(obj) in (list, tuple):
        return type(obj)(_freeze(o, capture, memo) for o in obj)
    if type(obj) is dict:
        return {k: _freeze(v, capture, memo) for k, v in obj.items()}
    return copy.deepcopy(obj, memo)


def _thaw(obj, views: dict):
    if isinstance(obj, CapturedBuffer):
        view = views.get(id(obj))
        if view is None:
            view = views[id(obj)] = obj.view()
        return view
    if type(obj) in (list, tuple):
        return type(obj)(_thaw(o, views) for o in obj)
    if type(obj) is dict:
        return {k: _thaw(v, views) for k, v in obj.items()}
    return obj


def _store(frozen, out) -> None:
    if isinstance(frozen, CapturedBuffer):
        frozen.store(out)
    elif type(frozen) in (list, tuple):
        for f, o in zip(frozen, out):
            _store(f, o)


class TracedOp:
    """One recorded op: its body, frozen arguments and captured output buffers."""

    def __init__(self, name: str, fn, args, kwargs, out):
        self.name, self.fn, self.args, self.kwargs, self.out = name, fn, args, kwargs, out

    def replay(self, views: dict, run_op):
        """Run the op on the captured buffers; returns its OpRecord."""
        out, rec = run_op(self.name, self.fn, _thaw(self.args, views), _thaw(self.kwargs, views))
        _store(self.out, out)
        return rec


class Capture:
    """The state of one trace capture in progress on `device`."""

    def __init__(self, trace_id, device):
        self.trace_id = trace_id
        self.device = device
        self.ops: list[TracedOp] = []
        self.records: list = []
        self._buffers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._allocated: weakref.WeakSet = weakref.WeakSet()
        self._freed: list = []  # (spec, storage) of buffers freed inside the capture
        self._saved: dict = {}  # storage address -> (storage, its copy before the capture wrote)
        # the sampling PRNGs, one per (chip, core) (sampling.py): generators and their states
        self._rngs = {key: (gen, gen.get_state())
                      for key, gen in getattr(device, "_core_rngs", {}).items()}

    # --- hooks called by tensors and ops ----------------------------------------------------
    def note_alloc(self, tensor: Tensor) -> None:
        """A device buffer allocated inside the capture (the trace owns it)."""
        self._allocated.add(tensor)

    def note_free(self, tensor: Tensor) -> None:
        """A buffer deallocated inside the capture: its address may be handed out again."""
        self._freed.append((_spec(tensor), tensor._shards))

    def reuse(self, spec: tuple):
        """The storage of the latest buffer of `spec` freed inside the capture, or None."""
        for i in range(len(self._freed) - 1, -1, -1):
            if self._freed[i][0] == spec:
                return self._freed.pop(i)[1]
        return None

    def before_write(self, tensor: Tensor) -> None:
        """Save a pre-existing buffer (its whole storage, so aliases are covered) before the
        capture run first writes it."""
        if tensor in self._allocated:
            return
        for shard in tensor._shards:
            storage = shard.untyped_storage()
            if storage.data_ptr() not in self._saved:
                self._saved[storage.data_ptr()] = (storage, storage.clone())

    def _unsaved_write(self, tensor: Tensor, versions: list) -> bool:
        shards = tensor._shards
        return shards is not None and [s._version for s in shards] != versions and any(
            s.untyped_storage().data_ptr() not in self._saved for s in shards)

    def buffer(self, tensor: Tensor) -> CapturedBuffer:
        """The CapturedBuffer `tensor` resolves to (one per tensor object)."""
        buf = self._buffers.get(tensor)
        if buf is None:
            buf = self._buffers[tensor] = CapturedBuffer(tensor, tensor in self._allocated)
        return buf

    def before_op(self, name: str, args, kwargs, compiled: set):
        """Refuse an op never compiled outside a capture; resolve its arguments to buffers
        (before it runs: it may deallocate an input) and note the versions of the
        pre-existing buffers it touches (to catch a write that bypassed before_write)."""
        if program_key(name, args, kwargs) not in compiled:
            raise RuntimeError(
                f"Cannot load new binaries during trace capture: {name} with these tensor specs"
                " is not yet in the program cache (run it once before begin_trace_capture)"
            )
        memo = {id(self.device): self.device}
        frozen = (_freeze(args, self, memo), _freeze(kwargs, self, memo))
        versions = [(t, [s._version for s in t._shards]) for t in tensors_in((args, kwargs))
                    if t.device() is not None and t not in self._allocated]
        return frozen, versions

    def after_op(self, name: str, fn, out, rec, guard) -> None:
        """Record the op (after checking that it wrote no pre-existing buffer unsaved)."""
        (args, kwargs), versions = guard
        for t, before in versions:
            if self._unsaved_write(t, before):
                raise RuntimeError(f"ttnn_emu: {name} wrote an input in place without"
                                   " Tensor.mutable_shards, so a capture could not undo it")
        out = _freeze(out, self, {id(self.device): self.device})
        self.ops.append(TracedOp(name, fn, args, kwargs, out))
        self.records.append(rec)

    # --- end of capture ---------------------------------------------------------------------
    def finish(self) -> list:
        """Undo the capture run's effects on pre-existing state; return weak references to the
        tensors it produced, whose data is undefined until the trace runs."""
        for storage, saved in self._saved.values():
            storage.copy_(saved)
        if hasattr(self.device, "_core_rngs"):  # generators the capture run made or reseeded
            self.device._core_rngs.clear()  # start fresh at the first replay; the others resume
            for key, (gen, state) in self._rngs.items():
                gen.set_state(state)
                self.device._core_rngs[key] = gen
        external = {s.untyped_storage().data_ptr()
                    for t, buf in self._buffers.items() if not buf.internal for s in buf.shards}
        external |= set(self._saved)
        produced = []
        for t, buf in list(self._buffers.items()):
            if buf.internal and t._shards is not None and not any(
                    s.untyped_storage().data_ptr() in external for s in buf.shards):
                t._unwritten = True
                produced.append(weakref.ref(t))
        return produced

    def inputs(self) -> list[CapturedBuffer]:
        """The pre-existing buffers the trace reads or writes whose tensors are still alive
        (they must stay allocated while the trace is replayed)."""
        return [buf for t, buf in self._buffers.items()
                if not buf.internal and t._shards is not None]
