"""Paged flash-decode attention in Triton: one query token per user against its KV pages.

Grid: (user, KV head, split). Each program walks its share of the user's pages, up to the user's own
position (read on the device, so the launch is shape-static and CUDA-graph safe), and computes all
the query heads that share that KV head at once (GQA: each K/V page is read once per KV head).
Splits keep every SM busy at small batch; a second pass merges their partial softmax states. The
number of splits is fixed by the longest context the cache holds; each user's live pages are
spread over all of them (a short context in a long-context cache: one page per split, not a few
splits of several pages each).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llm.backends.torch.kernels.pdl import launch_options, use_pdl, wait_then_release


@triton.jit
def _partial_kernel(q_ptr, k_ptr, v_ptr, pt_ptr, pos_ptr, acc_ptr, ml_ptr, scale,
                    stride_qb, stride_qh, stride_kp, stride_kh, stride_kt, stride_ptb,
                    stride_ab, stride_ah, stride_as,
                    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                    BLOCK: tl.constexpr, IEEE: tl.constexpr, USE_GDC: tl.constexpr):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    n_splits = tl.num_programs(2)
    wait_then_release(USE_GDC)
    pos = tl.load(pos_ptr + b)  # keys 0..pos are visible
    n_pages = (pos + BLOCK) // BLOCK
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    t = tl.arange(0, BLOCK)
    heads = kvh * GROUP + g
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=(g < GROUP)[:, None], other=0.0)  # [GROUP_PAD, HD]
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    lsum = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    per = (n_pages + n_splits - 1) // n_splits  # the live pages, spread over all the splits
    first = split * per
    last = tl.minimum(first + per, n_pages)
    p = first
    while p < last:  # a device-side bound (while, not range: Triton's interpreter needs it)
        page = tl.load(pt_ptr + b * stride_ptb + p)
        tok = p * BLOCK + t
        visible = tok <= pos
        off = page * stride_kp + kvh * stride_kh + t[:, None] * stride_kt + d[None, :]
        k = tl.load(k_ptr + off, mask=visible[:, None], other=0.0)  # [BLOCK, HD]
        v = tl.load(v_ptr + off, mask=visible[:, None], other=0.0)
        if IEEE:  # fp32 caches: true fp32 products, as torch's fp32 matmul (not TF32)
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale  # [GROUP_PAD, BLOCK]
        else:
            s = tl.dot(q, tl.trans(k)) * scale
        s = tl.where(visible[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp(m - m_new)
        pexp = tl.exp(s - m_new[:, None])
        lsum = lsum * alpha + tl.sum(pexp, axis=1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(pexp, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(pexp.to(v.dtype), v)
        m = m_new
        p += 1
    out = b * stride_ab + heads[:, None] * stride_ah + split * stride_as + d[None, :]
    tl.store(acc_ptr + out, acc, mask=(g < GROUP)[:, None])
    ml = (b * (tl.num_programs(1) * GROUP) + heads) * n_splits * 2 + split * 2
    tl.store(ml_ptr + ml, m, mask=g < GROUP)
    tl.store(ml_ptr + ml + 1, lsum, mask=g < GROUP)


def pages_per_split(batch: int, n_kv: int, max_pages: int, n_sm: int) -> int:
    """Pages per program so that batch * n_kv * splits is about two waves of the SMs."""
    want_splits = max(1, -(-2 * n_sm // max(1, batch * n_kv)))
    return max(1, -(-max_pages // want_splits))


def paged_decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                           page_table: torch.Tensor, positions: torch.Tensor, scale: float,
                           pages_per_program: int, pdl: bool | None = None) -> torch.Tensor:
    """q [B, nh, hd]; pools [num_blocks, n_kv, block, hd]; page_table [B, max_pages] int;
    positions [B] int (the query's own position, whose K/V is already written) -> [B, nh, hd].
    pages_per_program: the most pages one program walks (a full context); it sets the number of
    splits, ceil(max_pages / pages_per_program). pdl: see kernels/pdl.py (default: where
    supported).
    """
    gdc = use_pdl(q, pdl)
    b, nh, hd = q.shape
    _, n_kv, block, _ = k_pool.shape
    group = nh // n_kv
    max_pages = page_table.shape[1]
    n_splits = -(-max_pages // pages_per_program)
    acc = torch.empty(b, nh, n_splits, hd, dtype=torch.float32, device=q.device)
    ml = torch.empty(b, nh, n_splits, 2, dtype=torch.float32, device=q.device)
    _partial_kernel[(b, n_kv, n_splits)](
        q, k_pool, v_pool, page_table, positions, acc, ml, scale,
        q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1), k_pool.stride(2),
        page_table.stride(0), acc.stride(0), acc.stride(1), acc.stride(2),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=hd,
        BLOCK=block, IEEE=q.dtype == torch.float32, USE_GDC=gdc, **launch_options(gdc))
    out = torch.empty_like(q)
    _combine_kernel[(b, nh)](acc, ml, out, acc.stride(0), acc.stride(1), acc.stride(2),
                             out.stride(0), out.stride(1), N_SPLITS=n_splits,
                             SPLITS_PAD=triton.next_power_of_2(n_splits), HEAD_DIM=hd,
                             USE_GDC=gdc, **launch_options(gdc))
    return out


@triton.jit
def _combine_kernel(acc_ptr, ml_ptr, out_ptr, stride_ab, stride_ah, stride_as, stride_ob,
                    stride_oh, N_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr,
                    HEAD_DIM: tl.constexpr, USE_GDC: tl.constexpr):
    """Merge the splits' partial softmax states of one (user, head) into the output row. Some
    split always holds a key (positions are >= 0: the query's own K/V is written first), so the
    largest m is finite and empty splits weigh exp(-inf) = 0."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    wait_then_release(USE_GDC)
    sp = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, HEAD_DIM)
    live = sp < N_SPLITS
    ml = ml_ptr + ((b * tl.num_programs(1) + h) * N_SPLITS + sp) * 2
    m = tl.load(ml, mask=live, other=float("-inf"))  # [SPLITS_PAD]
    lsum = tl.load(ml + 1, mask=live, other=0.0)
    w = tl.exp(m - tl.max(m, axis=0))  # empty splits: exp(-inf) = 0
    acc = tl.load(acc_ptr + b * stride_ab + h * stride_ah + sp[:, None] * stride_as + d[None, :],
                  mask=live[:, None], other=0.0)  # [SPLITS_PAD, HD]
    out = tl.sum(acc * w[:, None], axis=0) / tl.sum(lsum * w, axis=0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d, out.to(out_ptr.dtype.element_ty))


def supported(head_dim: int, block_size: int) -> bool:
    """Shapes the kernel handles (tl.dot needs power-of-two tiles of at least 16)."""
    pow2 = triton.next_power_of_2
    return head_dim >= 16 and block_size >= 16 and pow2(head_dim) == head_dim and \
        pow2(block_size) == block_size
