"""Layout, memory and shape ops (reference 3). Values only change through dtype rounding."""

from __future__ import annotations

import builtins
import math

import torch

from .accounting import op
from .memory import (
    DRAM_MEMORY_CONFIG,
    BufferType,
    CoreGrid,
    MemoryConfig,
    ShardOrientation,
    ShardSpec,
    TensorMemoryLayout,
    grid_to_corerangeset,
)
from .opsupport import normalize_dim, output, require_device, write_output
from .tensor import Tensor, make_tensor, tile_padded_shape
from .types import BLOCK_FLOAT_DTYPES, DataType, Layout


def _rebuild(t: Tensor, *, dtype=None, layout=None, memory_config=None, pad_value=0.0) -> Tensor:
    """Same values, new dtype / layout / memory config, on the same device (or host)."""
    return make_tensor(
        t.logical_shards(), dtype or t.dtype, layout or t.layout,
        memory_config or t.memory_config(), t.device(), pad_value=pad_value,
    )


@op("to_layout")
def to_layout(tensor, layout, dtype=None, memory_config=None, sub_core_grids=None, pad_value=0.0):
    """ttnn.to_layout: TILE pads H and W to 32; ROW_MAJOR strips padding. Works on host."""
    if tensor.layout == layout and dtype in (None, tensor.dtype) and memory_config is None:
        return tensor
    return _rebuild(tensor, dtype=dtype, layout=layout, memory_config=memory_config,
                    pad_value=pad_value)


@op("tilize")
def tilize(input_tensor, *, memory_config=None, dtype=None, use_multicore=True, use_low_perf=False,
           tile=None, sub_core_grids=None):
    """ttnn.tilize: ROW_MAJOR -> TILE on device (32x32 tiles only)."""
    require_device(input_tensor, "tilize")
    if tile is not None:
        raise NotImplementedError("tilize(tile=...): only the default 32x32 tile is emulated")
    if input_tensor.layout != Layout.ROW_MAJOR:
        raise RuntimeError("tilize: input must be ROW_MAJOR")
    return _rebuild(input_tensor, dtype=dtype, layout=Layout.TILE, memory_config=memory_config)


@op("untilize")
def untilize(input_tensor, *, memory_config=None, use_multicore=True, sub_core_grids=None):
    """ttnn.untilize: TILE -> ROW_MAJOR on device (bf16/fp32/int inputs)."""
    require_device(input_tensor, "untilize")
    if input_tensor.layout != Layout.TILE:
        raise RuntimeError("untilize: input must be TILE")
    if input_tensor.dtype in BLOCK_FLOAT_DTYPES:
        raise RuntimeError("untilize: block-float input cannot be ROW_MAJOR; typecast first")
    return _rebuild(input_tensor, layout=Layout.ROW_MAJOR, memory_config=memory_config)


@op("to_memory_config")
def to_memory_config(tensor, memory_config, dtype=None, output_tensor=None):
    """ttnn.to_memory_config: move between DRAM/L1 and interleaved/sharded (optional cast)."""
    require_device(tensor, "to_memory_config")
    if memory_config.is_sharded() and memory_config.shard_spec is None:
        raise RuntimeError("to_memory_config: a sharded memory config needs a shard_spec")
    out = _rebuild(tensor, dtype=dtype, memory_config=memory_config)
    return _into(out, output_tensor)


def _into(out: Tensor, output_tensor: Tensor | None) -> Tensor:
    # the output spec of a data-movement op is fixed: dtype and layout must match too
    return write_output(out, output_tensor, "output_tensor", match_dtype=True, match_layout=True)


_SCHEME = {
    TensorMemoryLayout.HEIGHT_SHARDED,
    TensorMemoryLayout.WIDTH_SHARDED,
    TensorMemoryLayout.BLOCK_SHARDED,
}


@op("interleaved_to_sharded")
def interleaved_to_sharded(
    input_tensor, sharded_memory_config=None, shard_shape=None, shard_scheme=None,
    shard_orientation=None, output_dtype=None, *, keep_l1_aligned=False,
    preallocated_output=None, grid=None,
):
    """ttnn.interleaved_to_sharded(input, sharded_memory_config, output_dtype=None) or the
    overload (input, grid, shard_shape, shard_scheme, shard_orientation, output_dtype=None)."""
    require_device(input_tensor, "interleaved_to_sharded")
    if input_tensor.is_sharded():
        raise RuntimeError("interleaved_to_sharded: input must be interleaved")
    if isinstance(sharded_memory_config, MemoryConfig):
        mem = sharded_memory_config
        if isinstance(shard_shape, DataType):  # (input, memcfg, output_dtype)
            output_dtype = shard_shape
    else:
        grid = sharded_memory_config if grid is None else grid
        if isinstance(grid, CoreGrid):
            grid = grid_to_corerangeset(grid)
        if shard_scheme not in _SCHEME:
            raise RuntimeError(f"interleaved_to_sharded: bad shard scheme {shard_scheme}")
        spec = ShardSpec(grid, shard_shape, shard_orientation or ShardOrientation.ROW_MAJOR)
        mem = MemoryConfig(shard_scheme, BufferType.L1, spec)
    if not mem.is_sharded() or mem.shard_spec is None:
        raise RuntimeError("interleaved_to_sharded: needs a sharded memory config with shard_spec")
    out = _rebuild(input_tensor, dtype=output_dtype, memory_config=mem)
    return _into(out, preallocated_output)


@op("sharded_to_interleaved")
def sharded_to_interleaved(input_tensor, memory_config=None, output_dtype=None):
    """ttnn.sharded_to_interleaved: identity on values, optional cast."""
    require_device(input_tensor, "sharded_to_interleaved")
    if not input_tensor.is_sharded():
        raise RuntimeError("sharded_to_interleaved: input must be sharded")
    mem = memory_config or DRAM_MEMORY_CONFIG
    if mem.is_sharded():
        raise RuntimeError("sharded_to_interleaved: output memory config must be interleaved")
    return _rebuild(input_tensor, dtype=output_dtype, memory_config=mem)


def _resolve_shape(shape, volume: int) -> tuple:
    shape = [int(d) for d in shape]
    if shape.count(-1) > 1:
        raise RuntimeError("reshape: only one dim may be -1")
    if -1 in shape:
        rest = math.prod(d for d in shape if d != -1)
        if rest == 0 or volume % rest:
            raise RuntimeError(f"reshape: cannot infer -1 for volume {volume} and shape {shape}")
        shape[shape.index(-1)] = volume // rest
    if math.prod(shape) != volume:
        raise RuntimeError(f"reshape: volume of {shape} != {volume}")
    return tuple(shape)


@op("reshape")
def reshape(input_tensor, shape, padded_shape=None, *, memory_config=None, pad_value=None,
            reshape_tile_mode=None, sub_core_grids=None, skip_padding_fill=False):
    """ttnn.reshape(input, shape[, padded_shape]): the logical volume must not change, except
    that with an explicit TILE `padded_shape` of the same padded volume the logical shape is a
    window of it (`reshape(x, (1,1,B,W), (1,1,32,W))` keeps B real rows of a 32-row tile)."""
    # logical [..] -> shape; padded defaults to the layout's tile padding of `shape`
    vol = math.prod(input_tensor.shape)
    if padded_shape is not None:
        padded_shape = tuple(int(d) for d in padded_shape)
        if input_tensor.layout == Layout.ROW_MAJOR and padded_shape != tuple(shape):
            raise RuntimeError("reshape: ROW_MAJOR tensors cannot carry padding")
        windowed = (-1 not in shape and math.prod(shape) != vol
                    and input_tensor.layout == Layout.TILE)
        if windowed:
            new = tuple(int(d) for d in shape)
            if math.prod(padded_shape) != math.prod(input_tensor.padded_shape):
                raise RuntimeError(f"reshape: padded volume of {list(padded_shape)} != "
                                   f"{math.prod(input_tensor.padded_shape)}")
            if len(new) != len(padded_shape) or any(n > p for n, p in zip(new, padded_shape)):
                raise RuntimeError(f"reshape: logical {list(new)} exceeds padded "
                                   f"{list(padded_shape)}")
            window = tuple(builtin_slice(0, n) for n in new)
            values = [s.reshape(padded_shape)[window] for s in input_tensor.padded_shards()]
            mem = memory_config or input_tensor.memory_config()
            return make_tensor(values, input_tensor.dtype, input_tensor.layout, mem,
                               input_tensor.device(), pad_value=pad_value or 0.0,
                               padded_shape=padded_shape)
    new = _resolve_shape(shape, vol)
    values = [s.reshape(new) for s in input_tensor.logical_shards()]
    mem = memory_config or input_tensor.memory_config()
    return make_tensor(values, input_tensor.dtype, input_tensor.layout, mem,
                       input_tensor.device(), pad_value=pad_value or 0.0,
                       padded_shape=padded_shape)


@op("unsqueeze_to_4D")
def unsqueeze_to_4D(tensor):  # noqa: N802 (ttnn's name)
    """ttnn.unsqueeze_to_4D: left-pad the shape with 1s to rank 4. Works on host."""
    if len(tensor.shape) > 4:
        raise RuntimeError("unsqueeze_to_4D: rank > 4")
    new = (1,) * (4 - len(tensor.shape)) + tuple(tensor.shape)
    return make_tensor([s.reshape(new) for s in tensor.logical_shards()], tensor.dtype,
                       tensor.layout, tensor.memory_config(), tensor.device())


@op("slice")
def slice(input_tensor, slice_start, slice_end, slice_step=None, *, memory_config=None,  # noqa: A001
          output_tensor=None, pad_value=None, sub_core_grids=None):
    """ttnn.slice: per-dim [start, end) with optional step. Device-only (as in 0.81)."""
    require_device(input_tensor, "slice")
    rank = len(input_tensor.shape)
    if isinstance(slice_start, Tensor) or isinstance(slice_end, Tensor):
        raise RuntimeError("ttnn_emu: tensor-valued slice bounds are not supported")
    if len(slice_start) != rank or len(slice_end) != rank:
        raise RuntimeError(f"slice: start/end must have {rank} entries")
    step = list(slice_step) if slice_step is not None else [1] * rank
    if any(s != 1 for s in step) and input_tensor.dtype == DataType.BFLOAT8_B:
        raise RuntimeError("slice: strided slicing is not supported for bfloat8_b")
    idx = []
    for d in range(rank):
        size = input_tensor.shape[d]
        start, end = int(slice_start[d]), int(slice_end[d])
        start = start + size if start < 0 else start
        end = end + size if end < 0 else end
        if not 0 <= start < end <= size or step[d] < 1:
            raise RuntimeError(f"slice: bad range [{start}, {end}) step {step[d]} for dim {d}")
        idx.append(builtin_slice(start, end, step[d]))
    values = [s[tuple(idx)] for s in input_tensor.logical_shards()]  # [.., end-start, ..]
    mem = memory_config
    if mem is None and input_tensor.is_sharded():
        mem = MemoryConfig(TensorMemoryLayout.INTERLEAVED, input_tensor.memory_config().buffer_type)
    out = output(input_tensor, values, memory_config=mem, op="slice")
    return _into(out, output_tensor)


builtin_slice = builtins.slice


def slice_from_key(tensor: Tensor, key) -> Tensor:
    """Tensor[...] indexing with plain slices (no integer indexing), as ttnn allows."""
    if not isinstance(key, tuple):
        key = (key,)
    rank = len(tensor.shape)
    if Ellipsis in key:
        i = key.index(Ellipsis)
        key = key[:i] + (builtin_slice(None),) * (rank - len(key) + 1) + key[i + 1:]
    key = key + (builtin_slice(None),) * (rank - len(key))
    starts, ends, steps = [], [], []
    for d, k in enumerate(key):
        if not isinstance(k, builtin_slice):
            raise RuntimeError("Tensor indexing supports slices only")
        a, b, c = k.indices(tensor.shape[d])
        starts.append(a)
        ends.append(b)
        steps.append(c)
    return slice(tensor, starts, ends, steps)


@op("concat")
def concat(tensors, dim=0, *, memory_config=None, output_tensor=None, groups=1,
           sub_core_grids=None):
    """ttnn.concat: torch.cat of device tensors (same dtype and layout). Device-only."""
    if groups != 1:
        raise RuntimeError("ttnn_emu: concat(groups != 1) is not supported")
    if not tensors:
        raise RuntimeError("concat: no tensors")
    first = tensors[0]
    for t in tensors:
        require_device(t, "concat")
        if t.dtype != first.dtype or t.layout != first.layout:
            raise RuntimeError("concat: all inputs must have the same dtype and layout")
        if len(t.shape) != len(first.shape) or t.device() is not first.device():
            raise RuntimeError("concat: inputs must have equal rank and share a device")
    dim = normalize_dim(dim, len(first.shape))
    n = first.num_shards()
    values = [torch.cat([t.logical_shards()[i] for t in tensors], dim=dim) for i in range(n)]
    out = output(first, values, memory_config=memory_config or DRAM_MEMORY_CONFIG, op="concat")
    return _into(out, output_tensor)


@op("typecast")
def typecast(input_tensor, dtype, output_dtype=None, *, memory_config=None, output_tensor=None,
             sub_core_grids=None):
    """ttnn.typecast(input, dtype) or (input, input_dtype, output_dtype). Works on host."""
    if output_dtype is not None:
        if input_tensor.dtype != dtype:
            raise RuntimeError(f"typecast: input dtype is {input_tensor.dtype.name}, not {dtype}")
        dtype = output_dtype
    if input_tensor.device() is None and dtype in _HOST_INT_DTYPES:
        out = _host_int_cast(input_tensor, dtype, memory_config)
    else:  # on device: the reference's typecast (truncate, clamp to the integer range)
        out = _rebuild(input_tensor, dtype=dtype, memory_config=memory_config)
    return _into(out, output_tensor)


_HOST_INT_DTYPES = (DataType.UINT32, DataType.INT32, DataType.UINT16)


def _host_int_cast(t: Tensor, dtype: DataType, memory_config=None) -> Tensor:
    """Host typecast / to_dtype to an integer dtype: ttnn 0.81.1 converts as from_torch does
    (integers wrap; out-of-range floats per host.host_integer_values, e.g. -2.7 -> uint32
    4294967294, 1e10 -> int32 -2**31; a ROW_MAJOR buffer's last numel % 8 values take the
    scalar path, 1e10 -> uint32 1410065408 there, 2**31 elsewhere)."""
    from .host import host_integer_values

    tail = t.layout == Layout.ROW_MAJOR
    values = [host_integer_values(s, dtype, scalar_tail=tail) for s in t.logical_shards()]
    return make_tensor(values, dtype, t.layout, memory_config or t.memory_config(), None)


def to_dtype(tensor, dtype):
    """ttnn.to_dtype: host-side dtype conversion."""
    if tensor.device() is not None:
        raise RuntimeError("to_dtype works on host tensors; use typecast on device")
    if dtype in _HOST_INT_DTYPES:
        return _host_int_cast(tensor, dtype)
    return _rebuild(tensor, dtype=dtype)


@op("permute")
def permute(input_tensor, dims, *, memory_config=None, pad_value=0.0):
    """ttnn.permute (device-only)."""
    require_device(input_tensor, "permute")
    values = [s.permute(*dims) for s in input_tensor.logical_shards()]
    return output(input_tensor, values, memory_config=memory_config or DRAM_MEMORY_CONFIG,
                  op="permute")


@op("transpose")
def transpose(input_tensor, dim1, dim2, *, memory_config=None, pad_value=0.0):
    """ttnn.transpose (device-only)."""
    require_device(input_tensor, "transpose")
    values = [s.transpose(dim1, dim2) for s in input_tensor.logical_shards()]
    return output(input_tensor, values, memory_config=memory_config or DRAM_MEMORY_CONFIG,
                  op="transpose")


@op("clone")
def clone(input, *, dtype=None, memory_config=None, compute_kernel_config=None):  # noqa: A002
    """ttnn.clone: a copy, optionally cast / moved (ttnn 0.81.1 names the argument `input`)."""
    input_tensor = input
    require_device(input_tensor, "clone")
    return _rebuild(input_tensor, dtype=dtype, memory_config=memory_config)


__all__ = [
    "clone", "concat", "interleaved_to_sharded", "permute", "reshape", "sharded_to_interleaved",
    "slice", "tile_padded_shape", "tilize", "to_dtype", "to_layout",
    "to_memory_config", "transpose", "typecast", "unsqueeze_to_4D", "untilize",
]
