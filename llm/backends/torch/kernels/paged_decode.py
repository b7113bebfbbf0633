"""Paged flash-decode attention in Triton: one query token per user against its KV pages.

Grid: (user, KV head, split). Each program walks its share of the user's pages, up to the user's own
position (read on the device, so the launch is shape-static and CUDA-graph safe), and computes all
the query heads that share that KV head at once (GQA: each K/V page is read once per KV head).
Splits keep every SM busy at small batch; their partial softmax states are then merged. The
number of splits is fixed by the longest context the cache holds; each user's live pages are
spread over all of them (a short context in a long-context cache: one page per split, not a few
splits of several pages each).

The merge, two ways (`paged_decode_attention`'s `counters`):
- fused (one launch): each program stores its split's partial state, then counts itself done on
  its (user, KV head) counter; the program that counts last merges all the splits' states of
  that KV head's query heads and sets the counter back to zero (so the next launch, the next
  layer's or a CUDA-graph replay, finds zeros). With one split the program writes the output
  itself.
- two kernels: the partial kernel, then `_combine_kernel` over (user, head).
Both run the one merge (`_load_state`, `_merge_store`: the same tile shapes, warps and hence
reduction order), so their outputs are bit-equal; the fused merge loads a head's states while it
merges the head before (a chain of L2 round trips otherwise).

Memory ordering of the fused merge (PTX memory model): a program's partial is stored by all its
threads; a CTA barrier orders those stores before the one thread that then does the counter's
atomic add with acq_rel semantics at GPU scope (release is cumulative: it covers the writes the
barrier made it observe). The last program's add acquires every earlier program's release (they
are all in the counter's release sequence); a second barrier orders that acquire before its
other threads' loads, which bypass L1 (.cg) besides. Nothing spins, so no program waits on
another being resident. Triton's interpreter runs programs one after another, which exercises
the counting and the merge but never this ordering.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llm.backends.torch.kernels.pdl import launch_options, use_pdl, wait_then_release

NUM_WARPS = 4  # both kernels: the merge's tile layout, hence its reduction order, follows it


@triton.jit
def _load_state(acc_ptr, ml_ptr, b, h, n_heads, stride_ab, stride_ah, stride_as,
                N_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                CACHE: tl.constexpr):
    """The splits' partial softmax states of one (user b, head h): m, lsum [SPLITS_PAD] and acc
    [SPLITS_PAD, HD]; the padding splits as empty ones (m = -inf, nothing summed)."""
    sp = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, HEAD_DIM)
    live = sp < N_SPLITS
    ml = ml_ptr + ((b * n_heads + h) * N_SPLITS + sp) * 2
    m = tl.load(ml, mask=live, other=float("-inf"), cache_modifier=CACHE)
    lsum = tl.load(ml + 1, mask=live, other=0.0, cache_modifier=CACHE)
    acc = tl.load(acc_ptr + b * stride_ab + h * stride_ah + sp[:, None] * stride_as + d[None, :],
                  mask=live[:, None], other=0.0, cache_modifier=CACHE)
    return m, lsum, acc


@triton.jit
def _merge_store(m, lsum, acc, out_ptr, b, h, stride_ob, stride_oh, HEAD_DIM: tl.constexpr):
    """Merge one (user, head)'s split states (`_load_state`) into its output row. Some split
    always holds a key (positions are >= 0: the query's own K/V is written first), so the
    largest m is finite and empty splits weigh exp(-inf) = 0."""
    w = tl.exp(m - tl.max(m, axis=0))
    out = tl.sum(acc * w[:, None], axis=0) / tl.sum(lsum * w, axis=0)  # [HD]
    d = tl.arange(0, HEAD_DIM)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d, out.to(out_ptr.dtype.element_ty))


@triton.jit
def _partial_kernel(q_ptr, k_ptr, v_ptr, pt_ptr, pos_ptr, acc_ptr, ml_ptr, out_ptr, cnt_ptr,
                    scale, stride_qb, stride_qh, stride_kp, stride_kh, stride_kt, stride_ptb,
                    stride_ab, stride_ah, stride_as, stride_ob, stride_oh,
                    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                    BLOCK: tl.constexpr, IEEE: tl.constexpr, N_SPLITS: tl.constexpr,
                    SPLITS_PAD: tl.constexpr, FUSE: tl.constexpr, USE_GDC: tl.constexpr):
    """One (user, KV head, split): its partial softmax state into acc/ml; FUSE: the merge too
    (see the module docstring; cnt_ptr [B * n_kv] int32 zeros), and with one split the output
    straight from the registers."""
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    n_kv = tl.num_programs(1)
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
    per = (n_pages + N_SPLITS - 1) // N_SPLITS  # the live pages, spread over all the splits
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
    if FUSE and N_SPLITS == 1:  # acc / lsum: what the merge of one split computes, bit for bit
        out = out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :]
        tl.store(out, (acc / lsum[:, None]).to(out_ptr.dtype.element_ty),
                 mask=(g < GROUP)[:, None])
    else:
        part = b * stride_ab + heads[:, None] * stride_ah + split * stride_as + d[None, :]
        tl.store(acc_ptr + part, acc, mask=(g < GROUP)[:, None])
        ml = (b * (n_kv * GROUP) + heads) * N_SPLITS * 2 + split * 2
        tl.store(ml_ptr + ml, m, mask=g < GROUP)
        tl.store(ml_ptr + ml + 1, lsum, mask=g < GROUP)
        if FUSE:
            tl.debug_barrier()  # all threads' partial stores, before the release below
            cnt = cnt_ptr + b * n_kv + kvh
            done = tl.atomic_add(cnt, 1, sem="acq_rel", scope="gpu")  # splits done before
            if done == N_SPLITS - 1:  # the last: every other split's partial is visible
                tl.debug_barrier()  # the acquire above, before any thread's loads below
                h = kvh * GROUP
                m1, l1, a1 = _load_state(acc_ptr, ml_ptr, b, h, n_kv * GROUP, stride_ab,
                                         stride_ah, stride_as, N_SPLITS, SPLITS_PAD, HEAD_DIM,
                                         ".cg")
                for i in tl.static_range(GROUP):  # head i merged while i + 1's states load
                    m0, l0, a0 = m1, l1, a1
                    if i + 1 < GROUP:
                        m1, l1, a1 = _load_state(acc_ptr, ml_ptr, b, h + i + 1, n_kv * GROUP,
                                                 stride_ab, stride_ah, stride_as, N_SPLITS,
                                                 SPLITS_PAD, HEAD_DIM, ".cg")
                    _merge_store(m0, l0, a0, out_ptr, b, h + i, stride_ob, stride_oh, HEAD_DIM)
                tl.store(cnt, 0)  # for the next launch; every split has counted already


@triton.jit
def _combine_kernel(acc_ptr, ml_ptr, out_ptr, stride_ab, stride_ah, stride_as, stride_ob,
                    stride_oh, N_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr,
                    HEAD_DIM: tl.constexpr, USE_GDC: tl.constexpr):
    """The two-kernel path's merge: one (user, head) per program."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    wait_then_release(USE_GDC)
    m, lsum, acc = _load_state(acc_ptr, ml_ptr, b, h, tl.num_programs(1), stride_ab, stride_ah,
                               stride_as, N_SPLITS, SPLITS_PAD, HEAD_DIM, "")
    _merge_store(m, lsum, acc, out_ptr, b, h, stride_ob, stride_oh, HEAD_DIM)


def pages_per_split(batch: int, n_kv: int, max_pages: int, n_sm: int) -> int:
    """Pages per program so that batch * n_kv * splits is about two waves of the SMs."""
    want_splits = max(1, -(-2 * n_sm // max(1, batch * n_kv)))
    return max(1, -(-max_pages // want_splits))


def decode_counters(max_batch: int, n_kv: int, device: torch.device | str) -> torch.Tensor:
    """The fused merge's counters for up to max_batch users of n_kv KV heads: int32 zeros, which
    every launch leaves at zero. Allocate once and keep (CUDA graphs capture its address); one
    launch at a time may use it (one stream: the layers of a step run one after another). A
    launch that does not finish (a device fault) may leave counts behind: allocate anew."""
    return torch.zeros(max_batch * n_kv, dtype=torch.int32, device=device)


def paged_decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                           page_table: torch.Tensor, positions: torch.Tensor, scale: float,
                           pages_per_program: int, pdl: bool | None = None,
                           counters: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, nh, hd]; pools [num_blocks, n_kv, block, hd]; page_table [B, max_pages] int;
    positions [B] int (the query's own position, whose K/V is already written) -> [B, nh, hd].
    pages_per_program: the most pages one program walks (a full context); it sets the number of
    splits, ceil(max_pages / pages_per_program). pdl: see kernels/pdl.py (default: where
    supported). counters: `decode_counters` for at least B users on q's device: the merge fused
    into the one launch; None: the partial kernel, then the combine kernel (same bits).
    """
    gdc = use_pdl(q, pdl)
    b, nh, hd = q.shape
    _, n_kv, block, _ = k_pool.shape
    group = nh // n_kv
    max_pages = page_table.shape[1]
    n_splits = -(-max_pages // pages_per_program)
    fuse = counters is not None
    if fuse and (counters.dtype != torch.int32 or counters.device != q.device
                 or counters.numel() < b * n_kv):
        raise ValueError(f"counters must be int32 on {q.device} with at least B * n_kv = "
                         f"{b * n_kv} entries (decode_counters); got {counters.dtype} "
                         f"[{counters.numel()}] on {counters.device}")
    out = torch.empty_like(q)
    if fuse and n_splits == 1:  # no partial states: the one program per KV head writes `out`
        acc = ml = out
    else:
        acc = torch.empty(b, nh, n_splits, hd, dtype=torch.float32, device=q.device)
        ml = torch.empty(b, nh, n_splits, 2, dtype=torch.float32, device=q.device)
    pad = triton.next_power_of_2(n_splits)
    _partial_kernel[(b, n_kv, n_splits)](
        q, k_pool, v_pool, page_table, positions, acc, ml, out,
        counters if fuse else positions, scale,
        q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1), k_pool.stride(2),
        page_table.stride(0), acc.stride(0), acc.stride(1), acc.stride(2), out.stride(0),
        out.stride(1), GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=hd, BLOCK=block, IEEE=q.dtype == torch.float32, N_SPLITS=n_splits,
        SPLITS_PAD=pad, FUSE=fuse, USE_GDC=gdc, num_warps=NUM_WARPS, **launch_options(gdc))
    if not fuse:
        _combine_kernel[(b, nh)](acc, ml, out, acc.stride(0), acc.stride(1), acc.stride(2),
                                 out.stride(0), out.stride(1), N_SPLITS=n_splits,
                                 SPLITS_PAD=pad, HEAD_DIM=hd, USE_GDC=gdc, num_warps=NUM_WARPS,
                                 **launch_options(gdc))
    return out


def supported(head_dim: int, block_size: int) -> bool:
    """Shapes the kernel handles (tl.dot needs power-of-two tiles of at least 16)."""
    pow2 = triton.next_power_of_2
    return head_dim >= 16 and block_size >= 16 and pow2(head_dim) == head_dim and \
        pow2(block_size) == block_size
