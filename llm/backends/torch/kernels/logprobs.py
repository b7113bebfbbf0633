"""A step's log-softmax normalizer and top-K alternatives in four short Triton passes.

torch's logsumexp and topk(k=20) over [B, V] took 60 + 90 us at B = 32, V = 128,256 on an H200
(docs/performance.md, "the penalty / logprobs path"); a first version here that took the K best
of every block of 1,024 by K max-and-argmax rounds took 98 us: the rounds, not the 16 MB read,
were the cost. So the K best are found through a threshold:

1. per (row, block of BLOCK columns): the block's max m_b and sum of exp(x - m_b);
2. per row: lse = M + log(sum_b s_b exp(m_b - M)), and tau = the K-th largest block maximum
   (-inf with fewer than K blocks). At least K values of the row are >= tau (each of those
   blocks' maxima), so the row's K best are all >= tau;
3. per (row, block) whose max is >= tau (about K of them): the block's values >= tau (at most
   its K best, in order), appended to the row's candidate list (an atomic counter; usually a
   few dozen candidates in all);
4. per row: the K best candidates, ordered by value, then the lower column first (so the result
   does not depend on the order the blocks appended in).
With tau = -inf (fewer than K blocks hold a finite value: a row masked to a few tokens, or a
vocabulary of fewer than K blocks) there are at most (K - 1) * K candidates, under CAP. More
than CAP happen only when many values tie at or above tau (a flat row); such a row is answered
exactly by K passes over all of it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

SMALL = 128  # candidates merged by the short path
CAP = 512  # candidates kept per row before the exact fallback (> (K - 1) * K, see below)


@triton.jit
def _stats_kernel(z_ptr, m_ptr, s_ptr, cnt_ptr, n_cols, stride_z, n_blocks,
                  BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    cols = blk * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(z_ptr + row * stride_z + cols, mask=cols < n_cols, other=float("-inf"))
    m = tl.max(x, axis=0)
    shift = tl.where(m == float("-inf"), 0.0, m)  # a block of -inf only: sum 0, not NaN
    tl.store(m_ptr + row * n_blocks + blk, m)
    tl.store(s_ptr + row * n_blocks + blk, tl.sum(tl.exp(x - shift), axis=0))
    if blk == 0:
        tl.store(cnt_ptr + row, 0)  # the candidate counter pass 3 appends with


@triton.jit
def _threshold_kernel(m_ptr, s_ptr, lse_ptr, tau_ptr, n_blocks, K: tl.constexpr,
                      NB: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    b = tl.arange(0, NB)
    m = tl.load(m_ptr + row * n_blocks + b, mask=b < n_blocks, other=float("-inf"))
    s = tl.load(s_ptr + row * n_blocks + b, mask=b < n_blocks, other=0.0)
    top = tl.max(m, axis=0)
    shift = tl.where(top == float("-inf"), 0.0, top)
    tl.store(lse_ptr + row, shift + tl.log(tl.sum(s * tl.exp(m - shift), axis=0)))
    tau = top
    for _ in tl.static_range(K):  # the K-th largest block maximum
        tau = tl.max(m, axis=0)
        m = tl.where(b == tl.argmax(m, axis=0), float("-inf"), m)
    tl.store(tau_ptr + row, tau)


@triton.jit
def _collect_kernel(z_ptr, m_ptr, tau_ptr, cnt_ptr, cand_v_ptr, cand_i_ptr, n_cols, stride_z,
                    n_blocks, K: tl.constexpr, CAPC: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    tau = tl.load(tau_ptr + row)
    live = tl.load(m_ptr + row * n_blocks + blk) >= tau
    offs = tl.arange(0, BLOCK)
    cols = blk * BLOCK + offs
    limit = tl.where(live, n_cols, 0)  # a block below tau is not read
    x = tl.load(z_ptr + row * stride_z + cols, mask=cols < limit, other=float("-inf"))
    x = tl.where((x >= tau) & (x > float("-inf")), x, float("-inf"))  # the candidates only
    n = tl.minimum(tl.sum((x > float("-inf")).to(tl.int32), axis=0), K)
    pos = tl.atomic_add(cnt_ptr + row, n, mask=n > 0)
    for j in range(n):  # the block's best first; ties: the lower column first
        i = tl.argmax(x, axis=0)
        at = pos + j
        tl.store(cand_v_ptr + row * CAPC + at, tl.max(x, axis=0), mask=at < CAPC)
        tl.store(cand_i_ptr + row * CAPC + at, (blk * BLOCK + i).to(tl.int64), mask=at < CAPC)
        x = tl.where(offs == i, float("-inf"), x)


@triton.jit
def _pick(v, ids, prev_v, prev_i):
    """The best (value, then lowest id) among the entries ordered after (prev_v, prev_i)."""
    after = (v < prev_v) | ((v == prev_v) & (ids > prev_i))
    v = tl.where(after, v, float("-inf"))
    best = tl.max(v, axis=0)
    big = 9223372036854775807
    best_i = tl.min(tl.where(after & (v == best), ids, big), axis=0)
    return best, best_i


@triton.jit
def _merge_lanes(cand_v_ptr, cand_i_ptr, top_val_ptr, top_idx_ptr, row, n,
                 K: tl.constexpr, CAPC: tl.constexpr, LANES: tl.constexpr):
    """The K best of the row's first n (<= LANES) candidates."""
    c = tl.arange(0, LANES)
    v = tl.load(cand_v_ptr + row * CAPC + c, mask=c < n, other=float("-inf"))
    ids = tl.load(cand_i_ptr + row * CAPC + c, mask=c < n, other=0)
    prev_v = tl.full([], float("inf"), tl.float32)
    prev_i = tl.full([], -1, tl.int64)
    for k in tl.static_range(K):
        best, best_i = _pick(v, ids, prev_v, prev_i)
        tl.store(top_val_ptr + row * K + k, best)
        tl.store(top_idx_ptr + row * K + k, tl.where(best == float("-inf"), 0, best_i))
        prev_v, prev_i = best, best_i


@triton.jit
def _merge_kernel(z_ptr, cnt_ptr, cand_v_ptr, cand_i_ptr, top_val_ptr, top_idx_ptr, n_cols,
                  stride_z, n_blocks, K: tl.constexpr, CAPC: tl.constexpr,
                  SMALL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    n = tl.load(cnt_ptr + row)
    if n <= SMALL:  # the usual case: a few dozen candidates
        _merge_lanes(cand_v_ptr, cand_i_ptr, top_val_ptr, top_idx_ptr, row, n, K, CAPC, SMALL)
    elif n <= CAPC:
        _merge_lanes(cand_v_ptr, cand_i_ptr, top_val_ptr, top_idx_ptr, row, n, K, CAPC, CAPC)
    else:  # a flat row: K exact passes over all of it
        offs = tl.arange(0, BLOCK)
        prev_v = tl.full([], float("inf"), tl.float32)
        prev_i = tl.full([], -1, tl.int64)
        for k in tl.static_range(K):
            best = tl.full([], float("-inf"), tl.float32)
            best_i = tl.full([], 9223372036854775807, tl.int64)
            for blk in range(n_blocks):
                cols = blk * BLOCK + offs
                x = tl.load(z_ptr + row * stride_z + cols, mask=cols < n_cols,
                            other=float("-inf"))
                bv, bi = _pick(x, cols.to(tl.int64), prev_v, prev_i)
                better = (bv > best) | ((bv == best) & (bi < best_i))
                best = tl.where(better, bv, best)
                best_i = tl.where(better, bi, best_i)
            tl.store(top_val_ptr + row * K + k, best)
            tl.store(top_idx_ptr + row * K + k, tl.where(best == float("-inf"), 0, best_i))
            prev_v, prev_i = best, best_i


def lse_topk(z: torch.Tensor, k: int, block: int = 1024) -> tuple[torch.Tensor, torch.Tensor,
                                                                   torch.Tensor]:
    """z float32 [B, V] (contiguous rows) -> (logsumexp [B], the k largest values [B, k] in
    descending order, ties by the lower column, their column ids [B, k] int64; where a row has
    fewer than k finite values the rest are -inf with id 0)."""
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
    cnt = torch.empty(b, dtype=torch.int32, device=dev)
    _stats_kernel[(b, n_blocks)](z, m, s, cnt, v, z.stride(0), n_blocks, BLOCK=block,
                                 num_warps=4)
    lse = torch.empty(b, dtype=torch.float32, device=dev)
    tau = torch.empty(b, dtype=torch.float32, device=dev)
    _threshold_kernel[(b,)](m, s, lse, tau, n_blocks, K=k, NB=triton.next_power_of_2(n_blocks),
                            num_warps=4)
    cand_v = torch.empty(b, CAP, dtype=torch.float32, device=dev)
    cand_i = torch.empty(b, CAP, dtype=torch.int64, device=dev)
    _collect_kernel[(b, n_blocks)](z, m, tau, cnt, cand_v, cand_i, v, z.stride(0), n_blocks,
                                   K=k, CAPC=CAP, BLOCK=block, num_warps=4)
    top_vals = torch.empty(b, k, dtype=torch.float32, device=dev)
    top_idx = torch.empty(b, k, dtype=torch.int64, device=dev)
    _merge_kernel[(b,)](z, cnt, cand_v, cand_i, top_vals, top_idx, v, z.stride(0), n_blocks,
                        K=k, CAPC=CAP, SMALL=SMALL, BLOCK=block, num_warps=4)
    return lse, top_vals, top_idx
