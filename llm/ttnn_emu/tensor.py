"""The emulated ttnn.Tensor: logical + padded shape, dtype, layout, memory config, host or device.

Values are stored per chip ("shard"; one per virtual device of a mesh, one on a single device or
host) at the *padded* shape, already rounded to the tensor's dtype, in the storage torch dtype of
types.storage_torch_dtype. Padding holds the pad value (0 unless told otherwise).
"""

from __future__ import annotations

import math
import weakref

import torch

from .blockfloat import round_to_dtype
from .memory import DRAM_MEMORY_CONFIG, MemoryConfig, validate_and_place
from .types import (
    BLOCK_FLOAT_DTYPES,
    TILE_SIZE,
    DataType,
    Layout,
    StorageType,
    check_supported,
    storage_bytes,
)


class Shape(tuple):
    """ttnn.Shape: a tuple of ints that prints like ttnn."""

    def __new__(cls, dims, /):
        return super().__new__(cls, (int(d) for d in dims))

    @property
    def rank(self) -> int:
        """Number of dims."""
        return len(self)

    def __eq__(self, other):
        if isinstance(other, (list, tuple)):
            return tuple(self) == tuple(other)
        return NotImplemented

    def __ne__(self, other):
        eq = self.__eq__(other)
        return eq if eq is NotImplemented else not eq

    __hash__ = tuple.__hash__

    def __repr__(self):
        return f"Shape({list(self)})"


def tile_padded_shape(shape, layout: Layout) -> tuple:
    """Padded shape: TILE pads the last two dims (the last one for rank 1) up to 32."""
    shape = tuple(int(d) for d in shape)
    if layout != Layout.TILE:
        return shape
    out = list(shape)
    for i in range(max(0, len(out) - 2), len(out)):
        out[i] = -(-out[i] // TILE_SIZE) * TILE_SIZE if out[i] else TILE_SIZE
    return tuple(out)


def check_layout_dtype(layout: Layout, dtype: DataType) -> None:
    """Block-float dtypes exist only in TILE layout (reference 0.1)."""
    check_supported(dtype)
    if dtype in BLOCK_FLOAT_DTYPES and layout != Layout.TILE:
        raise RuntimeError("Layout must be Layout::TILE for bfloat8_b or bfloat4_b")


def pad_to(x: torch.Tensor, padded_shape, pad_value=0.0) -> torch.Tensor:
    """Pad `x` at the end of each dim up to `padded_shape`."""
    if tuple(x.shape) == tuple(padded_shape):
        return x
    pads = []
    for have, want in zip(reversed(x.shape), reversed(padded_shape)):
        if want < have:
            raise RuntimeError(f"Cannot pad shape {tuple(x.shape)} to {tuple(padded_shape)}")
        pads += [0, want - have]
    if not x.is_floating_point():
        pad_value = int(pad_value)
    return torch.nn.functional.pad(x, pads, value=pad_value)


class Tensor:
    """An emulated ttnn.Tensor. Build with `make_tensor` or the host functions, not directly."""

    def __init__(self, shards, logical_shape, padded_shape, dtype, layout, memory_config, device):
        self._shards = list(shards)
        self._logical = Shape(logical_shape)
        self._padded = Shape(padded_shape)
        self._dtype = dtype
        self._layout = layout
        self._memory_config = memory_config
        self._device = device
        self._finalizer = None
        self._unwritten = False  # produced inside a trace capture, not yet executed
        if device is not None:
            placement = validate_and_place(
                padded_shape, dtype, layout, memory_config, device.num_worker_cores()
            )
            token = device._allocate(placement)
            if token is not None:
                self._finalizer = weakref.finalize(self, device._free, token)
            if device._capture is not None:
                device._capture.note_alloc(self)
        else:
            validate_and_place(padded_shape, dtype, layout, memory_config, 64)

    @classmethod
    def borrow(cls, shards, logical_shape, padded_shape, dtype, layout, memory_config,
               device) -> Tensor:
        """A tensor over existing per-chip storage that allocates nothing (trace replay)."""
        t = cls.__new__(cls)
        t._shards = list(shards)
        t._logical, t._padded = Shape(logical_shape), Shape(padded_shape)
        t._dtype, t._layout, t._memory_config = dtype, layout, memory_config
        t._device, t._finalizer, t._unwritten = device, None, False
        return t

    # --- metadata -------------------------------------------------------------------------
    @property
    def shape(self) -> Shape:
        """Logical shape."""
        return self._logical

    @property
    def padded_shape(self) -> Shape:
        """Padded (physical) shape."""
        return self._padded

    @property
    def dtype(self) -> DataType:
        """ttnn dtype."""
        return self._dtype

    @property
    def layout(self) -> Layout:
        """ROW_MAJOR or TILE."""
        return self._layout

    def get_dtype(self) -> DataType:
        """ttnn dtype."""
        return self._dtype

    def get_layout(self) -> Layout:
        """ROW_MAJOR or TILE."""
        return self._layout

    def memory_config(self) -> MemoryConfig:
        """The tensor's memory config (also recorded for host tensors)."""
        return self._memory_config

    def device(self):
        """The (mesh) device, or None on host."""
        return self._device

    def storage_type(self) -> StorageType:
        """HOST or DEVICE."""
        return StorageType.HOST if self._device is None else StorageType.DEVICE

    def is_sharded(self) -> bool:
        """True when the memory config is sharded."""
        return self._memory_config.is_sharded()

    def is_allocated(self) -> bool:
        """False after deallocate."""
        return self._shards is not None

    def num_shards(self) -> int:
        """Number of per-chip buffers (mesh devices) this tensor holds."""
        return len(self._check_alive())

    def shard_nbytes(self) -> int:
        """Bytes of one chip's buffer."""
        return storage_bytes(math.prod(self._padded), self._dtype)

    def deallocate(self, force: bool = True) -> None:
        """Free the device buffer; later use raises (a trace that captured it keeps its
        storage)."""
        capture = self._device._capture if self._device is not None else None
        if capture is not None and self._shards is not None:
            capture.note_free(self)
        if self._finalizer is not None:
            self._finalizer()
        self._shards = None

    # --- data -----------------------------------------------------------------------------
    def _check_alive(self):
        if self._shards is None:
            raise RuntimeError("Tensor is not allocated (it was deallocated)")
        return self._shards

    def _check_readable(self):
        if self._unwritten:
            raise RuntimeError(
                "Tensor was produced inside a trace capture and holds no data until"
                " execute_trace runs the trace (on a device its contents are undefined)"
            )
        return self._check_alive()

    def padded_shards(self) -> list[torch.Tensor]:
        """Per-chip storage at the padded shape (read only: writers use mutable_shards or
        write_shards)."""
        return self._check_readable()

    def logical_shards(self) -> list[torch.Tensor]:
        """Per-chip values at the logical shape, in the storage torch dtype."""
        idx = tuple(slice(0, d) for d in self._logical)
        return [s[idx] for s in self._check_readable()]

    def mutable_shards(self) -> list[torch.Tensor]:
        """Per-chip storage for an op that writes it in place. Every in-place write goes through
        here or write_shards, so a trace capture can undo its writes to pre-existing buffers."""
        cur = self._check_alive()
        capture = self._device._capture if self._device is not None else None
        if capture is not None:
            capture.before_write(self)
        return cur

    def write_shards(self, shards) -> None:
        """Overwrite the buffer in place with padded storage from another tensor of this spec."""
        cur = self.mutable_shards()
        if len(shards) != len(cur):
            raise RuntimeError(f"write_shards: {len(shards)} shards for a {len(cur)}-shard tensor")
        for dst, src in zip(cur, shards):
            dst.copy_(src)

    # --- conveniences matching ttnn.Tensor ---------------------------------------------------
    def to(self, device, memory_config=None):
        """Tensor.to(device, mem_config) == ttnn.to_device."""
        from .host import to_device

        return to_device(self, device, memory_config)

    def cpu(self, blocking: bool = True):
        """Tensor.cpu() == ttnn.from_device."""
        from .host import from_device

        return from_device(self, blocking)

    def to_torch(self):
        """Tensor.to_torch() == ttnn.to_torch."""
        from .host import to_torch

        return to_torch(self)

    def __getitem__(self, key):
        from .data_movement import slice_from_key

        return slice_from_key(self, key)

    def __repr__(self):
        where = "host" if self._device is None else f"device{self._device.id}"
        return (
            f"ttnn_emu.Tensor(shape={list(self._logical)}, padded={list(self._padded)},"
            f" {self._dtype.name}, {self._layout.name}, {where},"
            f" {self._memory_config.memory_layout.name}/{self._memory_config.buffer_type.name})"
        )


def make_tensor(
    values,
    dtype: DataType,
    layout: Layout,
    memory_config: MemoryConfig | None = None,
    device=None,
    pad_value=0.0,
    padded_shape=None,
) -> Tensor:
    """Build a Tensor from per-chip logical values (a torch tensor or a list of them).

    Pads to the layout's padded shape (or `padded_shape`), rounds to `dtype` (block-float groups
    see the padded values), validates the memory config and allocates on `device`.
    """
    shards = [values] if isinstance(values, torch.Tensor) else list(values)
    check_layout_dtype(layout, dtype)
    logical = tuple(shards[0].shape)
    for s in shards:
        if tuple(s.shape) != logical:
            raise RuntimeError(f"Mesh shards differ in shape: {tuple(s.shape)} vs {logical}")
    if padded_shape is None:
        padded_shape = tile_padded_shape(logical, layout)
    padded_shape = tuple(int(d) for d in padded_shape)
    if len(padded_shape) != len(logical) or any(p < d for p, d in zip(padded_shape, logical)):
        raise RuntimeError(f"Padded shape {padded_shape} does not hold logical shape {logical}")
    if layout == Layout.TILE and len(padded_shape) >= 1:
        if any(p % TILE_SIZE for p in padded_shape[-2:]):
            raise RuntimeError(f"TILE padded shape {padded_shape} must be a multiple of 32")
    if pad_value is None:
        pad_value = 0.0
    stored = [round_to_dtype(pad_to(s, padded_shape, pad_value), dtype) for s in shards]
    if device is not None and len(stored) not in (1, device.get_num_devices()):
        raise RuntimeError(
            f"{len(stored)} shards for a mesh of {device.get_num_devices()} devices"
        )
    if device is not None and len(stored) == 1 and device.get_num_devices() > 1:
        stored = [stored[0].clone() for _ in range(device.get_num_devices())]
    memory_config = memory_config or DRAM_MEMORY_CONFIG
    return Tensor(stored, logical, padded_shape, dtype, layout, memory_config, device)


def like(
    t: Tensor, values, *, dtype=None, layout=None, memory_config=None, padded_shape=None
) -> Tensor:
    """A new tensor on `t`'s device from per-chip logical values, defaulting to `t`'s spec."""
    return make_tensor(
        values,
        dtype or t.dtype,
        layout or t.layout,
        memory_config or t.memory_config(),
        t.device(),
        padded_shape=padded_shape,
    )
