"""Paged prefill attention in Triton: a chunk of S new tokens against a user's KV pages.

The chunk's queries sit at positions start..start+S-1; query i sees keys 0..start+i (causal with
an offset), read through the user's page row from the paged pools, the chunk's own K/V included
(written first by the RoPE + K/V-write kernel). The start position is read on the device, so one
launch shape (one CUDA graph per chunk length) serves every start: a chunk that continues a
sequence (a prefix-cache hit's tail, a long prompt's later chunks) replays like a first one.

Grid: (query tile, KV head, split). A program computes the GROUP query heads sharing one KV
head for ROWS // GROUP consecutive tokens at once (GQA: each key block is read once per tile and
KV head), walking its share of the key blocks up to the tile's last position, with flash
attention's online softmax in float32. Short chunks have few tiles, so the keys of a tile are
split over SPLITS programs (flash-decoding style): the number is fixed by the shapes, the SM count
and the longest context the page row holds; the blocks the start (read on the device) makes live
are spread over all of them, a split without keys leaving a neutral partial. Each split writes
its partial (acc, max, sum) to a scratch; the last of a tile's splits to arrive (an atomic
counter, which it resets to 0 for the next launch or graph replay) merges them in split order,
so the result has the same bits whatever the arrival order, in the same launch. Scores are q.k
times `scale` as in kernels/paged_decode.py; the probabilities meet V in V's dtype (fp32 caches:
true fp32 products, not TF32). Any page size
works (keys are addressed one by one through the row); head_dim must be a power of two >= 16.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ROW_CHOICES = (16, 32, 64, 128)  # (token, head) rows of one program, powers of two for tl.dot
SPLIT_ROWS = 64  # the most rows of a short chunk's tiles (when the key splits fill the SMs)
MAX_SPLITS = 16  # the last split merges them all: its work grows with the count
MIN_BLOCKS_PER_SPLIT = 4  # key blocks of the longest context per split (a split's walk costs
# ~1 us a block and the merge ~0.7 us a split: H200, 64 tokens at 1,536, 16 splits 20.0 us a
# layer, 8 splits 16.4, 4 splits 18.4)
SPLIT_STAGES = 1  # a split walks a few blocks: no software pipeline (stages 3 cost 0.3-1.6 us)
SPLIT_WAVES = 4  # programs per SM the splits aim at (several per SM hide the loads' latency)


@triton.jit
def _prefill_kernel(q_ptr, k_ptr, v_ptr, row_ptr, start_ptr, out_ptr, acc_ptr, ml_ptr, cnt_ptr,
                    scale, n_tokens, stride_qn, stride_qh, stride_kp, stride_kh, stride_kt,
                    stride_on, stride_oh, GROUP: tl.constexpr, ROWS: tl.constexpr,
                    HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
                    SPLITS: tl.constexpr, IEEE: tl.constexpr):
    tile = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    tok_per: tl.constexpr = ROWS // GROUP  # tokens of this tile; rows past tok_per * GROUP idle
    r = tl.arange(0, ROWS)
    tok = tile * tok_per + r // GROUP  # [ROWS] the row's query token in the chunk
    head = kvh * GROUP + r % GROUP  # [ROWS] its query head
    live = (r < tok_per * GROUP) & (tok < n_tokens)
    start = tl.load(start_ptr)  # the chunk's first position (device-side: graph input)
    qpos = start + tok  # [ROWS] keys 0..qpos are visible to the row
    d = tl.arange(0, HEAD_DIM)
    tok64 = tok.to(tl.int64)
    q = tl.load(q_ptr + tok64[:, None] * stride_qn + head[:, None] * stride_qh + d[None, :],
                mask=live[:, None], other=0.0)  # [ROWS, HD]
    m = tl.full([ROWS], float("-inf"), tl.float32)
    lsum = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, HEAD_DIM], tl.float32)
    end = start + tl.minimum(tile * tok_per + tok_per, n_tokens)  # keys below: the tile's last
    per = ((end + BLOCK_N - 1) // BLOCK_N + SPLITS - 1) // SPLITS  # key blocks of each split
    lo = split * per * BLOCK_N  # split 0 holds key 0, which every row sees: its m is finite
    hi = tl.minimum(lo + per * BLOCK_N, end)  # lo >= hi: no keys, the neutral partial
    n = tl.arange(0, BLOCK_N)
    for j0 in tl.range(lo, hi, BLOCK_N):
        j = j0 + n  # [BLOCK_N] key positions
        inside = j < end
        page = tl.load(row_ptr + j // PAGE, mask=inside, other=0).to(tl.int64)
        off = (page * stride_kp + kvh * stride_kh + (j % PAGE) * stride_kt)[:, None] + d[None, :]
        k = tl.load(k_ptr + off, mask=inside[:, None], other=0.0)  # [BLOCK_N, HD]
        v = tl.load(v_ptr + off, mask=inside[:, None], other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale  # [ROWS, BLOCK_N]
        else:
            s = tl.dot(q, tl.trans(k)) * scale
        s = tl.where((j[None, :] <= qpos[:, None]) & inside[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        # a row that has seen no key yet (a later split's block past its position) stays at -inf
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_ref)
        p = tl.exp(s - m_ref[:, None])
        lsum = lsum * alpha + tl.sum(p, axis=1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new
    dst = out_ptr + tok64[:, None] * stride_on + head[:, None] * stride_oh + d[None, :]
    if SPLITS == 1:
        tl.store(dst, (acc / lsum[:, None]).to(out_ptr.dtype.element_ty), mask=live[:, None])
    else:
        _store_merged(acc, m, lsum, dst, live, acc_ptr, ml_ptr, cnt_ptr,
                      tile * tl.num_programs(1) + kvh, split, SPLITS, ROWS, HEAD_DIM)


@triton.jit
def _store_merged(acc, m, lsum, dst, live, acc_ptr, ml_ptr, cnt_ptr, pair, split,
                  SPLITS: tl.constexpr, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Write this split's partial state (acc [ROWS, HD], m and lsum [ROWS]) to the scratch; the
    last of the pair's (tile, KV head) SPLITS programs to arrive merges all of them in split
    order (the same sums whatever the arrival order), stores the output and resets the pair's
    counter to 0 for the next launch (a persistent counter serves every graph replay)."""
    r = tl.arange(0, ROWS)
    d = tl.arange(0, HEAD_DIM)
    first = pair.to(tl.int64) * SPLITS  # the pair's first partial slot
    slot = first + split
    tl.store(acc_ptr + (slot * ROWS + r[:, None]) * HEAD_DIM + d[None, :], acc)
    tl.store(ml_ptr + slot * 2 * ROWS + r, m)
    tl.store(ml_ptr + (slot * 2 + 1) * ROWS + r, lsum)
    tl.debug_barrier()  # all of this program's partial is written before the release below
    ticket = tl.atomic_add(cnt_ptr + pair, 1, sem="acq_rel")
    if ticket == SPLITS - 1:  # the other splits' partials are visible (acquire)
        top = tl.full([ROWS], float("-inf"), tl.float32)
        for sp in tl.static_range(SPLITS):  # split 0 saw key 0 in every row: top is finite
            top = tl.maximum(top, tl.load(ml_ptr + (first + sp) * 2 * ROWS + r,
                                          cache_modifier=".cg"))
        num = tl.zeros([ROWS, HEAD_DIM], tl.float32)
        den = tl.zeros([ROWS], tl.float32)
        for sp in tl.static_range(SPLITS):  # a split without keys weighs exp(-inf) = 0
            w = tl.exp(tl.load(ml_ptr + (first + sp) * 2 * ROWS + r, cache_modifier=".cg") - top)
            den += tl.load(ml_ptr + ((first + sp) * 2 + 1) * ROWS + r, cache_modifier=".cg") * w
            part = tl.load(acc_ptr + ((first + sp) * ROWS + r[:, None]) * HEAD_DIM + d[None, :],
                           cache_modifier=".cg")  # [ROWS, HD]
            num += part * w[:, None]
        tl.store(dst, (num / den[:, None]).to(dst.dtype.element_ty), mask=live[:, None])
        tl.atomic_xchg(cnt_ptr + pair, 0)


def rows_per_program(n_tokens: int, group: int, n_kv: int, n_sm: int) -> int:
    """(token, head) rows of one program: the most (fewer key-block reads per token) that still
    give at least one program per SM, but at least enough for the chunk up to SPLIT_ROWS (short
    chunks: the splits over the keys fill the SMs; small tiles would read each key block again
    and again)."""
    fill = max(ROW_CHOICES[0], triton.next_power_of_2(group))
    for rows in reversed(ROW_CHOICES):
        if rows >= group and triton.cdiv(n_tokens, rows // group) * n_kv >= n_sm:
            fill = rows
            break
    return max(fill, min(SPLIT_ROWS, triton.next_power_of_2(group * n_tokens)))


def splits_per_tile(programs: int, max_keys: int, block_n: int, n_sm: int) -> int:
    """Key-range splits of each (tile, KV head) program: the most, up to MAX_SPLITS, that keep
    the grid within SPLIT_WAVES programs per SM and give each split at least
    MIN_BLOCKS_PER_SPLIT key blocks of the longest context the page row holds (max_keys). A
    pure function of shapes: never of the start, which is read on the device."""
    blocks = triton.cdiv(max_keys, block_n)
    return max(1, min(MAX_SPLITS, blocks // MIN_BLOCKS_PER_SPLIT,
                      SPLIT_WAVES * n_sm // programs))


def paged_prefill_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                            page_row: torch.Tensor, start: torch.Tensor, scale: float,
                            rows: int | None = None, block_n: int = 64, n_sm: int = 1,
                            splits: int | None = None,
                            counters: torch.Tensor | None = None, num_warps: int = 4,
                            num_stages: int | None = None) -> torch.Tensor:
    """q [S, nh, hd] (rotated) of tokens at positions start..start+S-1; pools [num_blocks, n_kv,
    block, hd] holding their K/V already; page_row [max_pages] int the user's pages; start [1]
    int on the device -> attention output [S, nh, hd] in q's dtype.

    rows: (token, head) rows per program, a power of two >= 16 and >= the GQA group (default
    `rows_per_program` for n_sm SMs); block_n: keys per step, a power of two >= 16; splits: key
    ranges per tile, >= 1 (default `splits_per_tile`; 1: no split, no scratch); counters: int32
    zeros, at least one per (tile, KV head), left zero by the kernel: pass a persistent one to
    save the zeroing of a fresh one (a memset) per call when splits > 1; num_warps, num_stages:
    Triton's launch options (num_stages: the key loop's software pipeline, default 3 unsplit,
    SPLIT_STAGES split).
    """
    s, nh, hd = q.shape
    _, n_kv, page, _ = k_pool.shape
    if nh % n_kv:
        raise ValueError(f"query heads ({nh}) must be a multiple of the KV heads ({n_kv})")
    group = nh // n_kv
    rows = rows_per_program(s, group, n_kv, n_sm) if rows is None else rows
    for name, value, least in (("rows", rows, max(16, group)), ("block_n", block_n, 16)):
        if value < least or value & (value - 1):
            raise ValueError(f"{name} must be a power of two >= {least}, got {value}")
    if hd < 16 or hd & (hd - 1):
        raise ValueError(f"paged prefill needs a power-of-two head_dim >= 16, got {hd}")
    tiles = triton.cdiv(s, rows // group)
    if splits is None:
        splits = splits_per_tile(tiles * n_kv, page_row.shape[0] * page, block_n, n_sm)
    if splits < 1:
        raise ValueError(f"splits must be >= 1, got {splits}")
    if num_stages is None:
        num_stages = SPLIT_STAGES if splits > 1 else 3
    out = torch.empty_like(q)
    acc = ml = cnt = out  # unused when splits == 1
    if splits > 1:
        acc = torch.empty(tiles * n_kv * splits, rows, hd, dtype=torch.float32, device=q.device)
        ml = torch.empty(tiles * n_kv * splits, 2, rows, dtype=torch.float32, device=q.device)
        cnt = _counters(counters, tiles * n_kv, q.device)
    _prefill_kernel[(tiles, n_kv, splits)](
        q, k_pool, v_pool, page_row, start, out, acc, ml, cnt, scale, s, q.stride(0),
        q.stride(1), k_pool.stride(0), k_pool.stride(1), k_pool.stride(2), out.stride(0),
        out.stride(1), GROUP=group, ROWS=rows, HEAD_DIM=hd, PAGE=page, BLOCK_N=block_n,
        SPLITS=splits, IEEE=q.dtype == torch.float32, num_warps=num_warps, num_stages=num_stages)
    return out


def _counters(given: torch.Tensor | None, pairs: int, device: torch.device) -> torch.Tensor:
    """The arrival counters of the (tile, KV head) pairs: `given` checked, else fresh zeros."""
    if given is None:
        return torch.zeros(pairs, dtype=torch.int32, device=device)
    if given.dtype != torch.int32 or given.device != device or given.numel() < pairs:
        raise ValueError(f"counters must be int32 on {device} with >= {pairs} elements (one per "
                         f"tile and KV head), got {given.dtype} on {given.device} with "
                         f"{given.numel()}")
    return given
