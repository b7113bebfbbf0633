"""QKV head split and head concatenation (reference 5.2 - 5.5)."""

from __future__ import annotations

from .accounting import op
from .memory import (
    BufferType,
    CoreRange,
    CoreRangeSet,
    MemoryConfig,
    ShardOrientation,
    ShardSpec,
    TensorMemoryLayout,
    num_cores_to_corerangeset,
)
from .opsupport import output, require_device, require_dtype, require_tile, write_output
from .types import FLOAT_DTYPES, TILE_SIZE, DataType


def _into_all(name: str, output_tensors, outs: tuple) -> tuple:
    """`output_tensors=` of the head-split ops: [q, k, v] destinations, each optional."""
    if output_tensors is None:
        return outs
    dests = list(output_tensors)
    if len(dests) != len(outs):
        raise RuntimeError(f"{name}: output_tensors needs {len(outs)} entries, got {len(dests)}")
    return tuple(write_output(o, d, name) for o, d in zip(outs, dests))


def _height_shard_per_user(device, batch: int, dh: int, first_core: int = 0) -> MemoryConfig:
    """One user per core, shard [32, dh], on cores [first_core, first_core+batch) row-wise."""
    grid = device.compute_with_storage_grid_size()
    cores = num_cores_to_corerangeset(first_core + batch, grid, row_wise=True)
    if first_core:
        keep = cores.cores()[first_core:]
        cores = CoreRangeSet({CoreRange(c, c) for c in keep})
    return MemoryConfig(TensorMemoryLayout.HEIGHT_SHARDED, BufferType.L1,
                        ShardSpec(cores, (TILE_SIZE, dh), ShardOrientation.ROW_MAJOR))


@op("nlp_create_qkv_heads")
def nlp_create_qkv_heads(input, input_kv=None, *, num_heads, num_kv_heads=None,  # noqa: A002
                         transpose_k_heads=True, kv_tied=False, memory_config=None,
                         output_tensors=None):
    """Prefill split: [B,1,S,(nh+2nkv)*dh] ([Q heads | K heads | V heads]) -> q [B,nh,S,dh],
    k [B,nkv,S,dh] ([B,nkv,dh,S] if transpose_k_heads), v [B,nkv,S,dh]."""
    input_tensor = input  # ttnn 0.81.1 names the first argument `input`
    name = "nlp_create_qkv_heads"
    require_device(input_tensor, name)
    require_tile(input_tensor, name)
    require_dtype(input_tensor, (DataType.BFLOAT16, DataType.BFLOAT8_B, DataType.FLOAT32), name)
    if input_tensor.is_sharded():
        raise RuntimeError(f"{name}: input must be interleaved")
    nkv = num_kv_heads or num_heads
    b, one, s, w = input_tensor.shape
    if one != 1:
        raise RuntimeError(f"{name}: input must be [B, 1, S, W]")
    if input_kv is None:
        n_kv_sections = 1 if kv_tied else 2
        dh, rem = divmod(w, num_heads + n_kv_sections * nkv)
    else:
        dh, rem = divmod(w, num_heads)
    if rem or dh % TILE_SIZE:
        raise RuntimeError(f"{name}: width {w} does not split into heads of a multiple of 32")
    x = input_tensor.logical_shards()
    kv = input_kv.logical_shards() if input_kv is not None else [None] * len(x)
    qs, ks, vs = [], [], []
    for xi, kvi in zip(x, kv):
        q = xi[..., : num_heads * dh]
        rest = xi[..., num_heads * dh:] if kvi is None else kvi
        k = rest[..., : nkv * dh]
        v = k if kv_tied else rest[..., nkv * dh: 2 * nkv * dh]
        q = q.reshape(b, s, num_heads, dh).transpose(1, 2)  # [B,S,nh*dh] -> [B,nh,S,dh]
        k = k.reshape(b, s, nkv, dh).transpose(1, 2)  # [B,nkv,S,dh]
        v = v.reshape(b, s, nkv, dh).transpose(1, 2)
        if transpose_k_heads:
            k = k.transpose(-2, -1)  # [B,nkv,dh,S]
        qs.append(q)
        ks.append(k)
        vs.append(v)
    mem = memory_config or input_tensor.memory_config()
    return _into_all(name, output_tensors, tuple(
        output(input_tensor, vals, memory_config=mem, op=name) for vals in (qs, ks, vs)))


@op("nlp_create_qkv_heads_decode")
def nlp_create_qkv_heads_decode(input_tensor, *, num_heads, num_kv_heads=None,
                                output_tensors=None, overlap_qk_coregrid=True, batch_offset=None,
                                slice_size=None, memory_config=None):
    """Decode split: [1,1,B,(nh+2nkv)*dh] -> q [1,B,nh,dh], k/v [1,B,nkv,dh]; heads padded to 32,
    height-sharded one user per core with shard [32, dh]."""
    name = "nlp_create_qkv_heads_decode"
    require_device(input_tensor, name)
    require_tile(input_tensor, name)
    if input_tensor.dtype != DataType.BFLOAT16:
        raise RuntimeError(f"{name}: input must be BFLOAT16, got {input_tensor.dtype.name}")
    nkv = num_kv_heads or num_heads
    one, one2, batch, w = input_tensor.shape
    if (one, one2) != (1, 1) or input_tensor.padded_shape[2] != TILE_SIZE:
        raise RuntimeError(f"{name}: input must be [1,1,B<=32,W] with 32 padded rows")
    dh, rem = divmod(w, num_heads + 2 * nkv)
    if rem or dh % TILE_SIZE:
        raise RuntimeError(f"{name}: width {w} does not split into heads of a multiple of 32")
    if num_heads > TILE_SIZE or nkv > TILE_SIZE:
        raise RuntimeError(f"{name}: at most 32 heads per device")
    rows = range(batch)
    if batch_offset is not None or slice_size is not None:
        if batch_offset is None or slice_size is None:
            raise RuntimeError(f"{name}: batch_offset and slice_size go together")
        off = int(batch_offset.logical_shards()[0].reshape(-1)[0])
        rows = range(off, off + slice_size)
        if off + slice_size > batch:
            raise RuntimeError(f"{name}: rows [{off}, {off + slice_size}) exceed batch {batch}")
    nb = len(rows)
    device = input_tensor.device()
    if memory_config is None or (memory_config.is_sharded() and memory_config.shard_spec is None):
        if memory_config is not None and memory_config.memory_layout != (
            TensorMemoryLayout.HEIGHT_SHARDED
        ):
            raise RuntimeError(f"{name}: outputs must be HEIGHT_SHARDED")
        q_mem = _height_shard_per_user(device, nb, dh)
        k_mem = q_mem if overlap_qk_coregrid else _height_shard_per_user(device, nb, dh, nb)
    else:
        q_mem = k_mem = memory_config
    qs, ks, vs = [], [], []
    for xi in input_tensor.logical_shards():
        xi = xi[0, 0, rows.start: rows.stop]  # [nb, W]
        qs.append(xi[:, : num_heads * dh].reshape(1, nb, num_heads, dh))
        ks.append(xi[:, num_heads * dh: (num_heads + nkv) * dh].reshape(1, nb, nkv, dh))
        vs.append(xi[:, (num_heads + nkv) * dh:].reshape(1, nb, nkv, dh))
    pad = (1, nb, TILE_SIZE, dh)
    return _into_all(name, output_tensors, (
        output(input_tensor, qs, memory_config=q_mem, op=name, padded_shape=pad),
        output(input_tensor, ks, memory_config=k_mem, op=name, padded_shape=pad),
        output(input_tensor, vs, memory_config=k_mem, op=name, padded_shape=pad),
    ))


@op("nlp_concat_heads")
def nlp_concat_heads(input_tensor, *, memory_config=None):
    """[B, nh, S, dh] -> [B, 1, S, nh*dh]."""
    name = "nlp_concat_heads"
    require_device(input_tensor, name)
    require_tile(input_tensor, name)
    require_dtype(input_tensor, FLOAT_DTYPES, name)
    b, nh, s, dh = input_tensor.shape
    if dh % TILE_SIZE:
        raise RuntimeError(f"{name}: head_dim must be a multiple of 32")
    vals = [x.permute(0, 2, 1, 3).reshape(b, 1, s, nh * dh) for x in input_tensor.logical_shards()]
    return output(input_tensor, vals, memory_config=memory_config, op=name)


@op("nlp_concat_heads_decode")
def nlp_concat_heads_decode(input_tensor, *, num_heads, memory_config=None, output_tensor=None,
                            sub_core_grids=None):
    """[1, B, 32 (padded heads), dh] height-sharded -> [1, 1, B (pad 32), nh*dh], width-sharded
    with one head per core (shard [32, dh] on num_heads cores)."""
    name = "nlp_concat_heads_decode"
    require_device(input_tensor, name)
    require_tile(input_tensor, name)
    mem = input_tensor.memory_config()
    if mem.memory_layout != TensorMemoryLayout.HEIGHT_SHARDED:
        raise RuntimeError(f"{name}: input must be HEIGHT_SHARDED")
    one, batch, heads, dh = input_tensor.shape
    if one != 1 or batch > TILE_SIZE or num_heads > heads:
        raise RuntimeError(f"{name}: input must be [1, B<=32, >=num_heads, dh]")
    if input_tensor.padded_shape[2] != TILE_SIZE:
        raise RuntimeError(f"{name}: heads must be padded to 32")
    if memory_config is None or memory_config.shard_spec is None:
        grid = input_tensor.device().compute_with_storage_grid_size()
        cores = num_cores_to_corerangeset(num_heads, grid, row_wise=True)
        memory_config = MemoryConfig(TensorMemoryLayout.WIDTH_SHARDED, BufferType.L1,
                                     ShardSpec(cores, (TILE_SIZE, dh), ShardOrientation.ROW_MAJOR))
    vals = [x[:, :, :num_heads].reshape(1, 1, batch, num_heads * dh)
            for x in input_tensor.logical_shards()]
    out = output(input_tensor, vals, memory_config=memory_config, op=name)
    return write_output(out, output_tensor, name)

