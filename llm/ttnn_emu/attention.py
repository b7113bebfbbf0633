"""Flash attention ops: prefill SDPA and (paged) decode SDPA (reference 5.6, 5.7).

Scores, softmax and the weighted sum are computed in fp32 from the stored (rounded) operands;
the output is rounded to q's dtype.
"""

from __future__ import annotations

import torch

from .accounting import op, set_cost
from .memory import BufferType, TensorMemoryLayout
from .opsupport import floats, output, require_device, require_dtype, require_tile, same_device
from .program_configs import SDPAProgramConfig
from .types import TILE_SIZE, DataType, storage_bytes

_SDPA_DTYPES = (DataType.BFLOAT16, DataType.BFLOAT8_B, DataType.BFLOAT4_B)


def _chunk(pc, field: str, default: int) -> int:
    if pc is None:
        return default
    if not isinstance(pc, SDPAProgramConfig):
        raise RuntimeError(f"SDPA: unsupported program config {type(pc).__name__}")
    v = getattr(pc, field)
    if v % TILE_SIZE:
        raise RuntimeError(f"SDPA: {field} {v} must be a multiple of 32")
    return v or default


def _attend(q, k, v, scale, keep=None, additive=None):
    """q [b,nh,Sq,dh], k/v [b,nkv,Sk,dh] (GQA by repeat_interleave) -> [b,nh,Sq,dh] in fp32."""
    rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(rep, dim=1)
    v = v.repeat_interleave(rep, dim=1)
    scores = (q @ k.transpose(-2, -1)) * scale  # [b, nh, Sq, Sk]
    if additive is not None:
        scores = scores + additive
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0)  # rows with nothing to attend to
    return probs @ v


@op("scaled_dot_product_attention")
def scaled_dot_product_attention(input_tensor_q, input_tensor_k, input_tensor_v, *,
                                 attn_mask=None, is_causal=True, scale=None,
                                 sliding_window_size=None, memory_config=None,
                                 program_config=None, compute_kernel_config=None,
                                 attention_sink=None, cu_window_seqlens=None,
                                 windowed_q_token_offset=0, windowed_q_token_offset_tensor=None,
                                 output_concat_heads=False, attn_mask_block_map=None):
    """Prefill flash attention: q [b,nqh,s,dh], k/v [b,nkv,s,dh] -> [b,nqh,s,dh]."""
    q, k, v = input_tensor_q, input_tensor_k, input_tensor_v  # ttnn 0.81.1 keyword names
    name = "scaled_dot_product_attention"
    _require_prefill_inputs(name, q, k, v)
    for t, n in ((q, "q"), (k, "k"), (v, "v")):
        if len(t.shape) != 4:
            raise RuntimeError(f"{name}: {n} must be 4-D")
        if t.shape[-1] != t.padded_shape[-1]:
            raise RuntimeError(f"{name}: {n} head_dim must not be padded")
    same_device(name, q, k, v, attn_mask)
    if attention_sink is not None or cu_window_seqlens is not None:
        raise RuntimeError("ttnn_emu: attention_sink / cu_window_seqlens are not supported")
    b, nqh, sq, dh = q.shape
    if tuple(k.shape) != tuple(v.shape) or k.shape[0] != b or k.shape[-1] != dh:
        raise RuntimeError(f"{name}: k/v shapes {list(k.shape)}/{list(v.shape)} do not match q")
    nkv, sk = k.shape[1], k.shape[2]
    if nqh % nkv:
        raise RuntimeError(f"{name}: nqh {nqh} must be divisible by nkv {nkv}")
    if is_causal and attn_mask is not None:
        raise RuntimeError(f"{name}: is_causal and attn_mask are mutually exclusive")
    if is_causal and sq != sk:
        raise RuntimeError(f"{name}: causal attention requires Sq == Sk")
    q_chunk = _chunk(program_config, "q_chunk_size", TILE_SIZE)
    k_chunk = _chunk(program_config, "k_chunk_size", TILE_SIZE)
    mask_vals = None
    if attn_mask is not None:
        require_tile(attn_mask, name, "attn_mask")
        if attn_mask.memory_config().buffer_type != BufferType.DRAM:
            raise RuntimeError(f"{name}: attn_mask must be in DRAM")
        ms = tuple(attn_mask.shape)
        if ms[0] != b or ms[1] not in (1, nqh) or ms[2:] != (sq, sk):
            raise RuntimeError(f"{name}: attn_mask must be [b, 1|nqh, Sq, Sk], got {list(ms)}")
        if sq % q_chunk or sk % k_chunk:
            raise RuntimeError(f"{name}: with a mask Sq % q_chunk and Sk % k_chunk must be 0")
        mask_vals = floats(attn_mask)
    scale = dh**-0.5 if scale is None else scale
    qpos = torch.arange(sq)[:, None] + (sk - sq)  # query_start = Sk - Sq
    kpos = torch.arange(sk)[None, :]
    keep = None
    if is_causal:
        keep = kpos <= qpos
        if sliding_window_size is not None:
            keep = keep & (kpos > qpos - sliding_window_size)
    outs = []
    for i, (qi, ki, vi) in enumerate(zip(floats(q), floats(k), floats(v))):
        add = mask_vals[i] if mask_vals is not None else None
        o = _attend(qi, ki, vi, scale, keep=keep, additive=add)  # [b, nqh, sq, dh]
        if output_concat_heads:
            o = o.permute(0, 2, 1, 3).reshape(b, 1, sq, nqh * dh)
        outs.append(o)
    flops = 4 * b * nqh * sq * sk * dh
    set_cost(flops=flops // 2 if is_causal else flops)
    return output(q, outs, memory_config=memory_config or q.memory_config(), op=name)


def _decode_positions(cur_pos, cur_pos_tensor, batch, name):
    if cur_pos_tensor is not None:
        require_device(cur_pos_tensor, name, "cur_pos_tensor")
        if cur_pos_tensor.dtype not in (DataType.INT32, DataType.UINT32):
            raise RuntimeError(f"{name}: cur_pos_tensor must be int32")
        pos = cur_pos_tensor.logical_shards()[0].reshape(-1).tolist()
    elif cur_pos:
        pos = list(cur_pos)
    else:
        return None
    if len(pos) != batch:
        raise RuntimeError(f"{name}: {len(pos)} positions for {batch} users")
    return [int(p) for p in pos]


def _check_decode(q, k, v, memory_config, name):
    for t, n in ((q, "q"), (k, "k"), (v, "v")):
        require_device(t, name, n)
        require_tile(t, name, n)
        require_dtype(t, _SDPA_DTYPES, name, n)
    same_device(name, q, k, v)
    for t, n in ((k, "k"), (v, "v")):
        if t.memory_config().buffer_type != BufferType.DRAM or t.is_sharded():
            raise RuntimeError(f"{name}: {n} must be in DRAM (interleaved)")
    qm = q.memory_config()
    if qm.is_sharded() and qm.memory_layout != TensorMemoryLayout.HEIGHT_SHARDED:
        raise RuntimeError(f"{name}: q must be HEIGHT_SHARDED or DRAM interleaved")
    if not qm.is_sharded() and qm.buffer_type != BufferType.DRAM:
        raise RuntimeError(f"{name}: q must be HEIGHT_SHARDED or DRAM interleaved")
    out_mem = memory_config or q.memory_config()
    if out_mem.is_sharded() and out_mem.memory_layout != TensorMemoryLayout.HEIGHT_SHARDED:
        raise RuntimeError(f"{name}: output must be DRAM or HEIGHT_SHARDED")
    one, batch, nh, dh = q.shape
    nkv = k.shape[1]
    if one != 1 or k.shape[-1] != dh or tuple(k.shape) != tuple(v.shape):
        raise RuntimeError(f"{name}: q must be [1,B,nh,dh] and k/v caches share its head_dim")
    if nh % nkv:
        raise RuntimeError(f"{name}: nh {nh} must be divisible by nkv {nkv}")
    if nkv > 1 and (q.dtype != DataType.BFLOAT16 or out_mem.is_sharded()):
        raise RuntimeError(f"{name}: GQA (nkv > 1) requires a BFLOAT16 q and a non-sharded output")
    return batch, nh, dh, out_mem


def _decode_core(name, q, kc, vc, pos, scale, is_causal, attn_mask, sliding_window_size,
                 out_mem, kv_dtype):
    """kc/vc: per chip contiguous caches [B, nkv, S, dh] in fp32."""
    batch, nh, dh = q.shape[1], q.shape[2], q.shape[3]
    smax = kc[0].shape[2]
    scale = dh**-0.5 if scale is None else scale
    masks = floats(attn_mask) if attn_mask is not None else None
    outs = []
    read_rows = 0
    for i, qi in enumerate(floats(q)):
        o = torch.zeros(1, batch, nh, dh)
        for b in range(batch):
            qb = qi[0, b][None, :, None, :]  # [1, nh, 1, dh]
            if is_causal:
                p = pos[b]
                if p < 0:
                    continue  # skipped user: output 0
                lo = 0 if sliding_window_size is None else max(0, p - sliding_window_size + 1)
                kb, vb = kc[i][b:b + 1, :, lo:p + 1], vc[i][b:b + 1, :, lo:p + 1]
                read_rows += -(-(p + 1) // TILE_SIZE) * TILE_SIZE if i == 0 else 0
                o[0, b] = _attend(qb, kb, vb, scale)[0, :, 0]
            else:
                m = masks[i].reshape(-1, nh, smax)[b if masks[i].shape[0] > 1 else 0]
                kb, vb = kc[i][b:b + 1], vc[i][b:b + 1]
                read_rows += smax if i == 0 else 0
                o[0, b] = _attend(qb, kb, vb, scale, additive=m[None, :, None, :])[0, :, 0]
        outs.append(o)
    nkv = kc[0].shape[1]
    kv_bytes = 2 * storage_bytes(read_rows * nkv * dh, kv_dtype)
    set_cost(flops=4 * nh * dh * read_rows,
             dram_bytes=kv_bytes + (q.shard_nbytes() if not q.is_sharded() else 0)
             + (q.shard_nbytes() if not out_mem.is_sharded() else 0))
    return output(q, outs, memory_config=out_mem, op=name,
                  padded_shape=tuple(q.padded_shape))


def _decode_k_chunk(pc, smax, paged: bool) -> int:
    if pc is not None and pc.k_chunk_size % TILE_SIZE:
        raise RuntimeError("SDPA decode: k_chunk_size must be a multiple of 32")
    if pc is not None and pc.k_chunk_size:
        return pc.k_chunk_size
    if paged:
        return TILE_SIZE
    return min(512, smax & -smax)  # largest power-of-two divisor of S


@op("scaled_dot_product_attention_decode")
def scaled_dot_product_attention_decode(input_tensor_q, input_tensor_k, input_tensor_v, *,
                                        is_causal=True, attn_mask=None, cur_pos=(),
                                        cur_pos_tensor=None, attention_sink=None, scale=None,
                                        sliding_window_size=None, memory_config=None,
                                        program_config=None, compute_kernel_config=None,
                                        share_cache=None):
    """Flash decode against contiguous caches [B, nkv, S_max, dh]: user b attends to positions
    0..cur_pos[b] inclusive (-1 skips the user, output 0)."""
    q, k, v = input_tensor_q, input_tensor_k, input_tensor_v  # ttnn 0.81.1 keyword names
    name = "scaled_dot_product_attention_decode"
    batch, nh, dh, out_mem = _check_decode(q, k, v, memory_config, name)
    if attention_sink is not None:
        raise RuntimeError("ttnn_emu: attention_sink is not supported")
    smax = k.shape[2]
    if k.shape[0] != batch and not (share_cache and k.shape[0] == 1):
        raise RuntimeError(f"{name}: cache batch {k.shape[0]} != {batch} users")
    k_chunk = _decode_k_chunk(program_config, smax, paged=False)
    if smax % k_chunk:
        raise RuntimeError(f"{name}: S_max {smax} must be divisible by k_chunk {k_chunk}")
    pos = _check_positions(cur_pos, cur_pos_tensor, batch, smax, is_causal, attn_mask, nh, name)
    kc, vc = floats(k), floats(v)
    if k.shape[0] == 1 and batch > 1:
        kc = [c.expand(batch, *c.shape[1:]) for c in kc]
        vc = [c.expand(batch, *c.shape[1:]) for c in vc]
    return _decode_core(name, q, kc, vc, pos, scale, is_causal, attn_mask, sliding_window_size,
                        out_mem, k.dtype)


def _check_positions(cur_pos, cur_pos_tensor, batch, smax, is_causal, attn_mask, nh, name):
    pos = _decode_positions(cur_pos, cur_pos_tensor, batch, name)
    if is_causal:
        if attn_mask is not None:
            raise RuntimeError(f"{name}: is_causal and attn_mask are mutually exclusive")
        if pos is None:
            raise RuntimeError(f"{name}: causal decode needs cur_pos or cur_pos_tensor")
        if any(p >= smax for p in pos):
            raise RuntimeError(f"{name}: cur_pos must be < S_max ({smax})")
    else:
        if attn_mask is None:
            raise RuntimeError(f"{name}: is_causal=False needs attn_mask [B, 1, nh, S]")
        if attn_mask.shape[-1] != smax or attn_mask.shape[-2] != nh:
            raise RuntimeError(f"{name}: attn_mask must be [B, 1, nh, S_max]")
    return pos


@op("paged_scaled_dot_product_attention_decode")
def paged_scaled_dot_product_attention_decode(input_tensor_q, input_tensor_k, input_tensor_v,
                                              page_table_tensor, *, is_causal=True,
                                              attn_mask=None, cur_pos_tensor=None,
                                              attention_sink=None, scale=None,
                                              sliding_window_size=None, memory_config=None,
                                              program_config=None, compute_kernel_config=None,
                                              paged_cache_geometry=None,
                                              cache_position_modulo=None,
                                              spec_multi_pos_tiles=0):
    """Flash decode against paged caches [blocks, nkv, bs, dh]: the contiguous cache of user b
    is cat_j K[page_table[b, j]] along the sequence."""
    q, k, v = input_tensor_q, input_tensor_k, input_tensor_v  # ttnn 0.81.1 keyword names
    name = "paged_scaled_dot_product_attention_decode"
    batch, nh, dh, out_mem = _check_decode(q, k, v, memory_config, name)
    if attention_sink is not None or cache_position_modulo is not None or spec_multi_pos_tiles:
        raise RuntimeError("ttnn_emu: attention_sink / cache_position_modulo / "
                           "spec_multi_pos_tiles are not supported")
    require_device(page_table_tensor, name, "page_table_tensor")
    if page_table_tensor.is_sharded():
        raise RuntimeError("ttnn_emu: a sharded (uint16) page table is not supported")
    if page_table_tensor.dtype != DataType.INT32 or page_table_tensor.layout.name != "ROW_MAJOR":
        raise RuntimeError(f"{name}: page_table_tensor must be int32 ROW_MAJOR")
    if page_table_tensor.shape[0] != batch:
        raise RuntimeError(f"{name}: page table has {page_table_tensor.shape[0]} rows, "
                           f"q has {batch} users")
    if is_causal and cur_pos_tensor is None:
        raise RuntimeError(f"{name}: cur_pos_tensor is required when is_causal")
    _decode_k_chunk(program_config, k.shape[2], paged=True)
    nblocks, nkv, bs = k.shape[0], k.shape[1], k.shape[2]
    smax = page_table_tensor.shape[1] * bs
    pos = _check_positions((), cur_pos_tensor, batch, smax, is_causal, attn_mask, nh, name)
    pts = page_table_tensor.logical_shards()
    kc, vc = [], []
    for i, (ki, vi) in enumerate(zip(floats(k), floats(v))):
        pt = pts[i].to(torch.int64)
        for b in range(batch):
            need = pt.shape[1] if pos is None else (pos[b] // bs + 1 if pos[b] >= 0 else 0)
            row = pt[b, :need]
            if row.numel() and (row.min() < 0 or row.max() >= nblocks):
                raise RuntimeError(f"{name}: page table row {b} points outside [0, {nblocks})")
        pt = pt.clamp(0, nblocks - 1)  # entries past a user's position are never read
        # K[pt] [B, nblk, nkv, bs, dh] -> [B, nkv, nblk*bs, dh]
        kc.append(ki[pt].transpose(1, 2).reshape(batch, nkv, smax, dh))
        vc.append(vi[pt].transpose(1, 2).reshape(batch, nkv, smax, dh))
    return _decode_core(name, q, kc, vc, pos, scale, is_causal, attn_mask, sliding_window_size,
                        out_mem, k.dtype)



@op("chunked_scaled_dot_product_attention")
def chunked_scaled_dot_product_attention(input_tensor_q, input_tensor_k, input_tensor_v,
                                         page_table_tensor, chunk_start_idx=None, *,
                                         chunk_start_idx_tensor=None, scale=None,
                                         memory_config=None, program_config=None,
                                         compute_kernel_config=None, paged_cache_geometry=None,
                                         sliding_window_size=None, attention_sink=None):
    """Chunked prefill against paged caches: q [b,nqh,Sq,dh] holds positions
    [chunk_start, chunk_start+Sq) and attends causally to keys [0, chunk_start+Sq) of the
    contiguous cache rebuilt from the page table."""
    q, k, v = input_tensor_q, input_tensor_k, input_tensor_v  # ttnn 0.81.1 keyword names
    name = "chunked_scaled_dot_product_attention"
    _require_prefill_inputs(name, q, k, v)
    same_device(name, q, k, v, page_table_tensor)
    if attention_sink is not None:
        raise RuntimeError("ttnn_emu: attention_sink is not supported")
    require_device(page_table_tensor, name, "page_table_tensor")
    if page_table_tensor.dtype != DataType.INT32 or page_table_tensor.layout.name != "ROW_MAJOR":
        raise RuntimeError(f"{name}: page_table_tensor must be int32 ROW_MAJOR")
    b, nqh, sq, dh = q.shape
    nblocks, nkv, bs, kdh = k.shape
    if tuple(k.shape) != tuple(v.shape) or kdh != dh:
        raise RuntimeError(f"{name}: k/v caches must match each other and q's head_dim")
    if nqh % nkv:
        raise RuntimeError(f"{name}: nqh {nqh} must be divisible by nkv {nkv}")
    if page_table_tensor.shape[0] != b:
        raise RuntimeError(f"{name}: page_table_tensor.shape[0] must equal the batch {b}")
    if chunk_start_idx_tensor is not None:
        chunk_start_idx = int(chunk_start_idx_tensor.logical_shards()[0].reshape(-1)[0])
    if chunk_start_idx is None:
        raise RuntimeError(f"{name}: chunk_start_idx or chunk_start_idx_tensor is required")
    q_chunk = _chunk(program_config, "q_chunk_size", TILE_SIZE)
    k_chunk = _chunk(program_config, "k_chunk_size", TILE_SIZE)
    if chunk_start_idx % q_chunk or chunk_start_idx % k_chunk:
        raise RuntimeError(f"{name}: chunk_start_idx {chunk_start_idx} must be a multiple of "
                           f"q_chunk_size {q_chunk} and k_chunk_size {k_chunk}")
    total = chunk_start_idx + sq
    if total > page_table_tensor.shape[1] * bs:
        raise RuntimeError(f"{name}: chunk end {total} exceeds the paged cache length")
    nblk = -(-total // bs)
    qpos = torch.arange(sq)[:, None] + chunk_start_idx
    kpos = torch.arange(total)[None, :]
    keep = kpos <= qpos
    if sliding_window_size is not None:
        keep = keep & (kpos > qpos - sliding_window_size)
    scale = dh**-0.5 if scale is None else scale
    outs = []
    for qi, ki, vi, pt in zip(floats(q), floats(k), floats(v), page_table_tensor.logical_shards()):
        pt = pt.to(torch.int64)[:, :nblk]
        if pt.min() < 0 or pt.max() >= nblocks:
            raise RuntimeError(f"{name}: page table entries must be in [0, {nblocks})")
        # K[pt] [b, nblk, nkv, bs, dh] -> [b, nkv, nblk*bs, dh] -> first `total` positions
        kc = ki[pt].transpose(1, 2).reshape(b, nkv, nblk * bs, dh)[:, :, :total]
        vc = vi[pt].transpose(1, 2).reshape(b, nkv, nblk * bs, dh)[:, :, :total]
        outs.append(_attend(qi, kc, vc, scale, keep=keep))
    set_cost(flops=4 * b * nqh * sq * total * dh // 2)
    return output(q, outs, memory_config=memory_config or q.memory_config(), op=name)


def _require_prefill_inputs(name: str, q, k, v) -> None:
    """q, k and v of a prefill SDPA: on device, TILE, an SDPA dtype, interleaved."""
    for t, n in ((q, "q"), (k, "k"), (v, "v")):
        require_device(t, name, n)
        require_tile(t, name, n)
        require_dtype(t, _SDPA_DTYPES, name, n)
        if t.is_sharded():
            raise RuntimeError(f"{name}: {n} must be interleaved")
