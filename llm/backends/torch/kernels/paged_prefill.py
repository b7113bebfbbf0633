"""Paged prefill attention in Triton: a chunk of S new tokens against a user's KV pages.

The chunk's queries sit at positions start..start+S-1; query i sees keys 0..start+i (causal with
an offset), read through the user's page row from the paged pools, the chunk's own K/V included
(written first by the RoPE + K/V-write kernel). The start position is read on the device, so one
launch shape (one CUDA graph per chunk length) serves every start: a chunk that continues a
sequence (a prefix-cache hit's tail, a long prompt's later chunks) replays like a first one.

Grid: (query tile, KV head). A program computes the GROUP query heads sharing one KV head for
ROWS // GROUP consecutive tokens at once (GQA: each key block is read once per tile and KV head),
walking the keys in blocks of BLOCK_N up to its last token's position, with flash attention's
online softmax in float32. Scores are q.k times `scale` as in kernels/paged_decode.py; the
probabilities meet V in V's dtype (fp32 caches: true fp32 products, not TF32). Any page size
works (keys are addressed one by one through the row); head_dim must be a power of two >= 16.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ROW_CHOICES = (16, 32, 64, 128)  # (token, head) rows of one program, powers of two for tl.dot


@triton.jit
def _prefill_kernel(q_ptr, k_ptr, v_ptr, row_ptr, start_ptr, out_ptr, scale, n_tokens,
                    stride_qn, stride_qh, stride_kp, stride_kh, stride_kt, stride_on, stride_oh,
                    GROUP: tl.constexpr, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
                    PAGE: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
    tile = tl.program_id(0)
    kvh = tl.program_id(1)
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
    n = tl.arange(0, BLOCK_N)
    for j0 in tl.range(0, end, BLOCK_N):  # key 0 is in every row's first block: m turns finite
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
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        lsum = lsum * alpha + tl.sum(p, axis=1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new
    out = acc / lsum[:, None]
    dst = out_ptr + tok64[:, None] * stride_on + head[:, None] * stride_oh + d[None, :]
    tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=live[:, None])


def rows_per_program(n_tokens: int, group: int, n_kv: int, n_sm: int) -> int:
    """(token, head) rows of one program: the most (fewer key-block reads per token) that still
    give at least one program per SM, else the fewest (short chunks: spread them out)."""
    for rows in reversed(ROW_CHOICES):
        if rows >= group and triton.cdiv(n_tokens, rows // group) * n_kv >= n_sm:
            return rows
    return max(ROW_CHOICES[0], triton.next_power_of_2(group))


def paged_prefill_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                            page_row: torch.Tensor, start: torch.Tensor, scale: float,
                            rows: int | None = None, block_n: int = 64,
                            n_sm: int = 1) -> torch.Tensor:
    """q [S, nh, hd] (rotated) of tokens at positions start..start+S-1; pools [num_blocks, n_kv,
    block, hd] holding their K/V already; page_row [max_pages] int the user's pages; start [1]
    int on the device -> attention output [S, nh, hd] in q's dtype.

    rows: (token, head) rows per program, a power of two >= 16 and >= the GQA group (default
    `rows_per_program` for n_sm SMs); block_n: keys per step, a power of two >= 16.
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
    out = torch.empty_like(q)
    grid = (triton.cdiv(s, rows // group), n_kv)
    _prefill_kernel[grid](
        q, k_pool, v_pool, page_row, start, out, scale, s, q.stride(0), q.stride(1),
        k_pool.stride(0), k_pool.stride(1), k_pool.stride(2), out.stride(0), out.stride(1),
        GROUP=group, ROWS=rows, HEAD_DIM=hd, PAGE=page, BLOCK_N=block_n,
        IEEE=q.dtype == torch.float32)
    return out

