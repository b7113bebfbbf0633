"""The quantized GEMM for up to 64 rows of x: tensor cores on the exact codes, scales per group.

Per 32-group, the codes (exact in bf16) times x's rows padded to 16, 32 or 64 on the tensor cores
(fp32 accumulation), then the group's scale in fp32. v3 (this file; the v2 kernel measured 8B Q4_0
at 1652 tok/s at batch 16, half of bf16, docs/performance.md): four groups per loop step with the
Q8_0 / Q4_0 scales of the next step loaded one step ahead (v2 loaded each group's scales inside the
step, a global-memory latency per step), and 4-bit codes turned into bf16 pairs by byte permutes
(`_tc_nibbles`): 8B Q4_0 batch 16 at 2,182 tok/s on an H200 (2026-12-04). Split-K (`split_k`,
kernels/splitk.py): programs along K as well, for the matrices whose N gives fewer programs than the
GPU has SMs (8B qkv, o, down: 64-96 programs of 64 rows); their partials are added in a fixed order.
The launch rule is qgemv_config.qgemm_tc_config. `qgemv` (kernels/qgemv.py) picks this kernel for
every format it computes, batches above `qgemv_config.words_rows_max` rows (`TC_PICKED`). v4
(`v4=True`, the default): the formats with an offset sum x over a step's groups once per step
instead of per group across threads, the K-quants' and Q6_K's scales come a step ahead, and Q5_*
codes take byte permutes (`_tc_q5`): 8B batch 16 Q4_K_M 1,606 -> 1,912 tok/s total, Q5_K_M 927 ->
1,487 (2026-12-05 on an H100; old and new again in one call on 2026-12-06: 1,605 -> 1,916 and 928 ->
1,497). `_tc_q5` runs only in the engine's launch, 64 rows and 4 warps (`q5_permutes`); any other
takes the Q5 codes through `bit_planes`, as Q6_K does: where Triton 3.6 multiplies by `mma.sync`
(fewer rows or warps; 64 / 4 takes `wgmma`), the `qh` bytes joined and reshaped into the codes'
shape reach the dot operand wrong (codes repeated and zeroed, H200 2026-12-06), while the asm's own
outputs stored without the dot, and codes whose `qh` bytes are loaded in their shape, are right in
every launch.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from llm.backends.torch.kernels.pdl import launch_options, use_pdl, wait_then_release
from llm.backends.torch.kernels.qgemv_common import (
    DEFAULT_PLANES,
    INT4,
    PLANES,
    bit_planes,
    family,
    group_scale,
    scale_sums,
)
from llm.backends.torch.kernels.splitk import split_groups, split_sum, tile_counters
from llm.model.quant.tensor import QuantizedTensor

# formats qgemv picks the tensor-core kernel for, above the one-row kernel's rows: all it
# computes. Q8_0, Q4_0 (H200, 2026-12-03/04); Q4_1, Q4_K (H100, 2026-12-05, with split-K: 8B
# batch 16 26.2 -> 8.5 ms a step for Q4_1, 26.1 -> 9.1 for Q4_K against the first kernel); Q5_K,
# Q6_K, Q5_0, int4_g128 (H100, 2026-12-05 19:15 UTC: 8B Q5_K batch 16 71.4 -> 18.4 ms, int4_g128
# 23.5 -> 7.5; kernels alone 2.5-4x); Q5_1 (Q5_0's high bits with Q4_1's offset) not timed alone.
_TC_FAMILIES = {0, 1, 2, 3, 4, 5, 6, 7, 8, INT4}
INT4_FMT = tl.constexpr(INT4)
TC_PICKED = _TC_FAMILIES


@triton.jit
def _tc_codes(b, OFF: tl.constexpr, COMPILED: tl.constexpr):
    """Integer codes b (0..255, after any nibble split) -> bfloat16 b - OFF, exactly (the
    float32 2^23 + b less 2^23 + OFF is an integer of at most 8 significant bits). float32 under
    the interpreter, whose tl.dot misreads bfloat16 operands."""
    f = (b.to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + OFF)
    if COMPILED:
        f = f.to(tl.bfloat16)
    return f


def _nibble_asm(high: bool, off: int) -> str:
    """PTX for 4 packed bytes ($2) -> 4 bfloat16 ($0, $1) of the low (or high) nibbles less off:
    each nibble q becomes the low byte of the bfloat16 128 + q (exponent byte 0x43, q under 7
    mantissa bits) by one byte permute per pair, then one packed fma subtracts 128 + off (an
    integer of at most 8 bits: exact)."""
    neg = 0xC300C300 + 0x10001 * off  # bfloat16x2 -(128 + off), off < 128
    take = "shr.u32 t, $2, 4; and.b32 t, t, 0x0F0F0F0F; " if high else "and.b32 t, $2, 0x0F0F0F0F; "
    return ("{ .reg .b32 t, one, neg; mov.b32 one, 0x3F803F80; mov.b32 neg, " + hex(neg) + "; "
            + take + "prmt.b32 $0, t, 0x43434343, 0x4140; prmt.b32 $1, t, 0x43434343, 0x4342; "
            "fma.rn.bf16x2 $0, $0, one, neg; fma.rn.bf16x2 $1, $1, one, neg; }")


def _q5_asm(high: bool, off: int) -> str:
    """PTX for 4 packed bytes of 4-bit codes ($2), per byte its group's `qh` byte ($3) and the
    bit of its column in it ($4: 1 << (column % 4), llm.model.quant.bits; << 4 for the high
    nibbles) -> 4 bfloat16 ($0, $1) of the 5-bit codes less off, as `_nibble_asm`: each byte's
    bit, once selected, is carried to bit 7 by adding 0x7F and moved to bit 4. Every byte
    apart: no assumption on which elements are packed together."""
    neg = 0xC300C300 + 0x10001 * off
    take = ("shr.u32 t, $2, 4; and.b32 t, t, 0x0F0F0F0F; shl.b32 s, $4, 4; and.b32 s, $3, s; "
            if high else "and.b32 t, $2, 0x0F0F0F0F; and.b32 s, $3, $4; ")
    return ("{ .reg .b32 t, s, one, neg; mov.b32 one, 0x3F803F80; mov.b32 neg, " + hex(neg) + "; "
            + take + "add.u32 s, s, 0x7F7F7F7F; and.b32 s, s, 0x80808080; shr.u32 s, s, 3; "
            "or.b32 t, t, s; prmt.b32 $0, t, 0x43434343, 0x4140; "
            "prmt.b32 $1, t, 0x43434343, 0x4342; fma.rn.bf16x2 $0, $0, one, neg; "
            "fma.rn.bf16x2 $1, $1, one, neg; }")


_LO8 = tl.constexpr(_nibble_asm(False, 8))
_HI8 = tl.constexpr(_nibble_asm(True, 8))
_LO0 = tl.constexpr(_nibble_asm(False, 0))
_HI0 = tl.constexpr(_nibble_asm(True, 0))
_Q5LO16 = tl.constexpr(_q5_asm(False, 16))
_Q5HI16 = tl.constexpr(_q5_asm(True, 16))
_Q5LO0 = tl.constexpr(_q5_asm(False, 0))
_Q5HI0 = tl.constexpr(_q5_asm(True, 0))


@triton.jit
def _tc_nibbles(b, OFF: tl.constexpr):
    """Packed 4-bit codes b (uint8; compiled only) -> bfloat16 (low nibble - OFF, high nibble -
    OFF), exactly, 4 bytes at a time (`_nibble_asm`); OFF is 8 (Q4_0) or 0."""
    lo = tl.inline_asm_elementwise(_LO8 if OFF == 8 else _LO0, "=r,=r,r", [b],
                                   dtype=tl.bfloat16, is_pure=True, pack=4)
    hi = tl.inline_asm_elementwise(_HI8 if OFF == 8 else _HI0, "=r,=r,r", [b],
                                   dtype=tl.bfloat16, is_pure=True, pack=4)
    return lo, hi


@triton.jit
def _tc_q5(b, h, bit, OFF: tl.constexpr):
    """Packed 4-bit codes b, per byte its group's `qh` byte h and its column's bit in it
    (uint8; compiled only) -> bfloat16 (low 5-bit code - OFF, high - OFF), exactly
    (`_q5_asm`); OFF 16 (Q5_0) or 0 (Q5_1, Q5_K)."""
    lo = tl.inline_asm_elementwise(_Q5LO16 if OFF == 16 else _Q5LO0, "=r,=r,r,r,r",
                                   [b, h, bit], dtype=tl.bfloat16, is_pure=True, pack=4)
    hi = tl.inline_asm_elementwise(_Q5HI16 if OFF == 16 else _Q5HI0, "=r,=r,r,r,r",
                                   [b, h, bit], dtype=tl.bfloat16, is_pure=True, pack=4)
    return lo, hi


@triton.jit
def _columns4(t):
    """The 4 columns of t [R, 4] as [R] tensors."""
    even, odd = tl.split(tl.reshape(t, [t.shape[0], 2, 2]))
    c0, c2 = tl.split(even)
    c1, c3 = tl.split(odd)
    return c0, c1, c2, c3


@triton.jit
def _step_coeffs(d_ptr, m_ptr, sc_ptr, mn_ptr, s_d, s_m, s_sc, s_mn, rows, live, g0, g_end,
                 FMT: tl.constexpr):
    """The scales of the 4 groups from g0 as [BLOCK_N, 4] (a, c) of `scale_sums`: Q8_0 / Q4_0
    d[g] (float16, c unused); Q4_K / Q5_K f(d[s]) * f(sc[g]), f(dmin[s]) * f(mins[g]); Q6_K
    f(d[s]) * f(sc) of each 16-column half (g0 a multiple of 4: the 4 groups share a
    super-block s)."""
    g4 = g0 + tl.arange(0, 4)[None, :]
    m4 = live & (g4 < g_end)
    m0 = live & ((tl.zeros([1, 1], tl.int32) + g0) < g_end)  # the super-block's scales: none
    # past the end (the caller's prefetch after the last step)
    if FMT == 5 or FMT == 6:
        a = (tl.load(d_ptr + rows * s_d + g0 // 8, mask=m0, other=0.0).to(tl.float32)
             * tl.load(sc_ptr + rows * s_sc + g4, mask=m4, other=0).to(tl.float32))
        c = (tl.load(m_ptr + rows * s_m + g0 // 8, mask=m0, other=0.0).to(tl.float32)
             * tl.load(mn_ptr + rows * s_mn + g4, mask=m4, other=0).to(tl.float32))
    elif FMT == 7:
        d = tl.load(d_ptr + rows * s_d + g0 // 8, mask=m0, other=0.0).to(tl.float32)
        a = d * tl.load(sc_ptr + rows * s_sc + 2 * g4, mask=m4, other=0).to(tl.float32)
        c = d * tl.load(sc_ptr + rows * s_sc + 2 * g4 + 1, mask=m4, other=0).to(tl.float32)
    elif FMT == 8:  # int8: the row's one scale for each group
        a = tl.load(d_ptr + rows * s_d + 0 * g4, mask=m4, other=0.0)
        c = a
    else:
        a = tl.load(d_ptr + rows * s_d + g4, mask=m4, other=0.0)  # converted by the caller
        c = a
    return a, c


@triton.jit
def _step_sums(x_ptr, ms, M, stride_x, g0, g_end, BLOCK_M: tl.constexpr):
    """Sums of x over each of the 4 groups from g0 (none past g_end) as 4 [BLOCK_M] float32:
    one load of the step's 128 columns, each thread adding a run of one group's columns."""
    kk = 32 * g0 + tl.arange(0, 128)
    xs = tl.load(x_ptr + ms[:, None] * stride_x + kk[None, :],
                 mask=(ms < M)[:, None] & (kk < 32 * g_end)[None, :], other=0.0)
    return _columns4(tl.sum(tl.reshape(xs.to(tl.float32), [BLOCK_M, 4, 32]), axis=2))


@triton.jit
def _tc_group(acc, d, c, sx, g, x_cols, xmask, qs_ptr, qh_ptr, d_ptr, m_ptr, sc_ptr, mn_ptr,
              s_qs, s_qh, s_d, s_m, s_sc, s_mn, rows, n_live, i16, g_end, FMT: tl.constexpr,
              GS: tl.constexpr, BLOCK_N: tl.constexpr, FAST: tl.constexpr, V4: tl.constexpr,
              PRE: tl.constexpr, OFFSET: tl.constexpr, Q5P: tl.constexpr, COMPILED: tl.constexpr):
    """acc [BLOCK_N, BLOCK_M] + the products of group g (nothing where g >= g_end, the end of
    the program's groups); d, c [BLOCK_N, 1]: the group's coefficients of `scale_sums` where
    PRE (loaded ahead by the caller, `_step_coeffs`), else loaded here; sx [BLOCK_M]: the sum of
    x over the group where V4 and OFFSET (the format has an offset; `_step_sums`), else summed
    here if OFFSET. Q5_* / Q6_K: the codes' high bits from `qh` (Q5_* by `_tc_q5` where Q5P,
    compiled: `q5_permutes`; else `bit_planes`)."""
    inside = (tl.zeros([1, 1], tl.int32) + g) < g_end  # [1, 1] (the interpreter misreads a
    # splat comparison of scalars as a mask)
    live = n_live[:, None] & inside
    x0 = tl.load(x_cols + 32 * g, mask=xmask & inside, other=0.0)
    x1 = tl.load(x_cols + 32 * g + 16, mask=xmask & inside, other=0.0)
    if not COMPILED:  # see _tc_codes
        x0 = x0.to(tl.float32)
        x1 = x1.to(tl.float32)
    if FMT == 0 or FMT == 8:  # int8 codes: columns 0..15 and 16..31 of the group
        at = qs_ptr + rows * s_qs + 32 * g + i16[None, :]
        a0 = _tc_codes(tl.load(at, mask=live, other=0).to(tl.int32) + 128, 128.0, COMPILED)
        a1 = _tc_codes(tl.load(at + 16, mask=live, other=0).to(tl.int32) + 128, 128.0, COMPILED)
    else:  # byte i: column i (low nibble) and 16 + i (high nibble)
        bq = tl.load(qs_ptr + rows * s_qs + 16 * g + i16[None, :], mask=live, other=0)
        if (FMT == 3 or FMT == 4 or FMT == 6) and COMPILED and Q5P:
            q4 = tl.load(qh_ptr + rows * s_qh + 4 * g + tl.arange(0, 4)[None, :], mask=live,
                         other=0)  # [BLOCK_N, 4] the group's qh bytes: byte i // 4 for column i
            qb = tl.reshape(tl.join(tl.join(q4, q4), tl.join(q4, q4)), [BLOCK_N, 16])
            bit = tl.broadcast_to((1 << (i16 % 4)).to(tl.uint8)[None, :], [BLOCK_N, 16])
            a0, a1 = _tc_q5(bq, qb, bit, 16 if FMT == 3 else 0)
        elif FMT == 3 or FMT == 4 or FMT == 6 or FMT == 7:  # and their high bits from `qh`
            i = i16[None, :]  # [1, 16]: columns i and 16 + i, the lanes (i // 8, i % 8)
            h0, h1 = bit_planes(qh_ptr, rows, s_qh, g, i // 8, i % 8, live, FMT)
            off5: tl.constexpr = 16 if FMT == 3 else (32 if FMT == 7 else 0)
            a0 = _tc_codes((bq.to(tl.int32) & 15) | h0, off5, COMPILED)
            a1 = _tc_codes((bq.to(tl.int32) >> 4) | h1, off5, COMPILED)
        else:
            off: tl.constexpr = 8 if FMT == 1 else 0
            if COMPILED and FAST:
                a0, a1 = _tc_nibbles(bq, off)
            else:
                a0 = _tc_codes(bq.to(tl.int32) & 15, off, COMPILED)
                a1 = _tc_codes(bq.to(tl.int32) >> 4, off, COMPILED)
    if FMT == 7:  # Q6_K: a scale per 16-column half, so the halves' sums apart
        S = tl.dot(a0, x0)
        T = tl.dot(a1, x1)
    else:
        S = tl.dot(a1, x1, tl.dot(a0, x0))  # [BLOCK_N, BLOCK_M] sum over the group of x * q'
        if OFFSET and not V4:  # the sum of x over the group, for the offset
            T = (tl.sum(x0.to(tl.float32), axis=0) + tl.sum(x1.to(tl.float32), axis=0))[None, :]
        else:
            T = sx[None, :]  # `_step_sums` (unread without an offset)
    if PRE:
        acc += scale_sums(S, T, d, c, FMT, COMPILED)
    else:
        g2 = tl.full([BLOCK_N, 1], 0, tl.int32) + g
        acc += group_scale(S, T, rows, g2, live, d_ptr, m_ptr, sc_ptr, mn_ptr, s_d, s_m, s_sc,
                           s_mn, FMT, GS, COMPILED)
    return acc


@triton.jit
def _qgemm_tc_kernel(x_ptr, y_ptr, b_ptr, qs_ptr, qh_ptr, d_ptr, m_ptr, sc_ptr, mn_ptr, p_ptr,
                     cnt_ptr, M, N, stride_x, stride_y, s_qs, s_qh, s_d, s_m, s_sc, s_mn,
                     K: tl.constexpr,
                     FMT: tl.constexpr, GS: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, SPLITS: tl.constexpr, SPLIT_G: tl.constexpr,
                     FAST: tl.constexpr, V4: tl.constexpr, Q5P: tl.constexpr,
                     HAS_BIAS: tl.constexpr, COMPILED: tl.constexpr, USE_GDC: tl.constexpr):
    """y[:, n0:n0 + BLOCK_N] (n0 = program * BLOCK_N) for up to BLOCK_M (>= 16) rows of x, four
    32-groups per step: per group, its codes (exact in bf16) times x's 32 columns on the tensor
    cores (fp32 accumulation), then the group's scale (and offset times the sum of x) in fp32,
    in the order of the format's dequantize where x is a unit vector. The codes and x go through
    the compiler's pipelined copies; the Q8_0 / Q4_0 (V4: and K-quant) scales of the next
    step are loaded one step ahead into registers ([BLOCK_N, 4], split into columns), so no
    step waits on them; V4: x's sums over the step's groups once per step (`_step_sums`).
    SPLITS > 1 (split-K, kernels/splitk.py): program (pid, s) sums groups s * SPLIT_G up to the
    next split's first into a float32 partial; the tile's last program adds the partials."""
    NG: tl.constexpr = K // 32
    pid = tl.program_id(0)
    if SPLITS == 1:
        g_lo = 0
        g_hi = NG
    else:
        g_lo = tl.program_id(1) * SPLIT_G
        g_hi = tl.minimum(g_lo + SPLIT_G, NG)
    ns = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_live = ns < N
    rows = ns[:, None]  # [BLOCK_N, 1]
    i16 = tl.arange(0, 16)
    ms = tl.arange(0, BLOCK_M)
    xmask = (ms < M)[None, :]  # [1, BLOCK_M]
    x_cols = x_ptr + ms[None, :] * stride_x + i16[:, None]  # [16, BLOCK_M]: x^T, 16 columns
    wait_then_release(USE_GDC)
    # the groups' coefficients loaded a step ahead; the format adds an offset times the sum of x
    PRE: tl.constexpr = (FMT == 0 or FMT == 1 or FMT == 8
                         or (V4 and (FMT == 5 or FMT == 6 or FMT == 7)))
    OFFSET: tl.constexpr = FMT == 2 or FMT == 4 or FMT == 5 or FMT == 6 or FMT == INT4_FMT
    if PRE:
        a_next, c_next = _step_coeffs(d_ptr, m_ptr, sc_ptr, mn_ptr, s_d, s_m, s_sc, s_mn, rows,
                                      n_live[:, None], g_lo, g_hi, FMT)
    else:  # scales loaded per group by group_scale
        a_next = tl.zeros([BLOCK_N, 4], tl.float32)
        c_next = a_next
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    for g0 in range(g_lo, g_hi, 4):
        d0, d1, d2, d3 = _columns4(a_next.to(tl.float32))  # [BLOCK_N] groups g0 .. g0 + 3
        e0, e1, e2, e3 = _columns4(c_next.to(tl.float32))
        if PRE:
            a_next, c_next = _step_coeffs(d_ptr, m_ptr, sc_ptr, mn_ptr, s_d, s_m, s_sc, s_mn,
                                          rows, n_live[:, None], g0 + 4, g_hi, FMT)
        if V4 and OFFSET:
            sx0, sx1, sx2, sx3 = _step_sums(x_ptr, ms, M, stride_x, g0, g_hi, BLOCK_M)
        else:  # not read
            sx0 = tl.zeros([BLOCK_M], tl.float32)
            sx1 = sx0
            sx2 = sx0
            sx3 = sx0
        acc = _tc_group(acc, d0[:, None], e0[:, None], sx0, g0, x_cols, xmask, qs_ptr, qh_ptr,
                        d_ptr, m_ptr, sc_ptr, mn_ptr, s_qs, s_qh, s_d, s_m, s_sc, s_mn, rows,
                        n_live, i16, g_hi, FMT, GS, BLOCK_N, FAST, V4, PRE, OFFSET, Q5P,
                        COMPILED)
        acc = _tc_group(acc, d1[:, None], e1[:, None], sx1, g0 + 1, x_cols, xmask, qs_ptr, qh_ptr,
                        d_ptr, m_ptr, sc_ptr, mn_ptr, s_qs, s_qh, s_d, s_m, s_sc, s_mn, rows,
                        n_live, i16, g_hi, FMT, GS, BLOCK_N, FAST, V4, PRE, OFFSET, Q5P,
                        COMPILED)
        acc = _tc_group(acc, d2[:, None], e2[:, None], sx2, g0 + 2, x_cols, xmask, qs_ptr, qh_ptr,
                        d_ptr, m_ptr, sc_ptr, mn_ptr, s_qs, s_qh, s_d, s_m, s_sc, s_mn, rows,
                        n_live, i16, g_hi, FMT, GS, BLOCK_N, FAST, V4, PRE, OFFSET, Q5P,
                        COMPILED)
        acc = _tc_group(acc, d3[:, None], e3[:, None], sx3, g0 + 3, x_cols, xmask, qs_ptr, qh_ptr,
                        d_ptr, m_ptr, sc_ptr, mn_ptr, s_qs, s_qh, s_d, s_m, s_sc, s_mn, rows,
                        n_live, i16, g_hi, FMT, GS, BLOCK_N, FAST, V4, PRE, OFFSET, Q5P,
                        COMPILED)
    live = xmask & n_live[:, None]
    if SPLITS == 1:
        out = acc
    else:  # acc: this split's partial; out: the sum (in the last program)
        out, live = split_sum(acc, p_ptr, cnt_ptr, ms[None, :] * N + rows, live, pid,
                              tl.program_id(1), SPLITS, M * N)
    if HAS_BIAS:
        out += tl.load(b_ptr + ns, mask=n_live, other=0.0).to(tl.float32)[:, None]
    tl.store(y_ptr + ms[None, :] * stride_y + rows, out.to(y_ptr.dtype.element_ty), mask=live)


def tc_kernel_runs(x: torch.Tensor, w: QuantizedTensor) -> bool:
    """Whether the tensor-core kernel (`_qgemm_tc_kernel`) can take x and w: bf16 activations
    on a GPU (not the interpreter: tl.dot there is not bf16 x bf16 -> fp32 as compiled), a
    format it implements, whole 32-groups."""
    if x.dtype != torch.bfloat16 or w.in_features % 32:
        return False
    fmt, gs = family(w.format)
    return fmt in _TC_FAMILIES and gs % 32 == 0


def q5_permutes(block_n: int, num_warps: int, fast: bool, v4: bool) -> bool:
    """Whether a launch builds Q5 codes by `_tc_q5`: v4 and fast, in the one launch where it is
    right on the GPU (64 rows, 4 warps: the engine's, `qgemv_config.TC_RULE`, multiplied by
    `wgmma`); launches that Triton 3.6 multiplies by `mma.sync` (16 / 1, 32 / 2, 16 / 4, 64 / 1)
    got wrong codes from the joined `qh` bytes (module docstring)."""
    return fast and v4 and block_n == 64 and num_warps == 4


def qgemm_tc(x: torch.Tensor, w: QuantizedTensor, bias: torch.Tensor | None = None,
             block_n: int = 64, num_warps: int = 4, num_stages: int = 3, fast: bool = True,
             pdl: bool | None = None, split_k: int = 1,
             out_dtype: torch.dtype | None = None, v4: bool = True) -> torch.Tensor:
    """x [M, K] (bf16, M <= 64) @ w.dequantize().T (+ bias) on the tensor cores -> [M, N] in
    out_dtype (default x's). fast: 4-bit codes to bfloat16 by byte permutes (`_tc_nibbles`),
    else through float32 (`_tc_codes`). split_k: at most this many programs along K
    (kernels/splitk.py; `split_groups` says how many run), their partials added in a fixed
    order, so the result is the same on every call."""
    fmt, gs = family(w.format)
    m, k = x.shape
    n = w.out_features
    names = PLANES.get(w.format, DEFAULT_PLANES)
    planes = [w.planes[p] if p in w.planes else None for p in names]
    planes = [x if p is None else (p if p.stride(1) == 1 else p.contiguous()) for p in planes]
    y = torch.empty(m, n, dtype=out_dtype or x.dtype, device=x.device)
    tiles = triton.cdiv(n, block_n)
    split_g, splits = split_groups(k // 32, split_k)
    if splits > 1:
        partials = torch.empty(splits, m, n, dtype=torch.float32, device=x.device)
        counters = tile_counters(x.device, tiles)
    else:
        partials = counters = y  # not read
    gdc = use_pdl(x, pdl)
    _qgemm_tc_kernel[(tiles, splits)](
        x, y, bias if bias is not None else x, *planes, partials, counters, m, n, x.stride(0),
        y.stride(0), *(p.stride(0) for p in planes), K=k, FMT=fmt, GS=gs,
        BLOCK_M=max(16, triton.next_power_of_2(m)), BLOCK_N=block_n, SPLITS=splits,
        SPLIT_G=split_g, FAST=fast, V4=v4, Q5P=q5_permutes(block_n, num_warps, fast, v4),
        HAS_BIAS=bias is not None,
        COMPILED=not os.environ.get("TRITON_INTERPRET"), USE_GDC=gdc, num_warps=num_warps,
        num_stages=num_stages, **launch_options(gdc))
    return y
