"""KV-cache writes, all in place (reference 5.8).

Rows written into a block-float cache are re-rounded to the cache dtype over the full padded row;
exponent groups are row-local, so the rest of the cache is unchanged.
"""

from __future__ import annotations

import torch

from .accounting import op, set_cost
from .blockfloat import round_to_dtype
from .memory import TensorMemoryLayout
from .opsupport import floats, require_device, require_dtype, require_tile, same_device
from .types import TILE_SIZE, DataType, storage_bytes


def _check_cache(cache, name):
    require_device(cache, name, "cache_tensor")
    require_tile(cache, name, "cache_tensor")
    if len(cache.shape) != 4:
        raise RuntimeError(f"{name}: cache must be 4-D")


def _write_rows(cache, chip: int, index, rows: torch.Tensor) -> None:
    """cache[index] = rows, where `index` selects whole rows ([..., :dh]) of the padded storage."""
    store = cache.mutable_shards()[chip]
    dh = rows.shape[-1]
    region = store[index].to(torch.float32)  # [..., padded_dh]
    region[..., :dh] = rows
    store[index] = round_to_dtype(region, cache.dtype).to(store.dtype)


def _row_bytes(cache, nrows: int) -> int:
    return storage_bytes(nrows * cache.padded_shape[-1], cache.dtype)


@op("fill_cache")
def fill_cache(cache_tensor, input_tensor, batch_idx, *, update_idx=0):
    """cache[batch_idx, :, update_idx:update_idx+S] = input[0] (input [1, nkv, S, dh])."""
    name = "fill_cache"
    _check_cache(cache_tensor, name)
    require_device(input_tensor, name)
    require_tile(input_tensor, name)
    same_device(name, cache_tensor, input_tensor)
    _, nkv, s, dh = input_tensor.shape
    bmax, cnkv, smax, cdh = cache_tensor.shape
    if update_idx % TILE_SIZE:
        raise RuntimeError(f"{name}: update_idx must be a multiple of 32")
    if (nkv, dh) != (cnkv, cdh) or input_tensor.shape[0] != 1:
        raise RuntimeError(
            f"{name}: input [1,{cnkv},S,{cdh}] expected, got {list(input_tensor.shape)}"
        )
    if not 0 <= batch_idx < bmax or update_idx + s > smax:
        raise RuntimeError(f"{name}: batch_idx/update_idx out of range of the cache")
    for i, x in enumerate(floats(input_tensor)):
        _write_rows(cache_tensor, i, (batch_idx, slice(None), slice(update_idx, update_idx + s)),
                    x[0])
    set_cost(dram_bytes=input_tensor.shard_nbytes() + _row_bytes(cache_tensor, nkv * s))
    return cache_tensor


@op("update_cache")
def update_cache(cache, input, update_idx, *, batch_offset=0, compute_kernel_config=None):  # noqa: A002
    """Legacy decode update: cache[u, :, update_idx] = input[0, :, batch_offset + u]."""
    name = "update_cache"
    _check_cache(cache, name)
    require_device(input, name)
    users, nkv, smax, dh = cache.shape
    if not 0 <= update_idx < smax:
        raise RuntimeError(f"{name}: update_idx {update_idx} out of range [0, {smax})")
    if input.shape[1] != nkv or input.shape[-1] != dh:
        raise RuntimeError(f"{name}: input must be [1, {nkv}, 32, {dh}]")
    users = min(users, input.shape[2] - batch_offset)
    for i, x in enumerate(floats(input)):
        for u in range(users):
            _write_rows(cache, i, (u, slice(None), update_idx), x[0, :, batch_offset + u])
    set_cost(dram_bytes=_row_bytes(cache, users * nkv) * 2)
    return cache


def _positions(update_idxs, update_idxs_tensor, batch, name):
    if update_idxs_tensor is not None:
        require_device(update_idxs_tensor, name, "update_idxs_tensor")
        if update_idxs_tensor.dtype not in (DataType.INT32, DataType.UINT32):
            raise RuntimeError(f"{name}: update_idxs_tensor must be int32")
        pos = [int(p) for p in update_idxs_tensor.logical_shards()[0].reshape(-1).tolist()]
    else:
        pos = [int(p) for p in update_idxs]
    if len(pos) != batch:
        raise RuntimeError(f"{name}: {len(pos)} update positions for {batch} users")
    return pos


@op("paged_update_cache")
def paged_update_cache(cache_tensor, input_tensor, *, update_idxs=(), update_idxs_tensor=None,
                       share_cache=None, page_table=None, batch_offset=0,
                       compute_kernel_config=None, mesh_coords=None, block_size=None,
                       num_kv_heads=None, cache_position_modulo=None):
    """Decode write of one token per user. input [1, B, nkv (pad 32), dh] height-sharded, fp32 or
    bf16. Unpaged: cache[b, :, p_b] = x[0, b, :nkv]; paged: cache[page_table[b, p_b // bs], :,
    p_b % bs] = x[0, b, :nkv]. A position of -1 skips that user."""
    name = "paged_update_cache"
    _check_cache(cache_tensor, name)
    require_device(input_tensor, name)
    require_tile(input_tensor, name)
    require_dtype(input_tensor, (DataType.FLOAT32, DataType.BFLOAT16), name)
    same_device(name, cache_tensor, input_tensor)
    if input_tensor.memory_config().memory_layout != TensorMemoryLayout.HEIGHT_SHARDED:
        raise RuntimeError(f"{name}: input must be HEIGHT_SHARDED (one user per core)")
    one, batch, nkv_in, dh = input_tensor.shape
    if one != 1 or dh != cache_tensor.shape[-1]:
        raise RuntimeError(f"{name}: input must be [1, B, nkv, {cache_tensor.shape[-1]}]")
    nkv = num_kv_heads or cache_tensor.padded_shape[1]
    if nkv_in < nkv:
        raise RuntimeError(f"{name}: input has {nkv_in} heads, cache {nkv}")
    pos = _positions(update_idxs, update_idxs_tensor, batch, name)
    pts = None
    if page_table is not None:
        require_device(page_table, name, "page_table")
        if page_table.dtype != DataType.INT32:
            raise RuntimeError(f"{name}: page_table must be int32")
        bs = block_size or cache_tensor.padded_shape[2]
        pts = [p.to(torch.int64) for p in page_table.logical_shards()]
    else:
        bs = None
        cache_users = cache_tensor.shape[0]
        if not share_cache and cache_users < batch_offset + batch:
            raise RuntimeError(f"{name}: cache batch {cache_users} < {batch_offset + batch} users")
    written = 0
    for i, x in enumerate(floats(input_tensor)):
        for b, p in enumerate(pos):
            if p < 0:
                continue
            if cache_position_modulo:
                p %= cache_position_modulo
            rows = x[0, b, :nkv]  # [nkv, dh]
            if pts is None:
                user = 0 if share_cache else batch_offset + b
                if p >= cache_tensor.shape[2]:
                    raise RuntimeError(f"{name}: position {p} >= cache length")
                _write_rows(cache_tensor, i, (user, slice(None), p), rows)
            else:
                if p // bs >= pts[i].shape[1]:
                    raise RuntimeError(f"{name}: position {p} beyond the page table")
                blk = int(pts[i][batch_offset + b, p // bs])
                if not 0 <= blk < cache_tensor.shape[0]:
                    raise RuntimeError(f"{name}: page table entry {blk} out of range")
                _write_rows(cache_tensor, i, (blk, slice(None), p % bs), rows)
            written += 1 if i == 0 else 0
    # each write reads and writes back one tile row group per head (a 32-row tile on hardware)
    set_cost(dram_bytes=2 * _row_bytes(cache_tensor, written * nkv * TILE_SIZE))
    return cache_tensor


@op("paged_fill_cache")
def paged_fill_cache(cache_tensor, input_tensor, page_table, *, batch_idx_tensor=None,
                     batch_idx=0, compute_kernel_config=None, mesh_coords=None, block_size=None,
                     cache_position_modulo=None, valid_seq_len_tensor=None):
    """Prefill fill into pages, tile by tile: blk = page_table[batch_idx, 32t // bs];
    cache[blk, h, 32t % bs : +32] = input[0, h, 32t : 32t+32].
    The input dtype must equal the cache's."""
    name = "paged_fill_cache"
    _check_cache(cache_tensor, name)
    require_device(input_tensor, name)
    require_tile(input_tensor, name)
    require_device(page_table, name, "page_table")
    same_device(name, cache_tensor, input_tensor, page_table)
    if input_tensor.dtype != cache_tensor.dtype:
        raise RuntimeError(f"{name}: input dtype {input_tensor.dtype.name} must equal the cache "
                           f"dtype {cache_tensor.dtype.name} (typecast first)")
    if page_table.dtype != DataType.INT32:
        raise RuntimeError(f"{name}: page_table must be int32")
    if cache_position_modulo is not None or valid_seq_len_tensor is not None:
        raise RuntimeError("ttnn_emu: cache_position_modulo / valid_seq_len_tensor unsupported")
    _, nkv, _, dh = input_tensor.shape
    if nkv != cache_tensor.shape[1] or dh != cache_tensor.shape[3]:
        raise RuntimeError(f"{name}: input heads/head_dim do not match the cache")
    bs = block_size or cache_tensor.padded_shape[2]
    if bs % TILE_SIZE:
        raise RuntimeError(f"{name}: block size must be a multiple of 32")
    if batch_idx_tensor is not None:
        batch_idx = int(batch_idx_tensor.logical_shards()[0].reshape(-1)[0])
    tiles = input_tensor.padded_shape[2] // TILE_SIZE
    copied = 0
    pairs = zip(input_tensor.padded_shards(), cache_tensor.mutable_shards())
    for i, (src, dst) in enumerate(pairs):
        pt = page_table.logical_shards()[i].to(torch.int64)
        if not 0 <= batch_idx < pt.shape[0]:
            raise RuntimeError(f"{name}: batch_idx {batch_idx} outside the page table")
        for t in range(tiles):
            vblk = (TILE_SIZE * t) // bs
            if vblk >= pt.shape[1]:
                continue
            blk = int(pt[batch_idx, vblk])
            if blk < 0:
                continue
            if blk >= dst.shape[0]:
                raise RuntimeError(f"{name}: page table entry {blk} out of range")
            off = (TILE_SIZE * t) % bs
            # raw tile copy of the padded storage, [1, nkv, 32, dh_pad] -> cache block rows
            dst[blk, :, off:off + TILE_SIZE] = src[0, :, TILE_SIZE * t:TILE_SIZE * (t + 1)]
            copied += 1 if i == 0 else 0
    set_cost(dram_bytes=2 * _row_bytes(cache_tensor, copied * nkv * TILE_SIZE))
    return cache_tensor
