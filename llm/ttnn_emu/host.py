"""Host <-> device transfers, tensor caching and allocation (reference 2)."""

from __future__ import annotations

import os

import torch

from .accounting import op
from .device import ReplicateTensorToMesh as _Replicate
from .memory import (
    DRAM_MEMORY_CONFIG,
    BufferType,
    CoreCoord,
    CoreRange,
    CoreRangeSet,
    MemoryConfig,
    ShardOrientation,
    ShardSpec,
    TensorMemoryLayout,
)
from .tensor import Tensor, make_tensor, tile_padded_shape
from .types import BLOCK_FLOAT_DTYPES, TILE_SIZE, DataType, Layout, dtype_from_torch, to_torch_dtype

_INT_BITS = {DataType.UINT32: (32, False), DataType.INT32: (32, True), DataType.UINT16: (16, False)}


def host_integer_values(tensor: torch.Tensor, dtype: DataType, *,
                        scalar_tail: bool = False) -> torch.Tensor:
    """Values ttnn's host conversion stores for an integer `dtype` (int64 torch tensor).

    Read off ttnn 0.81.1 (from_torch and host typecast / to_dtype, which agree, under the mock
    N150 descriptor): integer inputs wrap modulo 2**bits (int64 -1 -> uint32 4294967295, 2**31 ->
    int32 -2**31, 70000 -> uint16 4464). Float inputs truncate toward zero; int32 gives -2**31 for
    anything outside [-2**31, 2**31) and for nan/inf; uint32 wraps truncated values in
    (-2**31-1, 2**32) (-2.5 -> 4294967294) and gives 2**31 for anything else (float64: 0 above the
    range and for +inf); uint16 takes the int32 result saturated to [0, 65535] (float64:
    modulo 2**16). Out-of-range float -> int is undefined behaviour in C++: that is ttnn's 8-lane
    SIMD path. With `scalar_tail` (a ROW_MAJOR buffer), the last numel % lanes values of the
    flattened tensor take ttnn's scalar path instead (lanes: 4 for float32 -> uint16 and for
    float64 sources, else 8): uint32 is the truncated value modulo 2**32 when it fits an int64,
    else 0 (1e10 -> 1410065408, nan -> 0); int32 as above; uint16 the int32 result modulo 2**16
    (-2.7 -> 65534). ttnn converts float64 before tile padding, other floats after.
    """
    bits, signed = _INT_BITS[dtype]
    if not tensor.is_floating_point():
        v = tensor.to(torch.int64) % (1 << bits)
        return torch.where(v >= 1 << (bits - 1), v - (1 << bits), v) if signed else v
    simd = _simd_integer_values(tensor, dtype)
    narrow = tensor.dtype == torch.float64 or (
        tensor.dtype == torch.float32 and dtype == DataType.UINT16)
    tail = tensor.numel() % (4 if narrow else 8) if scalar_tail else 0
    if not tail:
        return simd
    x = tensor.reshape(-1)[-tail:].to(torch.float64)
    ok = torch.isfinite(x)
    t = torch.where(ok, x, torch.zeros_like(x)).trunc()
    i32 = torch.where(ok & (t >= -(2**31)) & (t < 2**31), t, torch.full_like(t, -(2**31)))
    if dtype == DataType.UINT32:
        fits = ok & (t >= -(2.0**63)) & (t < 2.0**63)
        scalar = torch.where(fits, t, torch.zeros_like(t)).to(torch.int64) % 2**32
    elif dtype == DataType.UINT16:
        scalar = i32.to(torch.int64) % 2**16
    else:
        scalar = i32.to(torch.int64)
    flat = simd.reshape(-1).clone()
    flat[-tail:] = scalar
    return flat.reshape(simd.shape)


def _simd_integer_values(tensor: torch.Tensor, dtype: DataType) -> torch.Tensor:
    """host_integer_values of a float tensor on ttnn's 8-lane SIMD path."""
    x = tensor.to(torch.float64)
    ok = torch.isfinite(x)
    t = torch.where(ok, x, torch.zeros_like(x)).trunc()
    as_i32 = ok & (t >= -(2**31)) & (t < 2**31)
    i32 = torch.where(as_i32, t, torch.full_like(t, -(2**31))).to(torch.int64)
    if dtype == DataType.INT32:
        return i32
    wide = tensor.dtype == torch.float64
    if dtype == DataType.UINT16:
        return i32 % 2**16 if wide else i32.clamp(0, 2**16 - 1)
    high = ok & (t >= 2**31) & (t < 2**32)
    other = torch.full_like(t, 2**31)
    if wide:  # above the range and +inf -> 0; below the range, -inf and nan -> 2**31
        other = torch.where(x > 0, torch.zeros_like(t), other)
    u = torch.where(high, t, other).to(torch.int64)
    return torch.where(as_i32, i32 % 2**32, u)



def _mesh_values(tensor: torch.Tensor, device, mesh_mapper) -> list[torch.Tensor]:
    if mesh_mapper is not None:
        return mesh_mapper.map(tensor)
    return [tensor]


def from_torch(
    tensor, dtype=None, *, spec=None, tile=None, pad_value=None, layout=None, device=None,
    memory_config=None, mesh_mapper=None, cq_id=None, preserve_nan_values=False,
    col_tilize=False, enable_bfloat_opt=False,
):
    """ttnn.from_torch: convert (round, pad, shard over a mesh) and optionally move to a device."""
    if tensor is None:
        return None
    if spec is not None:
        raise RuntimeError("ttnn_emu: from_torch(spec=...) is not supported; pass dtype/layout")
    if tile is not None and tuple(getattr(tile, "tile_shape", tile)) != (TILE_SIZE, TILE_SIZE):
        raise RuntimeError("ttnn_emu: only 32x32 tiles are supported")
    if dtype is None:
        dtype = dtype_from_torch(tensor.dtype)
    if layout is None:
        layout = Layout.TILE if dtype in BLOCK_FLOAT_DTYPES else Layout.ROW_MAJOR
    if col_tilize:
        if dtype not in BLOCK_FLOAT_DTYPES:
            raise RuntimeError("col_tilize is only supported for bfloat8_b / bfloat4_b")
        tensor = tensor.transpose(-2, -1)  # [..., K, N] -> [..., N, K]
    if device is not None:
        device._check_no_host_io("from_torch to a device")
    tensor = tensor.detach()
    if dtype in _INT_BITS:  # the buffer's last numel % lanes values take the scalar path
        tail = layout == Layout.ROW_MAJOR or tensor.dtype == torch.float64  # before padding
        tensor = host_integer_values(tensor, dtype, scalar_tail=tail and mesh_mapper is None)
    values = _mesh_values(tensor, device, mesh_mapper)
    return make_tensor(
        values, dtype, layout, memory_config or DRAM_MEMORY_CONFIG, device,
        pad_value=pad_value if pad_value is not None else 0.0,
    )


def to_torch(tensor, dtype=None, *, torch_rank=None, mesh_composer=None, device=None, cq_id=None):
    """ttnn.to_torch: values at the logical shape (device tensors are read back first)."""
    if tensor.device() is not None:
        tensor.device()._check_no_host_io("to_torch of a device tensor", "Reads are")
    shards = tensor.logical_shards()
    out_dtype = to_torch_dtype(tensor.dtype)
    if mesh_composer is not None:
        result = mesh_composer.compose([s.to(torch.float32) if s.is_floating_point() else s
                                        for s in shards])
    else:
        if len(shards) != 1:
            raise RuntimeError(
                f"to_torch of a tensor with {len(shards)} device shards needs a mesh_composer"
            )
        result = shards[0]
    result = result.to(out_dtype)
    if torch_rank is not None:
        while result.dim() > torch_rank:
            if result.shape[0] != 1:
                raise RuntimeError(f"torch_rank={torch_rank}: leading dim {result.shape[0]} != 1")
            result = result.squeeze(0)
    if dtype is not None:
        result = result.to(dtype)
    return result.clone()


def to_device(tensor, device, memory_config=None, *, queue_id=None):
    """ttnn.to_device: a new device tensor (DRAM interleaved unless told otherwise)."""
    if tensor.device() is not None:
        if tensor.device() is device:
            return tensor
        raise RuntimeError("to_device: tensor is already on another device")
    device._check_no_host_io("to_device")
    mem = memory_config or DRAM_MEMORY_CONFIG
    return Tensor(
        _replicate_for(tensor, device), tensor.shape, tensor.padded_shape, tensor.dtype,
        tensor.layout, mem, device,
    )


def _replicate_for(tensor, device) -> list[torch.Tensor]:
    shards = tensor.padded_shards()
    n = device.get_num_devices()
    if len(shards) == 1:
        return [shards[0].clone() for _ in range(n)]
    if len(shards) != n:
        raise RuntimeError(f"Tensor has {len(shards)} shards but the mesh has {n} devices")
    return [s.clone() for s in shards]


def from_device(tensor, blocking=True, *, queue_id=None):
    """ttnn.from_device: a host copy (keeps the memory config record)."""
    if tensor.device() is None:
        return tensor
    tensor.device()._check_no_host_io("from_device", "Reads are")
    return Tensor(
        [s.clone() for s in tensor.padded_shards()], tensor.shape, tensor.padded_shape,
        tensor.dtype, tensor.layout, tensor.memory_config(), None,
    )


def copy_host_to_device_tensor(host_tensor, device_tensor, cq_id=None):
    """ttnn.copy_host_to_device_tensor: overwrite a device buffer in place (same address)."""
    if host_tensor.device() is not None or device_tensor.device() is None:
        raise RuntimeError("copy_host_to_device_tensor needs a host tensor and a device tensor")
    device_tensor.device()._check_no_host_io("copy_host_to_device_tensor")
    for what in ("shape", "padded_shape", "dtype", "layout"):
        if getattr(host_tensor, what) != getattr(device_tensor, what):
            raise RuntimeError(
                f"copy_host_to_device_tensor: {what} differs: {getattr(host_tensor, what)}"
                f" vs {getattr(device_tensor, what)}"
            )
    device_tensor.write_shards(_replicate_for(host_tensor, device_tensor.device()))


def allocate_tensor_on_device(shape, dtype, layout, mesh_device, memory_config=None):
    """ttnn.allocate_tensor_on_device: an uninitialised device tensor (the emulator zero-fills).

    Allowed inside a trace capture, as on a device (it allocates and writes nothing). There it
    takes the storage of the latest buffer of the same spec freed inside the capture, as the
    allocator hands back that address: tt-metal's trace guide relies on this to re-create an
    input the traced model deallocates, at the address the trace reads."""
    mem = memory_config or DRAM_MEMORY_CONFIG
    capture = mesh_device._capture
    padded = tile_padded_shape(shape, layout)
    freed = capture.reuse((tuple(shape), padded, dtype, layout, mem)) if capture else None
    if freed is not None:
        return Tensor(freed, shape, padded, dtype, layout, mem, mesh_device)
    values = torch.zeros(tuple(shape), dtype=torch.float32)
    return make_tensor(values, dtype, layout, mem, mesh_device)


def deallocate(tensor, force=True) -> None:
    """ttnn.deallocate."""
    tensor.deallocate(force)


@op("reallocate")
def reallocate(tensor, memory_config=None):
    """ttnn.reallocate: a fresh buffer with the same values (optionally a new memory config).

    An op like the others, so trace capture records it and replay re-reads the input.
    """
    out = Tensor(
        [s.clone() for s in tensor.padded_shards()], tensor.shape, tensor.padded_shape,
        tensor.dtype, tensor.layout, memory_config or tensor.memory_config(), tensor.device(),
    )
    tensor.deallocate()
    return out


def get_device_tensors(tensor) -> list:
    """ttnn.get_device_tensors: one single-chip tensor per mesh device (host tensors stay host).

    The emulator's per-chip tensors are host copies, so splitting a device tensor is a host read
    here and is refused inside a trace capture like to_torch."""
    if tensor.device() is not None:
        tensor.device()._check_no_host_io("get_device_tensors of a device tensor", "Reads are")
    return [
        Tensor([s.clone()], tensor.shape, tensor.padded_shape, tensor.dtype, tensor.layout,
               tensor.memory_config(), None)
        for s in tensor.padded_shards()
    ]


def combine_device_tensors(*, tensors) -> Tensor:
    """ttnn.combine_device_tensors: the inverse of get_device_tensors (host tensors)."""
    first = tensors[0]
    for t in tensors:
        if (t.shape, t.padded_shape, t.dtype, t.layout) != (
            first.shape, first.padded_shape, first.dtype, first.layout
        ):
            raise RuntimeError("combine_device_tensors: tensors differ in shape/dtype/layout")
    shards = [s.clone() for t in tensors for s in t.padded_shards()]
    return Tensor(shards, first.shape, first.padded_shape, first.dtype, first.layout,
                  first.memory_config(), None)


# --- cache files ---------------------------------------------------------------------------------
class DumpTensorMode:
    """ttnn.DumpTensorMode (only DISTRIBUTED_GATHER semantics are emulated)."""

    DISTRIBUTED_GATHER = "DISTRIBUTED_GATHER"


def _encode_mem(m: MemoryConfig) -> dict:
    spec = None
    if m.shard_spec is not None:
        s = m.shard_spec
        spec = {
            "ranges": [[r.start.x, r.start.y, r.end.x, r.end.y] for r in s.grid.ranges()],
            "shape": list(s.shape),
            "orientation": s.orientation.name,
        }
    return {"layout": m.memory_layout.name, "buffer": m.buffer_type.name, "spec": spec}


def _decode_mem(d: dict) -> MemoryConfig:
    spec = None
    if d["spec"] is not None:
        ranges = {CoreRange(CoreCoord(a, b), CoreCoord(c, e)) for a, b, c, e in d["spec"]["ranges"]}
        spec = ShardSpec(CoreRangeSet(ranges), d["spec"]["shape"],
                         ShardOrientation[d["spec"]["orientation"]])
    return MemoryConfig(TensorMemoryLayout[d["layout"]], BufferType[d["buffer"]], spec)


def dump_tensor(file_name, tensor) -> None:
    """Write a host copy of `tensor` to `file_name` (the emulator's own .tensorbin format)."""
    torch.save(
        {
            "format": "ttnn_emu.tensorbin.v1",
            "shards": [s.clone() for s in tensor.padded_shards()],
            "shape": list(tensor.shape),
            "padded_shape": list(tensor.padded_shape),
            "dtype": tensor.dtype.name,
            "layout": tensor.layout.name,
            "memory_config": _encode_mem(tensor.memory_config()),
        },
        file_name,
    )


def load_tensor(file_name, *, device=None):
    """Read a tensor written by dump_tensor, onto `device` with its stored memory config."""
    d = torch.load(file_name, weights_only=True)
    if d.get("format") != "ttnn_emu.tensorbin.v1":
        raise RuntimeError(f"{file_name} is not a ttnn_emu tensor file")
    mem = _decode_mem(d["memory_config"])
    host = Tensor(d["shards"], d["shape"], d["padded_shape"], DataType[d["dtype"]],
                  Layout[d["layout"]], mem, None)
    return host if device is None else to_device(host, device, mem)


def as_tensor(
    tensor, dtype=None, *, layout=Layout.ROW_MAJOR, device=None, memory_config=None,
    cache_file_name=None, preprocess=None, mesh_mapper=None,
    cache_dump_mode=DumpTensorMode.DISTRIBUTED_GATHER,
):
    """ttnn.as_tensor: from_torch with an on-disk cache (hit: the torch input is ignored)."""
    if device is not None and memory_config is None:
        raise RuntimeError("as_tensor: memory_config is required when device is given")
    if device is not None:
        device._check_no_host_io("as_tensor to a device")

    def build_host():
        t = preprocess(tensor) if preprocess is not None else tensor
        return from_torch(t, dtype, layout=layout, memory_config=memory_config,
                          mesh_mapper=None if isinstance(mesh_mapper, _Replicate) else mesh_mapper)

    if cache_file_name is None:
        host = build_host()
        return host if device is None else to_device(host, device, memory_config)
    eff_dtype = dtype or dtype_from_torch(tensor.dtype)
    path = f"{cache_file_name}_dtype_{eff_dtype.name}_layout_{layout.name}.tensorbin"
    if os.path.exists(path):
        try:
            return load_tensor(path, device=device)
        except Exception:
            pass  # a load error triggers a rebuild, as in ttnn
    host = build_host()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    dump_tensor(path, host)
    return host if device is None else to_device(host, device, memory_config)

