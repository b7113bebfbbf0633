"""A step's log-softmax normalizer and top-K alternatives in two Triton passes over the logits.

torch's logsumexp and topk(k=20) over [B, V] took 60 + 90 us at B = 32, V = 128,256 on an H200
(docs/performance.md, "the penalty / logprobs path"), many times the 16 MB they read. Here pass
1 gives each (row, block of BLOCK columns) one program that reads the block once and writes its
max m, its sum s of exp(x - m) and its K largest values with their column ids; pass 2 merges a
row's blocks: lse = M + log(sum_b s_b exp(m_b - M)) with M the row's max, and the K largest
among the blocks' candidates (ties: the lower column first).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _blocks_kernel(z_ptr, m_ptr, s_ptr, val_ptr, idx_ptr, n_cols, stride_z, n_blocks,
                   K: tl.constexpr, KP: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    offs = tl.arange(0, BLOCK)
    cols = blk * BLOCK + offs
    x = tl.load(z_ptr + row * stride_z + cols, mask=cols < n_cols, other=float("-inf"))
    m = tl.max(x, axis=0)
    shift = tl.where(m == float("-inf"), 0.0, m)  # a block of -inf only: sum 0, not NaN
    out = row * n_blocks + blk
    tl.store(m_ptr + out, m)
    tl.store(s_ptr + out, tl.sum(tl.exp(x - shift), axis=0))
    ks = tl.arange(0, KP)
    vals = tl.full([KP], float("-inf"), tl.float32)
    ids = tl.zeros([KP], tl.int64)
    for k in tl.static_range(K):  # the K largest, one max and its first index at a time
        v = tl.max(x, axis=0)
        i = tl.argmax(x, axis=0)
        vals = tl.where(ks == k, v, vals)
        ids = tl.where(ks == k, (blk * BLOCK + i).to(tl.int64), ids)
        x = tl.where(offs == i, float("-inf"), x)
    tl.store(val_ptr + out * K + ks, vals, mask=ks < K)
    tl.store(idx_ptr + out * K + ks, ids, mask=ks < K)


@triton.jit
def _merge_kernel(m_ptr, s_ptr, val_ptr, idx_ptr, lse_ptr, top_val_ptr, top_idx_ptr, n_blocks,
                  K: tl.constexpr, NB: tl.constexpr, NC: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    b = tl.arange(0, NB)
    m = tl.load(m_ptr + row * n_blocks + b, mask=b < n_blocks, other=float("-inf"))
    s = tl.load(s_ptr + row * n_blocks + b, mask=b < n_blocks, other=0.0)
    top = tl.max(m, axis=0)
    shift = tl.where(top == float("-inf"), 0.0, top)
    lse = shift + tl.log(tl.sum(s * tl.exp(m - shift), axis=0))
    tl.store(lse_ptr + row, lse)
    c = tl.arange(0, NC)
    live = c < n_blocks * K
    v = tl.load(val_ptr + row * n_blocks * K + c, mask=live, other=float("-inf"))
    ids = tl.load(idx_ptr + row * n_blocks * K + c, mask=live, other=0)
    for k in tl.static_range(K):
        best = tl.max(v, axis=0)
        j = tl.argmax(v, axis=0)
        tl.store(top_val_ptr + row * K + k, best)
        tl.store(top_idx_ptr + row * K + k, tl.sum(tl.where(c == j, ids, 0), axis=0))
        v = tl.where(c == j, float("-inf"), v)


def lse_topk(z: torch.Tensor, k: int, block: int = 1024) -> tuple[torch.Tensor, torch.Tensor,
                                                                   torch.Tensor]:
    """z float32 [B, V] (contiguous rows) -> (logsumexp [B], the k largest values [B, k] in
    descending order, their column ids [B, k] int64)."""
    if z.dim() != 2 or z.dtype != torch.float32 or z.stride(1) != 1:
        raise ValueError(f"lse_topk needs float32 [B, V] with contiguous rows, got "
                         f"{z.dtype} {tuple(z.shape)} strides {z.stride()}")
    b, v = z.shape
    if not 1 <= k <= min(v, block):
        raise ValueError(f"k must be in [1, min(V, block)] = [1, {min(v, block)}], got {k}")
    n_blocks = triton.cdiv(v, block)
    dev = z.device
    m = torch.empty(b, n_blocks, dtype=torch.float32, device=dev)
    s = torch.empty_like(m)
    vals = torch.empty(b, n_blocks, k, dtype=torch.float32, device=dev)
    idx = torch.empty(b, n_blocks, k, dtype=torch.int64, device=dev)
    _blocks_kernel[(b, n_blocks)](z, m, s, vals, idx, v, z.stride(0), n_blocks, K=k,
                                  KP=triton.next_power_of_2(k), BLOCK=block, num_warps=4)
    lse = torch.empty(b, dtype=torch.float32, device=dev)
    top_vals = torch.empty(b, k, dtype=torch.float32, device=dev)
    top_idx = torch.empty(b, k, dtype=torch.int64, device=dev)
    _merge_kernel[(b,)](m, s, vals, idx, lse, top_vals, top_idx, n_blocks, K=k,
                        NB=triton.next_power_of_2(n_blocks),
                        NC=triton.next_power_of_2(n_blocks * k), num_warps=8)
    return lse, top_vals, top_idx
