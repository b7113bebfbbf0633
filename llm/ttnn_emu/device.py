"""Devices, virtual meshes, mesh mappers and composers (reference 1).

A MeshDevice of rows x cols virtual chips; a single device is a 1x1 mesh. Every device tensor
holds one buffer per chip, in row-major device order.
"""

from __future__ import annotations

import enum
import itertools
from collections import defaultdict

import torch

from .accounting import OpLog
from .memory import WORMHOLE_L1_BYTES_PER_CORE, CoreCoord, CoreGrid
from .trace_capture import program_key

DEFAULT_L1_SMALL_SIZE = 0
DEFAULT_TRACE_REGION_SIZE = 0
DEFAULT_WORKER_L1_SIZE = 0  # 0 = the architecture's L1 size (as in ttnn)

_next_id = itertools.count()


class FabricConfig(enum.Enum):
    """ttnn.FabricConfig (recorded; the emulator's CCLs need no fabric)."""

    DISABLED = 0
    FABRIC_1D = 1
    FABRIC_1D_RING = 2
    FABRIC_2D = 3


_fabric = {"config": FabricConfig.DISABLED}


def set_fabric_config(config, reliability_mode=None, num_planes=None, fabric_tensix_config=None,
                      fabric_udm_mode=None, fabric_manager_mode=None, router_config=None) -> None:
    """ttnn.set_fabric_config: records the fabric mode (the other settings do not change what
    the emulator computes)."""
    _fabric["config"] = config


class MeshShape(tuple):
    """ttnn.MeshShape(rows, cols) or MeshShape((rows, cols)); positional (ttnn names them s0,
    s1)."""

    def __new__(cls, rows, cols=None, /):
        if cols is None:
            rows, cols = rows
        if rows < 1 or cols < 1:
            raise RuntimeError(f"Invalid mesh shape {rows}x{cols}")
        return super().__new__(cls, (int(rows), int(cols)))

    def num_devices(self) -> int:
        """rows * cols."""
        return self[0] * self[1]


class MeshDevice:
    """An emulated (mesh) device. Holds L1 bookkeeping, the op log and trace state."""

    def __init__(self, mesh_shape, l1_small_size=0, trace_region_size=0, worker_l1_size=0):
        self.id = next(_next_id)
        self._shape = MeshShape(*mesh_shape)
        self.l1_small_size = l1_small_size
        self.trace_region_size = trace_region_size
        total = worker_l1_size or WORMHOLE_L1_BYTES_PER_CORE
        self.l1_budget_per_core = total - l1_small_size
        self._l1_used: dict = defaultdict(int)
        self._allocs: dict = {}
        self._alloc_ids = itertools.count()
        self._open = True
        self.op_log = OpLog()
        self._program_cache = False
        self._program_keys: set = set()
        self._compiled: set = set()  # program keys run outside a capture (trace_capture.py)
        self._capture = None  # the trace_capture.Capture in progress
        self._traces: dict = {}
        self._replaying = False

    # --- ttnn API -------------------------------------------------------------------------
    @property
    def shape(self) -> MeshShape:
        """Mesh shape (rows, cols)."""
        return self._shape

    def get_num_devices(self) -> int:
        """Number of virtual chips."""
        return self._shape.num_devices()

    def compute_with_storage_grid_size(self) -> CoreCoord:
        """Worker grid of one chip (8x8 on an N150 Wormhole, reference 1)."""
        return CoreCoord(8, 8)

    @property
    def core_grid(self) -> CoreGrid:
        """Worker grid as a CoreGrid."""
        g = self.compute_with_storage_grid_size()
        return CoreGrid(x=g.x, y=g.y)

    def dram_grid_size(self) -> CoreCoord:
        """DRAM banks: 12 on Wormhole (reference 0.2)."""
        return CoreCoord(12, 1)

    def enable_program_cache(self) -> None:
        """Program caching has no numeric effect; entries are counted per op name."""
        self._program_cache = True

    def disable_and_clear_program_cache(self) -> None:
        """Stop counting program cache entries and clear them."""
        self._program_cache = False
        self._program_keys.clear()
        self._compiled.clear()

    def num_program_cache_entries(self) -> int:
        """Distinct ops run since the cache was enabled."""
        return len(self._program_keys)

    def num_worker_cores(self) -> int:
        """Cores over which L1-interleaved buffers are spread."""
        g = self.compute_with_storage_grid_size()
        return g.x * g.y

    def set_l1_budget_per_core(self, nbytes: int) -> None:
        """Override the per-core L1 budget (bytes) that sharded / L1 tensors must fit in."""
        self.l1_budget_per_core = int(nbytes)

    def l1_used(self, core=None) -> int:
        """Bytes of L1 allocated on `core` (or the busiest core)."""
        if core is None:
            return max(self._l1_used.values(), default=0)
        return self._l1_used[core]

    # --- emulator internals ----------------------------------------------------------------
    def _require_open(self):
        if not self._open:
            raise RuntimeError("Device is closed")

    def _allocate(self, placement: dict) -> int | None:
        """Charge a new buffer's L1; None (nothing charged) while a trace replays, whose
        buffers were allocated at capture."""
        self._require_open()
        if self._replaying:
            return None
        for core, nbytes in placement.items():
            if self._l1_used[core] + nbytes > self.l1_budget_per_core:
                raise RuntimeError(
                    f"Out of L1: allocating {nbytes} B on core ({core.x},{core.y}) with "
                    f"{self._l1_used[core]} B in use exceeds the {self.l1_budget_per_core} B "
                    "per-core L1 budget"
                )
        for core, nbytes in placement.items():
            self._l1_used[core] += nbytes
        token = next(self._alloc_ids)
        self._allocs[token] = placement
        return token

    def _free(self, token: int) -> None:
        for core, nbytes in self._allocs.pop(token, {}).items():
            self._l1_used[core] -= nbytes

    def _before_op(self, name: str, args, kwargs):
        """Called by every top-level op before it runs; returns what _after_op needs."""
        self._require_open()
        if self._program_cache:
            self._program_keys.add(name)
        if self._capture is not None:
            return self._capture.before_op(name, args, kwargs, self._compiled)
        self._compiled.add(program_key(name, args, kwargs))
        return None

    def _after_op(self, fn, out, rec, guard) -> None:
        """Called by every top-level op after it ran: log its cost; record it in a capture."""
        self.op_log.add(rec)
        if self._capture is not None:
            self._capture.after_op(rec.name, fn, out, rec, guard)

    def _check_no_host_io(self, what: str, kind: str = "Writes are") -> None:
        """Raise inside a trace capture: `kind` names the rule, as ttnn's message does."""
        if self._capture is not None:
            raise RuntimeError(f"{kind} not supported during trace capture: {what} is not"
                               " allowed while a trace is being captured")

    def __repr__(self):
        return f"MeshDevice(id={self.id}, shape={tuple(self._shape)})"


Device = MeshDevice


def open_device(
    *, device_id: int = 0, l1_small_size: int = DEFAULT_L1_SMALL_SIZE,
    trace_region_size: int = DEFAULT_TRACE_REGION_SIZE, dispatch_core_config=None,
    worker_l1_size: int = DEFAULT_WORKER_L1_SIZE,
) -> MeshDevice:
    """ttnn.open_device: one virtual chip (a 1x1 mesh)."""
    return MeshDevice((1, 1), l1_small_size, trace_region_size, worker_l1_size)


def close_device(device: MeshDevice) -> None:
    """ttnn.close_device."""
    device._open = False


def open_mesh_device(
    mesh_shape=None, l1_small_size=DEFAULT_L1_SMALL_SIZE,
    trace_region_size=DEFAULT_TRACE_REGION_SIZE, num_command_queues=1, dispatch_core_config=None,
    offset=None, physical_device_ids=(), worker_l1_size=DEFAULT_WORKER_L1_SIZE,
) -> MeshDevice:
    """ttnn.open_mesh_device: rows x cols virtual chips (default 1x1)."""
    shape = mesh_shape if mesh_shape is not None else MeshShape(1, 1)
    return MeshDevice(tuple(shape), l1_small_size, trace_region_size, worker_l1_size)


def close_mesh_device(mesh_device: MeshDevice) -> None:
    """ttnn.close_mesh_device."""
    mesh_device._open = False


def synchronize_device(device, cq_id=None, sub_device_ids=()) -> None:
    """ttnn.synchronize_device: the emulator runs ops eagerly, so nothing is outstanding.
    Refused inside a trace capture, as on a device."""
    device._require_open()
    device._check_no_host_io("synchronize_device", "Event Synchronization is")


# --- mappers and composers ----------------------------------------------------------------------
def _chunks(x: torch.Tensor, dim: int, n: int) -> list[torch.Tensor]:
    if x.shape[dim] % n:
        raise RuntimeError(f"Cannot shard dim {dim} of size {x.shape[dim]} over {n} devices")
    return list(torch.chunk(x, n, dim=dim))


class ReplicateTensorToMesh:
    """ttnn.ReplicateTensorToMesh: the same tensor on every chip."""

    def __init__(self, mesh_device: MeshDevice):
        self.mesh_device = mesh_device

    def map(self, x: torch.Tensor) -> list[torch.Tensor]:
        """One copy per chip."""
        return [x] * self.mesh_device.get_num_devices()


class ShardTensorToMesh:
    """ttnn.ShardTensorToMesh(mesh_device, dim): equal chunks of `dim` in row-major order."""

    def __init__(self, mesh_device: MeshDevice, dim: int):
        self.mesh_device = mesh_device
        self.dim = dim

    def map(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Chunk i goes to chip i."""
        return _chunks(x, self.dim, self.mesh_device.get_num_devices())


class ShardTensor2dMesh:
    """ttnn.ShardTensor2dMesh(mesh_device, mesh_shape, dims): dims[0] over rows, dims[1] cols."""

    def __init__(self, mesh_device: MeshDevice, mesh_shape, dims):
        self.mesh_device = mesh_device
        self.mesh_shape = tuple(mesh_shape)
        self.dims = tuple(dims)
        if self.mesh_shape != tuple(mesh_device.shape):
            raise RuntimeError(f"Mapper mesh_shape {self.mesh_shape} != {tuple(mesh_device.shape)}")

    def map(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Split by rows then columns; None replicates along that axis."""
        rows, cols = self.mesh_shape
        row_parts = [x] * rows if self.dims[0] is None else _chunks(x, self.dims[0], rows)
        out = []
        for part in row_parts:
            out += [part] * cols if self.dims[1] is None else _chunks(part, self.dims[1], cols)
        return out


class ConcatMeshToTensor:
    """ttnn.ConcatMeshToTensor(mesh_device, dim): concatenate all chips' tensors along dim."""

    def __init__(self, mesh_device: MeshDevice, dim: int):
        self.mesh_device = mesh_device
        self.dim = dim

    def compose(self, shards: list[torch.Tensor]) -> torch.Tensor:
        """cat(shards, dim)."""
        return torch.cat(shards, dim=self.dim)


class ConcatMesh2dToTensor:
    """ttnn.ConcatMesh2dToTensor(mesh_device, mesh_shape, dims): rows on dims[0], cols dims[1]."""

    def __init__(self, mesh_device: MeshDevice, mesh_shape, dims):
        self.mesh_device = mesh_device
        self.mesh_shape = tuple(mesh_shape)
        self.dims = tuple(dims)
        if self.dims[0] == self.dims[1]:
            raise RuntimeError("ConcatMesh2dToTensor needs two different dims")

    def compose(self, shards: list[torch.Tensor]) -> torch.Tensor:
        """cat over columns within each row, then over rows."""
        rows, cols = self.mesh_shape
        row_tensors = [
            torch.cat(shards[r * cols : (r + 1) * cols], dim=self.dims[1]) for r in range(rows)
        ]
        return torch.cat(row_tensors, dim=self.dims[0])


def replicate_tensor_to_mesh_mapper(mesh_device) -> ReplicateTensorToMesh:
    """ttnn.replicate_tensor_to_mesh_mapper."""
    return ReplicateTensorToMesh(mesh_device)


def shard_tensor_to_mesh_mapper(mesh_device, dim) -> ShardTensorToMesh:
    """ttnn.shard_tensor_to_mesh_mapper."""
    return ShardTensorToMesh(mesh_device, dim)
