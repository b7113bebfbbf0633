"""Small-batch GEMV on quantized weights as stored (`QuantizedTensor`), for decode (M <= 16).

y = x @ W.T with W [N, K] given by its planes (llm.model.quant): each program owns BLOCK_N rows
and walks K in BLOCK_K chunks (no split-K). A chunk is BLOCK_K/16 half-groups of 8 lanes: lane e
of half-group h is column 32g + 8*(h%2) + e of group g = h // 2 ("lo") and that column + 16
("hi"), i.e. the two nibbles of byte 8h + e of every 4-bit format, so the chunk's packed bytes
are contiguous and one 8-byte load feeds 16 weights. Codes and scales are loaded packed,
dequantized in fp32 registers with the formula and operation order of the format's `dequantize`
(the weight values are ggml's, bit for bit), multiplied with x in fp32 and accumulated in fp32
([BLOCK_N, H, 8] accumulators per row of x, summed over K once at the end). At batch 1, x is
loaded as a tile of the weights' own shape and lane width, so the compiler keeps both in one
register layout (a [H, 8] x tile would be shuffled through shared memory every chunk).

Codes become floats without an int-to-float conversion: a code c in 0..255 OR-ed into the bits of
2^23 is the float 2^23 + c, and subtracting 2^23 + offset gives c - offset exactly. Compiled, the
4-bit formats do this 4 bytes at a time with byte permutes (`_nibbles`).

Q4_K/Q5_K compute (d*sc)*q - dmin*m with the product rounded before the difference; compiled,
that product is `mul.rn` (libdevice), which the compiler may not fuse into the subtraction. In
every other format the products that precede an addition are exact (fp16/bf16 scale times a
code of at most 8 bits), so a fused multiply-add cannot change the weight.

Speed (H200, measured 2026-12-03, kernels/qgemv_config.py): at batch 1 Q8_0/int8 read their bytes
at 2.4-2.6 TB/s, near the bf16 GEMV's 3.9 TB/s; the 4-bit formats reach 1.2-1.8 TB/s, limited
by the per-weight instructions (unpack, unbias, scale, multiply-add, x conversion), not by
memory. Batch 8 multiplies the fp32 multiply-adds by 8 and is slower than bf16 cuBLAS.

v2 (below, same file): for one row of bf16 / fp16 x, `_qgemv_w_kernel` gives each thread whole
halves of 32-groups of several rows of w, so x is converted once per thread and the group scale
is applied once per group sum (8B gate_up Q4_0 23 us = 69% of the copy bandwidth, Q8_0 89%; the
first kernel 45% / 67%). For 2..16 rows, `_qgemm_tc_kernel` multiplies the exact codes with x on
the tensor cores per 32-group and scales each group's sums in fp32 (8B Q4_0 batch 8: 1.7x the
first kernel, still 1.7x slower than bf16; see docs/performance.md).

One kernel, specialised per format family by the constexpr FMT. `qgemv` falls back to
`quantized_linear` (dequantize, then F.linear) where Triton cannot run: CPU tensors outside the
interpreter.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import libdevice

from llm.backends.torch.kernels.pdl import launch_options, use_pdl, wait_then_release
from llm.backends.torch.kernels.qgemv_config import (
    QGemvConfig,
    QGemvWConfig,
    qgemm_tc_config,
    qgemv_config,
    qgemv_w_config,
)
from llm.model.quant.linear import quantized_linear
from llm.model.quant.tensor import QuantizedTensor

MAX_M = 16  # rows of x one launch handles
# format family -> FMT id; int4_g<G> is Q4_1's formula with bf16 scales per G columns
_FAMILIES = {"q8_0": 0, "q4_0": 1, "q4_1": 2, "q5_0": 3, "q5_1": 4, "q4_k": 5, "q5_k": 6,
             "q6_k": 7, "int8": 8}
_INT4 = 9
# plane names the kernel's pointers qs, qh, d, m, sc, mn stand for, per family (None: unused)
_PLANES = {"q4_k": ("qs", "qh", "d", "dmin", "scales", "mins"),
           "q5_k": ("qs", "qh", "d", "dmin", "scales", "mins"),
           "q6_k": ("qs", "qh", "d", None, "scales", None)}
_DEFAULT_PLANES = ("qs", "qh", "d", "m", None, None)


@triton.jit
def _unbias(f, offset: tl.constexpr):
    """f = 2^23 + c (float32, c an integer code 0..255) -> c - offset, exactly."""
    return f - (8388608.0 + offset)


@triton.jit
def _code(c, offset: tl.constexpr):
    """Integer codes c (0..255) -> float32 c - offset, exactly (see the module docstring)."""
    return _unbias((c.to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True), offset)


@triton.jit
def _nibbles(b, COMPILED: tl.constexpr):
    """Packed bytes b (uint8) -> (2^23 + low nibble, 2^23 + high nibble) as float32.

    Compiled, 4 bytes at a time: one mask (or shift and mask) per 32-bit word, then one byte
    permute per code that drops it under the exponent bits of 2^23."""
    if COMPILED:
        lo = tl.inline_asm_elementwise(
            "{ .reg .b32 t; and.b32 t, $4, 0x0F0F0F0F; prmt.b32 $0, t, 0x4B000000, 0x7540; "
            "prmt.b32 $1, t, 0x4B000000, 0x7541; prmt.b32 $2, t, 0x4B000000, 0x7542; "
            "prmt.b32 $3, t, 0x4B000000, 0x7543; }",
            "=r,=r,=r,=r,r", [b], dtype=tl.float32, is_pure=True, pack=4)
        hi = tl.inline_asm_elementwise(
            "{ .reg .b32 t; shr.u32 t, $4, 4; and.b32 t, t, 0x0F0F0F0F; "
            "prmt.b32 $0, t, 0x4B000000, 0x7540; prmt.b32 $1, t, 0x4B000000, 0x7541; "
            "prmt.b32 $2, t, 0x4B000000, 0x7542; prmt.b32 $3, t, 0x4B000000, 0x7543; }",
            "=r,=r,=r,=r,r", [b], dtype=tl.float32, is_pure=True, pack=4)
        return lo, hi
    c = b.to(tl.int32)
    lo = ((c & 15) | 0x4B000000).to(tl.float32, bitcast=True)
    return lo, ((c >> 4) | 0x4B000000).to(tl.float32, bitcast=True)


@triton.jit
def _mul_rn(a, b, COMPILED: tl.constexpr):
    """a * b rounded to fp32, never fused with a following add."""
    if COMPILED:
        return libdevice.mul_rn(a, b)
    return a * b


@triton.jit
def _load_f32(ptr, rows, stride, idx, mask):
    """ptr[rows, idx] as float32 ([BLOCK_N, H] from rows [BLOCK_N, 1] and idx [1, H])."""
    return tl.load(ptr + rows * stride + idx, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _bit_planes(qh_ptr, rows3, s_qh, g3, half3, e3, mask, FMT: tl.constexpr):
    """High code bits (already shifted to bits 4+) of the lo and hi lanes [BLOCK_N, H, 8]; the
    lo lane (half, e) of group g is column 32g + 8*half + e."""
    if FMT == 7:  # Q6_K: byte 8g+e, bits 2s..2s+1 for column 32g+8s+e
        h = tl.load(qh_ptr + rows3 * s_qh + 8 * g3 + e3, mask=mask, other=0).to(tl.int32)
        s = 2 * half3
        return ((h >> s) & 3) << 4, ((h >> (s + 4)) & 3) << 4
    # Q5_*: byte 4g+b bit e for column 32g+8b+e
    base = qh_ptr + rows3 * s_qh + 4 * g3 + half3
    lo = tl.load(base, mask=mask, other=0).to(tl.int32)
    hi = tl.load(base + 2, mask=mask, other=0).to(tl.int32)
    return ((lo >> e3) & 1) << 4, ((hi >> e3) & 1) << 4


@triton.jit
def _dequant_chunk(qs_ptr, qh_ptr, d_ptr, m_ptr, sc_ptr, mn_ptr, s_qs, s_qh, s_d, s_m, s_sc,
                   s_mn, ns, n_live, h0, K: tl.constexpr, FMT: tl.constexpr, GS: tl.constexpr,
                   H: tl.constexpr, COMPILED: tl.constexpr):
    """Weights of the lo and hi lanes of half-groups h0 .. h0+H-1, each [BLOCK_N, H, 8] fp32.

    Half-group h holds lanes 8*(h%2) .. +7 of group h//2, so the packed 4-bit bytes of the
    chunk are at 8h + e, contiguous."""
    rows = ns[:, None]  # [BLOCK_N, 1]
    hs = h0 + tl.arange(0, H)[None, :]  # [1, H] half-group index
    gs = hs // 2  # its group
    rows3 = rows[:, :, None]
    h3 = hs[:, :, None]
    g3 = gs[:, :, None]
    half3 = h3 % 2
    e3 = tl.arange(0, 8)[None, None, :]
    col_lo = 32 * g3 + 8 * half3 + e3  # [1, H, 8]
    gmask = n_live[:, None] & (gs < K // 32)  # [BLOCK_N, H]
    if K % 32 == 0:  # whole groups: masks constant along the 8 lanes, so loads stay wide
        m_lo = gmask[:, :, None]
        m_hi = m_lo
    else:  # int8 (block 1): a partial last group
        m_lo = n_live[:, None, None] & (col_lo < K)
        m_hi = n_live[:, None, None] & (col_lo + 16 < K)
        gmask = n_live[:, None] & (32 * gs < K)
    if FMT == 0 or FMT == 8:  # 8-bit codes, one byte per column
        lo = tl.load(qs_ptr + rows3 * s_qs + col_lo, mask=m_lo, other=0).to(tl.int32) + 128
        hi = tl.load(qs_ptr + rows3 * s_qs + col_lo + 16, mask=m_hi, other=0).to(tl.int32) + 128
        if FMT == 0:  # Q8_0: f(qs) * f(d[g])
            d = _load_f32(d_ptr, rows, s_d, gs, gmask)[:, :, None]
        else:  # int8: f(qs) * d[n]
            d = tl.load(d_ptr + ns * s_d, mask=n_live, other=0.0)[:, None, None]
        return _code(lo, 128.0) * d, _code(hi, 128.0) * d
    b = tl.load(qs_ptr + rows3 * s_qs + 8 * h3 + e3, mask=m_lo, other=0)
    if FMT == 3 or FMT == 4 or FMT == 6 or FMT == 7:  # a 5th/6th code bit from qh
        h_lo, h_hi = _bit_planes(qh_ptr, rows3, s_qh, g3, half3, e3, m_lo, FMT)
        lo = ((b.to(tl.int32) & 15) | h_lo | 0x4B000000).to(tl.float32, bitcast=True)
        hi = ((b.to(tl.int32) >> 4) | h_hi | 0x4B000000).to(tl.float32, bitcast=True)
    else:
        lo, hi = _nibbles(b, COMPILED)
    # lo, hi: 2^23 + code as float32; _unbias(f, o) = code - o, exactly
    if FMT == 7:  # Q6_K: (f(d[s]) * f(scales[k // 16])) * f(q - 32)
        d = _load_f32(d_ptr, rows, s_d, gs // 8, gmask)
        a_lo = (d * _load_f32(sc_ptr, rows, s_sc, 2 * gs, gmask))[:, :, None]
        a_hi = (d * _load_f32(sc_ptr, rows, s_sc, 2 * gs + 1, gmask))[:, :, None]
        return a_lo * _unbias(lo, 32.0), a_hi * _unbias(hi, 32.0)
    if FMT == 5 or FMT == 6:  # Q4_K/Q5_K: (f(d[s]) * f(sc[g])) * f(q) - f(dmin[s]) * f(mins[g])
        a = _load_f32(d_ptr, rows, s_d, gs // 8, gmask) * _load_f32(sc_ptr, rows, s_sc, gs, gmask)
        c = _load_f32(m_ptr, rows, s_m, gs // 8, gmask) * _load_f32(mn_ptr, rows, s_mn, gs, gmask)
        a = a[:, :, None]
        c = c[:, :, None]
        return (_mul_rn(a, _unbias(lo, 0.0), COMPILED) - c,
                _mul_rn(a, _unbias(hi, 0.0), COMPILED) - c)
    if FMT == 9:  # int4_g<GS>: scale and offset per GS columns
        gi = (32 * gs) // GS
    else:
        gi = gs
    d = _load_f32(d_ptr, rows, s_d, gi, gmask)[:, :, None]
    if FMT == 1:  # Q4_0: f(d[g]) * f(q - 8)
        return d * _unbias(lo, 8.0), d * _unbias(hi, 8.0)
    if FMT == 3:  # Q5_0: f(d[g]) * f(q - 16)
        return d * _unbias(lo, 16.0), d * _unbias(hi, 16.0)
    # Q4_1, Q5_1, int4: f(d[g]) * f(q) + f(m[g])
    m = _load_f32(m_ptr, rows, s_m, gi, gmask)[:, :, None]
    return d * _unbias(lo, 0.0) + m, d * _unbias(hi, 0.0) + m


@triton.jit
def _chunk(acc, x_ptr, qs_ptr, qh_ptr, d_ptr, m_ptr, sc_ptr, mn_ptr, M, stride_x, s_qs, s_qh,
           s_d, s_m, s_sc, s_mn, ns, n_live, ms, lane, k0, K: tl.constexpr, FMT: tl.constexpr,
           GS: tl.constexpr, H: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
           COMPILED: tl.constexpr):
    """acc + the products of columns k0 .. k0 + 16H - 1."""
    w_lo, w_hi = _dequant_chunk(qs_ptr, qh_ptr, d_ptr, m_ptr, sc_ptr, mn_ptr, s_qs, s_qh, s_d,
                                s_m, s_sc, s_mn, ns, n_live, k0 // 16, K, FMT, GS, H, COMPILED)
    if BLOCK_M == 1:
        # x as a [BLOCK_N, H, 8] tile (every row the same): the weights' shape and lane width,
        # so the compiler gives it their register layout (no shuffle through shared memory);
        # the repeated reads hit L1
        cols = tl.broadcast_to((k0 + lane)[None, :, :], [BLOCK_N, H, 8])
        x_lo = tl.load(x_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
        x_hi = tl.load(x_ptr + cols + 16, mask=cols + 16 < K, other=0.0).to(tl.float32)
        acc += x_lo * w_lo
        acc += x_hi * w_hi
    else:
        cols = (k0 + lane)[None, None, :, :]  # [1, 1, H, 8]
        x_rows = x_ptr + ms * stride_x + cols
        x_lo = tl.load(x_rows, mask=(ms < M) & (cols < K), other=0.0).to(tl.float32)
        x_hi = tl.load(x_rows + 16, mask=(ms < M) & (cols + 16 < K), other=0.0)
        acc += x_lo * w_lo[None, :, :, :]
        acc += x_hi.to(tl.float32) * w_hi[None, :, :, :]
    return acc


@triton.jit
def _qgemv_kernel(x_ptr, y_ptr, b_ptr, qs_ptr, qh_ptr, d_ptr, m_ptr, sc_ptr, mn_ptr, M, N,
                  stride_x, stride_y, s_qs, s_qh, s_d, s_m, s_sc, s_mn, K: tl.constexpr,
                  FMT: tl.constexpr, GS: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                  COMPILED: tl.constexpr, USE_GDC: tl.constexpr):
    """y[:, n0:n0 + BLOCK_N] for n0 = program * BLOCK_N."""
    H: tl.constexpr = BLOCK_K // 16  # half-groups of 8 lanes per chunk
    pid = tl.program_id(0)
    ns = pid * BLOCK_N + tl.arange(0, BLOCK_N)  # rows of w = columns of y
    n_live = ns < N
    ms = tl.arange(0, BLOCK_M)[:, None, None, None]  # [BLOCK_M, 1, 1, 1] rows of x
    hs = tl.arange(0, H)[:, None]
    lane = 32 * (hs // 2) + 8 * (hs % 2) + tl.arange(0, 8)[None, :]  # [H, 8] lo columns
    wait_then_release(USE_GDC)
    if BLOCK_M == 1:  # [BLOCK_N, H, 8]: the weights' own layout
        acc = tl.zeros([BLOCK_N, H, 8], tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N, H, 8], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        acc = _chunk(acc, x_ptr, qs_ptr, qh_ptr, d_ptr, m_ptr, sc_ptr, mn_ptr, M, stride_x, s_qs,
                     s_qh, s_d, s_m, s_sc, s_mn, ns, n_live, ms, lane, k0, K, FMT, GS, H,
                     BLOCK_M, BLOCK_N, COMPILED)
    if BLOCK_M == 1:
        out = tl.sum(tl.sum(acc, axis=2), axis=1)[None, :]  # [1, BLOCK_N]
    else:
        out = tl.sum(tl.sum(acc, axis=3), axis=2)  # [BLOCK_M, BLOCK_N]
    if HAS_BIAS:
        out += tl.load(b_ptr + ns, mask=n_live, other=0.0).to(tl.float32)[None, :]
    rows = tl.arange(0, BLOCK_M)[:, None]
    tl.store(y_ptr + rows * stride_y + ns[None, :], out.to(y_ptr.dtype.element_ty),
             mask=(rows < M) & n_live[None, :])


# ---- v2: whole 32-groups per thread, weights dequantized once for all rows of x -------------
# Formats of the v2 kernel (FMT ids as above): codes read as 32-bit words, x as 64-bit words.
_WORD_FAMILIES = {0, 1, 2, 5, _INT4}


@triton.jit
def _x_words(xw_ptr, idx, mask, XF16: tl.constexpr, COMPILED: tl.constexpr):
    """64-bit words of x (4 bf16 / fp16 values each) at idx -> the 4 values as float32."""
    v = tl.load(xw_ptr + idx, mask=mask, other=0)
    if COMPILED:
        if XF16:
            return tl.inline_asm_elementwise(
                "{ .reg .b32 a, b; .reg .b16 h0, h1, h2, h3; mov.b64 {a, b}, $4; "
                "mov.b32 {h0, h1}, a; mov.b32 {h2, h3}, b; cvt.f32.f16 $0, h0; "
                "cvt.f32.f16 $1, h1; cvt.f32.f16 $2, h2; cvt.f32.f16 $3, h3; }",
                "=r,=r,=r,=r,l", [v], dtype=(tl.float32,) * 4, is_pure=True, pack=1)
        return tl.inline_asm_elementwise(
            "{ .reg .b32 a, b; mov.b64 {a, b}, $4; shl.b32 $0, a, 16; "
            "and.b32 $1, a, 0xFFFF0000; shl.b32 $2, b, 16; and.b32 $3, b, 0xFFFF0000; }",
            "=r,=r,=r,=r,l", [v], dtype=(tl.float32,) * 4, is_pure=True, pack=1)
    out = ()
    for e in tl.static_range(4):
        bits = ((v >> (16 * e)) & 0xFFFF).to(tl.uint32)
        if XF16:
            out = out + (bits.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32),)
        else:
            out = out + ((bits << 16).to(tl.float32, bitcast=True),)
    return out


@triton.jit
def _codes4(w, MAGIC: tl.constexpr, COMPILED: tl.constexpr):
    """A 32-bit word of 4-bit codes (bytes b0..b3: low nibbles lo_e, high nibbles hi_e) ->
    (lo_0..lo_3, hi_0..hi_3) as float32 2^23 + q (exact), or with MAGIC 0.5 + q / 256 (exact)."""
    if COMPILED:
        if MAGIC:
            return tl.inline_asm_elementwise(
                "{ .reg .b32 t, u; and.b32 t, $8, 0x0F0F0F0F; shr.u32 u, $8, 4; "
                "and.b32 u, u, 0x0F0F0F0F; "
                "prmt.b32 $0, t, 0x3F000000, 0x7044; prmt.b32 $1, t, 0x3F000000, 0x7144; "
                "prmt.b32 $2, t, 0x3F000000, 0x7244; prmt.b32 $3, t, 0x3F000000, 0x7344; "
                "prmt.b32 $4, u, 0x3F000000, 0x7044; prmt.b32 $5, u, 0x3F000000, 0x7144; "
                "prmt.b32 $6, u, 0x3F000000, 0x7244; prmt.b32 $7, u, 0x3F000000, 0x7344; }",
                "=r,=r,=r,=r,=r,=r,=r,=r,r", [w], dtype=(tl.float32,) * 8, is_pure=True, pack=1)
        return tl.inline_asm_elementwise(
            "{ .reg .b32 t, u; and.b32 t, $8, 0x0F0F0F0F; shr.u32 u, $8, 4; "
            "and.b32 u, u, 0x0F0F0F0F; "
            "prmt.b32 $0, t, 0x4B000000, 0x7540; prmt.b32 $1, t, 0x4B000000, 0x7541; "
            "prmt.b32 $2, t, 0x4B000000, 0x7542; prmt.b32 $3, t, 0x4B000000, 0x7543; "
            "prmt.b32 $4, u, 0x4B000000, 0x7540; prmt.b32 $5, u, 0x4B000000, 0x7541; "
            "prmt.b32 $6, u, 0x4B000000, 0x7542; prmt.b32 $7, u, 0x4B000000, 0x7543; }",
            "=r,=r,=r,=r,=r,=r,=r,=r,r", [w], dtype=(tl.float32,) * 8, is_pure=True, pack=1)
    out = ()
    for s in tl.static_range(2):
        for e in tl.static_range(4):
            q = ((w >> (8 * e + 4 * s)) & 15).to(tl.float32)
            if MAGIC:
                out = out + (0.5 + q / 256.0,)
            else:
                out = out + (q + 8388608.0,)
    return out


@triton.jit
def _codes8(w, COMPILED: tl.constexpr):
    """A 32-bit word of 4 int8 codes c_e -> float32 2^23 + 128 + c_e (exact)."""
    if COMPILED:
        return tl.inline_asm_elementwise(
            "{ .reg .b32 t; xor.b32 t, $4, 0x80808080; "
            "prmt.b32 $0, t, 0x4B000000, 0x7540; prmt.b32 $1, t, 0x4B000000, 0x7541; "
            "prmt.b32 $2, t, 0x4B000000, 0x7542; prmt.b32 $3, t, 0x4B000000, 0x7543; }",
            "=r,=r,=r,=r,r", [w], dtype=(tl.float32,) * 4, is_pure=True, pack=1)
    out = ()
    for e in tl.static_range(4):
        c = (((w >> (8 * e)) & 255) ^ 128).to(tl.float32)
        out = out + (c + 8388608.0,)
    return out


@triton.jit
def _group_scale(S, sx, rows2, g2, mask2, d_ptr, m_ptr, sc_ptr, mn_ptr, s_d, s_m, s_sc, s_mn,
                 FMT: tl.constexpr, GS: tl.constexpr, COMPILED: tl.constexpr):
    # rows2, g2: broadcastable row and 32-group indices of S
    """Sum over a group of x * w from S = sum x * q' (q' the code the format multiplies by its
    scale: q - 8 for Q4_0, the signed code for Q8_0, q for the rest) and sx = sum x, in the
    order of the format's dequantize where x is one column's unit vector (so that one-hot x reads
    the exact weight back)."""
    if FMT == 0 or FMT == 1:  # f(d[g]) * q'
        return _load_f32(d_ptr, rows2, s_d, g2, mask2) * S
    if FMT == 5:  # (f(d[s]) * f(sc[g])) * q - f(dmin[s]) * f(mins[g])
        a = _load_f32(d_ptr, rows2, s_d, g2 // 8, mask2) * _load_f32(sc_ptr, rows2, s_sc, g2,
                                                                     mask2)
        c = _load_f32(m_ptr, rows2, s_m, g2 // 8, mask2) * _load_f32(mn_ptr, rows2, s_mn, g2,
                                                                     mask2)
        return _mul_rn(a, S, COMPILED) - c * sx
    if FMT == 9:  # int4_g<GS>
        gi = (32 * g2) // GS
    else:
        gi = g2
    # Q4_1, int4: f(d[g]) * q + f(m[g])
    d = _load_f32(d_ptr, rows2, s_d, gi, mask2)
    return _mul_rn(d, S, COMPILED) + _load_f32(m_ptr, rows2, s_m, gi, mask2) * sx


@triton.jit
def _qgemv_w_kernel(xw_ptr, y_ptr, b_ptr, qw_ptr, d_ptr, m_ptr, sc_ptr, mn_ptr, N, s_qw, s_d,
                    s_m, s_sc, s_mn, K: tl.constexpr, FMT: tl.constexpr, GS: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, MAGIC: tl.constexpr,
                    XF16: tl.constexpr, HAS_BIAS: tl.constexpr, COMPILED: tl.constexpr,
                    USE_GDC: tl.constexpr):
    """y[0, n0:n0 + BLOCK_N] for n0 = program * BLOCK_N and one row of x.

    A chunk is BLOCK_G whole 32-groups of BLOCK_N rows of w: [BLOCK_G, BLOCK_N, WPG] 32-bit
    words of codes (WPG = 4 words of 4-bit codes, 8 of int8 per group), the groups as dim 0 so
    that threads spread over groups and each thread's rows of w share its x values. Word j of a
    group holds columns 4j + e (low nibbles, or the int8 bytes) and 16 + 4j + e (high nibbles),
    e = 0..3, whose x values are the 64-bit words 8g + j and 8g + 4 + j of x ([BLOCK_G, 1, WPG],
    the same register layout). Codes become float32 exactly; per group the sum of x times code
    is scaled once (`_group_scale`)."""
    WPG: tl.constexpr = 8 if FMT == 0 else 4
    NG: tl.constexpr = K // 32
    pid = tl.program_id(0)
    ns = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_live = ns < N
    rows3 = ns[None, :, None]  # [1, BLOCK_N, 1]
    rows2 = ns[None, :]
    gl = tl.arange(0, BLOCK_G)
    js = tl.arange(0, WPG)[None, None, :]  # [1, 1, WPG]
    wait_then_release(USE_GDC)
    acc = tl.zeros([BLOCK_G, BLOCK_N], tl.float32)
    for g0 in range(0, NG, BLOCK_G):
        g1 = g0 + gl  # [G]
        g2 = g1[:, None]  # [G, 1]
        g3 = g1[:, None, None]  # [G, 1, 1]
        mask2 = (g2 < NG) & n_live[None, :]  # [G, BLOCK_N]
        # codes: at most 2 words per load, as x's 64-bit words, so both get one layout
        widx = tl.max_contiguous(WPG * g3 + js, [1, 1, 2])
        w = tl.load(qw_ptr + rows3 * s_qw + widx, mask=mask2[:, :, None], other=0)
        xrow = xw_ptr + 8 * g3 + js  # [G, 1, WPG]
        xl0, xl1, xl2, xl3 = _x_words(xrow, 0, g3 < NG, XF16, COMPILED)
        if FMT == 0:  # int8 codes: word j = columns 4j .. 4j + 3
            c0, c1, c2, c3 = _codes8(w, COMPILED)
            off: tl.constexpr = 8388736.0  # 2^23 + 128
            S = tl.sum(xl0 * (c0 - off) + xl1 * (c1 - off) + xl2 * (c2 - off)
                       + xl3 * (c3 - off), axis=2)  # [G, BLOCK_N]
            sx = 0.0  # unused: Q8_0 has no offset
        else:
            xh0, xh1, xh2, xh3 = _x_words(xrow + 4, 0, g3 < NG, XF16, COMPILED)
            l0, l1, l2, l3, h0, h1, h2, h3 = _codes4(w, MAGIC, COMPILED)
            if not MAGIC:  # codes 2^23 + q: unbias each (exact)
                if FMT == 1:
                    off4: tl.constexpr = 8388616.0  # 2^23 + 8
                else:
                    off4: tl.constexpr = 8388608.0  # 2^23
                l0, l1, l2, l3 = l0 - off4, l1 - off4, l2 - off4, l3 - off4
                h0, h1, h2, h3 = h0 - off4, h1 - off4, h2 - off4, h3 - off4
            S = tl.sum(xl0 * l0 + xl1 * l1 + xl2 * l2 + xl3 * l3 + xh0 * h0 + xh1 * h1
                       + xh2 * h2 + xh3 * h3, axis=2)  # [G, BLOCK_N]
            sx = tl.sum(xl0 + xl1 + xl2 + xl3 + xh0 + xh1 + xh2 + xh3, axis=2)  # [G, 1]
            if MAGIC:  # codes 0.5 + q / 256: sum x * q' = 256 * S - (128 + bias) * sum x
                if FMT == 1:
                    S = 256.0 * S - 136.0 * sx
                else:
                    S = 256.0 * S - 128.0 * sx
        acc += _group_scale(S, sx, rows2, g2, mask2, d_ptr, m_ptr, sc_ptr, mn_ptr, s_d, s_m,
                            s_sc, s_mn, FMT, GS, COMPILED)
    out = tl.sum(acc, axis=0)  # [BLOCK_N]
    if HAS_BIAS:
        out += tl.load(b_ptr + ns, mask=n_live, other=0.0).to(tl.float32)
    tl.store(y_ptr + ns, out.to(y_ptr.dtype.element_ty), mask=n_live)


# ---- v2 for several rows of x: tensor cores on the exact codes, scales per group after -------
# formats the tensor-core kernel takes when qgemv picks it (measured faster than the first
# kernel at batch 8 on an H200: Q8_0, Q4_0); the kernel itself also computes Q4_1, Q4_K and
# int4_g (tested), which measured slower end to end (8B Q4_K batch 8: 449 against 556 tok/s)
_TC_FAMILIES = {0, 1, 2, 5, _INT4}
_TC_PICKED = {0, 1}


@triton.jit
def _tc_codes(b, OFF: tl.constexpr, COMPILED: tl.constexpr):
    """Integer codes b (0..255, after any nibble split) -> bfloat16 b - OFF, exactly (the
    float32 2^23 + b less 2^23 + OFF is an integer of at most 8 significant bits). float32 under
    the interpreter, whose tl.dot misreads bfloat16 operands."""
    f = (b.to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + OFF)
    if COMPILED:
        f = f.to(tl.bfloat16)
    return f


@triton.jit
def _tc_group(acc, g, x_cols, xmask, qs_ptr, d_ptr, m_ptr, sc_ptr, mn_ptr, s_qs, s_d, s_m, s_sc,
              s_mn, rows, n_live, i16, FMT: tl.constexpr, GS: tl.constexpr,
              BLOCK_N: tl.constexpr, COMPILED: tl.constexpr):
    """acc [BLOCK_N, BLOCK_M] + the products of group g."""
    x0 = tl.load(x_cols + 32 * g, mask=xmask, other=0.0)
    x1 = tl.load(x_cols + 32 * g + 16, mask=xmask, other=0.0)
    if not COMPILED:  # see _tc_codes
        x0 = x0.to(tl.float32)
        x1 = x1.to(tl.float32)
    if FMT == 0:  # int8 codes: columns 0..15 and 16..31 of the group
        c = qs_ptr + rows * s_qs + 32 * g + i16[None, :]
        lo = tl.load(c, mask=n_live[:, None], other=0).to(tl.int32)
        hi = tl.load(c + 16, mask=n_live[:, None], other=0).to(tl.int32)
        a0 = _tc_codes(lo + 128, 128.0, COMPILED)
        a1 = _tc_codes(hi + 128, 128.0, COMPILED)
    else:  # byte i: column i (low nibble) and 16 + i (high nibble)
        bq = tl.load(qs_ptr + rows * s_qs + 16 * g + i16[None, :], mask=n_live[:, None],
                     other=0).to(tl.int32)
        off: tl.constexpr = 8.0 if FMT == 1 else 0.0
        a0 = _tc_codes(bq & 15, off, COMPILED)
        a1 = _tc_codes(bq >> 4, off, COMPILED)
    S = tl.dot(a1, x1, tl.dot(a0, x0))  # [BLOCK_N, BLOCK_M] sum over the group of x * q'
    g2 = tl.full([BLOCK_N, 1], 0, tl.int32) + g
    mask2 = n_live[:, None]
    if FMT == 0 or FMT == 1:
        acc += _load_f32(d_ptr, rows, s_d, g2, mask2) * S
    else:
        sx = (tl.sum(x0.to(tl.float32), axis=0) + tl.sum(x1.to(tl.float32), axis=0))[None, :]
        acc += _group_scale(S, sx, rows, g2, mask2, d_ptr, m_ptr, sc_ptr, mn_ptr, s_d, s_m,
                            s_sc, s_mn, FMT, GS, COMPILED)
    return acc


@triton.jit
def _qgemm_tc_kernel(x_ptr, y_ptr, b_ptr, qs_ptr, d_ptr, m_ptr, sc_ptr, mn_ptr, M, N, stride_x,
                     stride_y, s_qs, s_d, s_m, s_sc, s_mn, K: tl.constexpr, FMT: tl.constexpr,
                     GS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     GROUPS: tl.constexpr, HAS_BIAS: tl.constexpr, COMPILED: tl.constexpr,
                     USE_GDC: tl.constexpr):
    """y[:, n0:n0 + BLOCK_N] (n0 = program * BLOCK_N) for up to BLOCK_M (>= 16) rows of x, one
    32-group per step: its codes (exact in bf16) times x's 32 columns on the tensor cores (fp32
    accumulation), then the group's scale (and offset times the sum of x) in fp32, in the order
    of the format's dequantize where x is a unit vector."""
    NG: tl.constexpr = K // 32
    pid = tl.program_id(0)
    ns = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_live = ns < N
    rows = ns[:, None]  # [BLOCK_N, 1]
    i16 = tl.arange(0, 16)
    ms = tl.arange(0, BLOCK_M)
    xmask = (ms < M)[None, :]  # [1, BLOCK_M]
    x_cols = x_ptr + ms[None, :] * stride_x + i16[:, None]  # [16, BLOCK_M]: x^T, 16 columns
    wait_then_release(USE_GDC)
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    for g0 in range(0, NG, GROUPS):  # GROUPS divides NG
        for gi in tl.static_range(GROUPS):
            acc = _tc_group(acc, g0 + gi, x_cols, xmask, qs_ptr, d_ptr, m_ptr, sc_ptr, mn_ptr,
                            s_qs, s_d, s_m, s_sc, s_mn, rows, n_live, i16, FMT, GS, BLOCK_N,
                            COMPILED)
    out = acc
    if HAS_BIAS:
        out += tl.load(b_ptr + ns, mask=n_live, other=0.0).to(tl.float32)[:, None]
    tl.store(y_ptr + ms[None, :] * stride_y + rows, out.to(y_ptr.dtype.element_ty),
             mask=xmask & n_live[:, None])


def _family(fmt: str) -> tuple[int, int]:
    """(FMT id, columns per scale GS of int4_g<GS>; else 32)."""
    if fmt in _FAMILIES:
        return _FAMILIES[fmt], 32
    if fmt.startswith("int4_g"):
        return _INT4, int(fmt[len("int4_g"):])
    raise ValueError(f"qgemv has no kernel for the format {fmt!r}")


def triton_runs(t: torch.Tensor) -> bool:
    """Whether the Triton kernel can run on t's device (a GPU, or the interpreter on the CPU)."""
    return t.device.type == "cuda" or bool(os.environ.get("TRITON_INTERPRET"))


def words_kernel_runs(x: torch.Tensor, w: QuantizedTensor) -> bool:
    """Whether `qgemv` takes the v2 kernel (`_qgemv_w_kernel`) for x and w: bf16 / fp16
    activations, a format it implements, whole 32-groups."""
    if x.dtype not in (torch.bfloat16, torch.float16) or w.in_features % 32:
        return False
    fmt, gs = _family(w.format)
    return fmt in _WORD_FAMILIES and gs % 32 == 0


def _words(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A 2-D tensor with contiguous rows reinterpreted as `dtype` words along dim 1."""
    if t.stride(1) != 1 or (t.stride(0) * t.element_size()) % dtype.itemsize \
            or (t.storage_offset() * t.element_size()) % dtype.itemsize:
        t = t.contiguous()
    return t.view(dtype)


def qgemv_words(x: torch.Tensor, w: QuantizedTensor, bias: torch.Tensor | None = None,
                config: QGemvWConfig | None = None, pdl: bool | None = None) -> torch.Tensor:
    """`qgemv` of one row of x by the v2 kernel (see `words_kernel_runs`); several rows are
    taken one launch each (the tensor-core kernel is the one for batches)."""
    if x.shape[0] != 1:
        return torch.cat([qgemv_words(r, w, bias, config, pdl) for r in x.split(1)])
    fmt, gs = _family(w.format)
    k = x.shape[1]
    n = w.out_features
    xw = _words(x, torch.int64)
    names = _PLANES.get(w.format, _DEFAULT_PLANES)
    planes = [w.planes[p] if p in w.planes else None for p in names]
    qw = _words(planes[0], torch.int32)
    rest = [x if p is None else (p if p.stride(1) == 1 else p.contiguous()) for p in planes[2:]]
    cfg = config or qgemv_w_config(1, n, k, w.format)
    y = torch.empty(1, n, dtype=x.dtype, device=x.device)
    gdc = use_pdl(x, pdl)
    _qgemv_w_kernel[(triton.cdiv(n, cfg.block_n),)](
        xw, y, bias if bias is not None else x, qw, *rest, n, qw.stride(0),
        *(p.stride(0) for p in rest), K=k, FMT=fmt, GS=gs, BLOCK_N=cfg.block_n,
        BLOCK_G=cfg.block_g, MAGIC=cfg.magic and fmt != 0, XF16=x.dtype == torch.float16,
        HAS_BIAS=bias is not None, COMPILED=not os.environ.get("TRITON_INTERPRET"), USE_GDC=gdc,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **launch_options(gdc))
    return y


def tc_kernel_runs(x: torch.Tensor, w: QuantizedTensor) -> bool:
    """Whether the tensor-core kernel (`_qgemm_tc_kernel`) can take x and w: bf16 activations
    on a GPU (not the interpreter: tl.dot there is not bf16 x bf16 -> fp32 as compiled), a
    format it implements, whole 32-groups."""
    if x.dtype != torch.bfloat16 or w.in_features % 32:
        return False
    fmt, gs = _family(w.format)
    return fmt in _TC_FAMILIES and gs % 32 == 0


def qgemm_tc(x: torch.Tensor, w: QuantizedTensor, bias: torch.Tensor | None = None,
             block_n: int = 64, num_warps: int = 4, num_stages: int = 3, groups: int = 8,
             pdl: bool | None = None) -> torch.Tensor:
    """x [M, K] (bf16, M <= 16) @ w.dequantize().T (+ bias) on the tensor cores."""
    fmt, gs = _family(w.format)
    m, k = x.shape
    n = w.out_features
    names = _PLANES.get(w.format, _DEFAULT_PLANES)
    planes = [w.planes[p] if p in w.planes else None for p in names]
    planes = [x if p is None else (p if p.stride(1) == 1 else p.contiguous()) for p in planes]
    del planes[1]  # qh: not used by these formats
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    gdc = use_pdl(x, pdl)
    _qgemm_tc_kernel[(triton.cdiv(n, block_n),)](
        x, y, bias if bias is not None else x, *planes, m, n, x.stride(0), y.stride(0),
        *(p.stride(0) for p in planes), K=k, FMT=fmt, GS=gs,
        BLOCK_M=max(16, triton.next_power_of_2(m)), BLOCK_N=block_n,
        GROUPS=math.gcd(groups, k // 32), HAS_BIAS=bias is not None,
        COMPILED=not os.environ.get("TRITON_INTERPRET"), USE_GDC=gdc, num_warps=num_warps,
        num_stages=num_stages, **launch_options(gdc))
    return y


def qgemv(x: torch.Tensor, w: QuantizedTensor, bias: torch.Tensor | None = None,
          config: QGemvConfig | QGemvWConfig | None = None,
          pdl: bool | None = None, variant: str = "auto") -> torch.Tensor:
    """x [M, K] (bf16/fp16/fp32) @ w.dequantize().T (+ bias [N]) -> [M, N] in x's dtype, M <= 16,
    accumulated in fp32 from fp32 weights; `quantized_linear` where Triton cannot run.
    variant: "auto" (the v2 kernel for one row, the tensor-core kernel for 2..16 rows where they
    run, else the first kernel) or "v1" (the first kernel always, for comparisons)."""
    if variant not in ("auto", "v1"):
        raise ValueError(f"qgemv variant must be 'auto' or 'v1', got {variant!r}")
    if x.dim() != 2 or x.shape[1] != w.in_features:
        raise ValueError(f"qgemv wants x [M, {w.in_features}], got {tuple(x.shape)}")
    if x.shape[0] > MAX_M:
        raise ValueError(f"qgemv handles at most {MAX_M} rows of x, got {x.shape[0]}")
    if not triton_runs(x):
        return quantized_linear(x, w, bias)
    x = x if x.stride(1) == 1 else x.contiguous()
    if isinstance(config, QGemvWConfig):
        return qgemv_words(x, w, bias, config, pdl)
    if config is None and variant == "auto":
        if x.shape[0] == 1 and words_kernel_runs(x, w):
            return qgemv_words(x, w, bias, None, pdl)
        if x.shape[0] > 1 and tc_kernel_runs(x, w) and _family(w.format)[0] in _TC_PICKED:
            bn, warps, stages, groups = qgemm_tc_config(x.shape[0], w.out_features,
                                                        w.in_features)
            return qgemm_tc(x, w, bias, bn, warps, stages, groups, pdl=pdl)
    fmt, gs = _family(w.format)
    m, k = x.shape
    n = w.out_features
    x = x if x.stride(1) == 1 else x.contiguous()
    names = _PLANES.get(w.format, _DEFAULT_PLANES)
    planes = [w.planes[p] if p in w.planes else None for p in names]
    planes = [x if p is None else (p if p.stride(1) == 1 else p.contiguous()) for p in planes]
    cfg = config or qgemv_config(m, n, k)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    gdc = use_pdl(x, pdl)
    _qgemv_kernel[(triton.cdiv(n, cfg.block_n),)](
        x, y, bias if bias is not None else x, *planes, m, n, x.stride(0), y.stride(0),
        *(p.stride(0) for p in planes), K=k, FMT=fmt, GS=gs,
        BLOCK_M=triton.next_power_of_2(m), BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        HAS_BIAS=bias is not None, COMPILED=not os.environ.get("TRITON_INTERPRET"), USE_GDC=gdc,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **launch_options(gdc))
    return y
