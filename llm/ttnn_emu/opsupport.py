"""Helpers shared by the emulated ops: input checks, output memory configs, per-chip mapping."""

from __future__ import annotations

import math

import torch

from .blockfloat import round_to_dtype
from .memory import MemoryConfig, ShardSpec, TensorMemoryLayout, shard_grid_extent
from .tensor import Tensor, make_tensor, pad_to, tile_padded_shape
from .types import TILE_SIZE, DataType, Layout


def require_device(t: Tensor, op: str, what: str = "input") -> None:
    """Raise unless `t` is an allocated device tensor."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {what} must be a ttnn Tensor, got {type(t).__name__}")
    if t.device() is None:
        raise RuntimeError(f"{op}: {what} must be on device")
    t.padded_shards()


def require_tile(t: Tensor, op: str, what: str = "input") -> None:
    """Raise unless `t` is in TILE layout."""
    if t.layout != Layout.TILE:
        raise RuntimeError(f"{op}: {what} must be in TILE layout")


def require_dtype(t: Tensor, dtypes, op: str, what: str = "input") -> None:
    """Raise unless `t.dtype` is one of `dtypes`."""
    if t.dtype not in dtypes:
        names = ", ".join(d.name for d in dtypes)
        raise RuntimeError(f"{op}: {what} dtype must be one of {names}, got {t.dtype.name}")


def same_device(op: str, *tensors) -> None:
    """Raise unless all tensors live on one device."""
    devs = {id(t.device()) for t in tensors if t is not None}
    if len(devs) > 1:
        raise RuntimeError(f"{op}: all tensors must be on the same device")


def floats(t: Tensor) -> list[torch.Tensor]:
    """Per-chip logical values as float32."""
    return [s.to(torch.float32) for s in t.logical_shards()]


def infer_shard_spec(layout: TensorMemoryLayout, grid_spec: ShardSpec, padded_shape) -> ShardSpec:
    """A shard spec for `padded_shape` on the grid of `grid_spec` (ttnn infers it the same way)."""
    rows = math.prod(padded_shape[:-1])
    width = padded_shape[-1]

    def up(n):
        return -(-n // TILE_SIZE) * TILE_SIZE

    ncores = grid_spec.num_cores()
    if layout == TensorMemoryLayout.HEIGHT_SHARDED:
        shape = (up(-(-rows // ncores)), width)
    elif layout == TensorMemoryLayout.WIDTH_SHARDED:
        shape = (rows, up(-(-width // ncores)))
    else:
        grows, gcols = shard_grid_extent(grid_spec)
        shape = (up(-(-rows // grows)), up(-(-width // gcols)))
    return ShardSpec(grid_spec.grid, shape, grid_spec.orientation)


def resolve_memory_config(
    requested: MemoryConfig | None, ref: Tensor, padded_shape, op: str
) -> MemoryConfig:
    """Output memory config: `requested`, else `ref`'s; a sharded config without a shard spec
    takes its grid from `ref` (ttnn infers it from the input), re-fit to the output shape."""
    mem = requested if requested is not None else ref.memory_config()
    if not mem.is_sharded():
        return mem
    if mem.shard_spec is not None:
        if requested is None and tuple(padded_shape) != tuple(ref.padded_shape):
            spec = infer_shard_spec(mem.memory_layout, mem.shard_spec, padded_shape)
            return MemoryConfig(mem.memory_layout, mem.buffer_type, spec)
        return mem
    ref_mem = ref.memory_config()
    if not ref_mem.is_sharded() or ref_mem.shard_spec is None:
        raise RuntimeError(
            f"{op}: output memory config {mem.memory_layout.name} has no shard_spec and the input"
            " is not sharded, so it cannot be inferred"
        )
    spec = infer_shard_spec(mem.memory_layout, ref_mem.shard_spec, padded_shape)
    return MemoryConfig(mem.memory_layout, mem.buffer_type, spec)


def output(
    ref: Tensor, values, *, dtype: DataType | None = None, layout: Layout | None = None,
    memory_config: MemoryConfig | None = None, op: str = "op", padded_shape=None,
) -> Tensor:
    """Build an op's output on `ref`'s device from per-chip logical values."""
    values = [values] if isinstance(values, torch.Tensor) else list(values)
    layout = layout or ref.layout
    shape = padded_shape or tile_padded_shape(values[0].shape, layout)
    mem = resolve_memory_config(memory_config, ref, shape, op)
    return make_tensor(values, dtype or ref.dtype, layout, mem, ref.device(),
                       padded_shape=padded_shape)


def write_output(out: Tensor, dest: Tensor | None, op: str = "op", *,
                 match_dtype: bool = False, match_layout: bool = False) -> Tensor:
    """ttnn's `output_tensor=` / `optional_output_tensor=`: copy the op's result `out` into the
    caller's preallocated `dest` in place and return `dest` (`out` when `dest` is None).

    The logical shapes must match. The values are rounded to `dest`'s dtype (block-float groups
    of `dest`'s tile padding included) as any write to `dest` is; `match_dtype` / `match_layout`
    make a dtype / layout difference an error instead (ops whose output spec is fixed).
    """
    if dest is None:
        return out
    if not isinstance(dest, Tensor):
        raise TypeError(f"{op}: output_tensor must be a ttnn Tensor, got {type(dest).__name__}")
    if tuple(dest.shape) != tuple(out.shape):
        raise RuntimeError(f"{op}: output_tensor shape {list(dest.shape)} does not match the"
                           f" op's output shape {list(out.shape)}")
    if match_dtype and dest.dtype != out.dtype:
        raise RuntimeError(f"{op}: output_tensor dtype {dest.dtype.name} does not match the op's"
                           f" output dtype {out.dtype.name}")
    if match_layout and dest.layout != out.layout:
        raise RuntimeError(f"{op}: output_tensor layout {dest.layout.name} does not match the"
                           f" op's output layout {out.layout.name}")
    if tuple(dest.padded_shape) == tuple(out.padded_shape):
        src = out.padded_shards()
    else:
        src = [pad_to(s, dest.padded_shape) for s in out.logical_shards()]
    if len(src) != dest.num_shards():
        raise RuntimeError(f"{op}: output_tensor has {dest.num_shards()} device buffers, the"
                           f" output {len(src)}")
    dest.write_shards([round_to_dtype(s, dest.dtype) for s in src])
    return dest


def normalize_dim(dim: int, rank: int) -> int:
    """Python-style negative dims."""
    if not -rank <= dim < rank:
        raise RuntimeError(f"dim {dim} out of range for rank {rank}")
    return dim % rank
