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

v2 (kernels/qgemv_words.py, the kernel in qgemv_words_kernel.py): for up to 4 rows of bf16 / fp16 x,
`_qgemv_w_kernel` gives each thread whole halves of 32-groups of several rows of w, so x is
converted once per thread and the group scale is applied once per group sum (8B gate_up Q4_0 23 us =
69% of the copy bandwidth, Q8_0 89%; the first kernel 45% / 67%); the codes are decoded once for all
rows of x. For more rows than `qgemv_config.words_rows_max` gives, `_qgemm_tc_kernel`
(kernels/qgemm_tc.py) multiplies the exact codes with x on the tensor cores per 32-group and scales
each group's sums in fp32 (8B Q4_0 batch 8: 1.7x the first kernel, still 1.7x slower than bf16; see
docs/performance.md).

One kernel, specialised per format family by the constexpr FMT. `qgemv` falls back to
`quantized_linear` (dequantize, then F.linear) where Triton cannot run: CPU tensors outside the
interpreter.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from llm.backends.torch.kernels import qmma
from llm.backends.torch.kernels.pdl import launch_options, use_pdl, wait_then_release
from llm.backends.torch.kernels.qgemm_tc import TC_PICKED, qgemm_tc, tc_kernel_runs
from llm.backends.torch.kernels.qgemv_common import (
    DEFAULT_PLANES,
    PLANES,
    bit_planes,
    family,
    load_f32,
    mul_rn,
    triton_runs,
)
from llm.backends.torch.kernels.qgemv_config import (
    QGemvConfig,
    QGemvWConfig,
    norm_epilogue,
    qgemm_tc_config,
    qgemv_config,
    words_rows_max,
)
from llm.backends.torch.kernels.qgemv_words import (
    AddNorm,
    qgemv_words,
    words_kernel_runs,
)
from llm.backends.torch.kernels.qmma import qmma_matmul, qmma_runs
from llm.backends.torch.kernels.silu_mul import silu_mul
from llm.model.quant.linear import quantized_linear
from llm.model.quant.tensor import QuantizedTensor

MAX_M = 16  # rows of x one launch handles


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
            d = load_f32(d_ptr, rows, s_d, gs, gmask)[:, :, None]
        else:  # int8: f(qs) * d[n]
            d = tl.load(d_ptr + ns * s_d, mask=n_live, other=0.0)[:, None, None]
        return _code(lo, 128.0) * d, _code(hi, 128.0) * d
    b = tl.load(qs_ptr + rows3 * s_qs + 8 * h3 + e3, mask=m_lo, other=0)
    if FMT == 3 or FMT == 4 or FMT == 6 or FMT == 7:  # a 5th/6th code bit from qh
        h_lo, h_hi = bit_planes(qh_ptr, rows3, s_qh, g3, half3, e3, m_lo, FMT)
        lo = ((b.to(tl.int32) & 15) | h_lo | 0x4B000000).to(tl.float32, bitcast=True)
        hi = ((b.to(tl.int32) >> 4) | h_hi | 0x4B000000).to(tl.float32, bitcast=True)
    else:
        lo, hi = _nibbles(b, COMPILED)
    # lo, hi: 2^23 + code as float32; _unbias(f, o) = code - o, exactly
    if FMT == 7:  # Q6_K: (f(d[s]) * f(scales[k // 16])) * f(q - 32)
        d = load_f32(d_ptr, rows, s_d, gs // 8, gmask)
        a_lo = (d * load_f32(sc_ptr, rows, s_sc, 2 * gs, gmask))[:, :, None]
        a_hi = (d * load_f32(sc_ptr, rows, s_sc, 2 * gs + 1, gmask))[:, :, None]
        return a_lo * _unbias(lo, 32.0), a_hi * _unbias(hi, 32.0)
    if FMT == 5 or FMT == 6:  # Q4_K/Q5_K: (f(d[s]) * f(sc[g])) * f(q) - f(dmin[s]) * f(mins[g])
        a = load_f32(d_ptr, rows, s_d, gs // 8, gmask) * load_f32(sc_ptr, rows, s_sc, gs, gmask)
        c = load_f32(m_ptr, rows, s_m, gs // 8, gmask) * load_f32(mn_ptr, rows, s_mn, gs, gmask)
        a = a[:, :, None]
        c = c[:, :, None]
        return (mul_rn(a, _unbias(lo, 0.0), COMPILED) - c,
                mul_rn(a, _unbias(hi, 0.0), COMPILED) - c)
    if FMT == 9:  # int4_g<GS>: scale and offset per GS columns
        gi = (32 * gs) // GS
    else:
        gi = gs
    d = load_f32(d_ptr, rows, s_d, gi, gmask)[:, :, None]
    if FMT == 1:  # Q4_0: f(d[g]) * f(q - 8)
        return d * _unbias(lo, 8.0), d * _unbias(hi, 8.0)
    if FMT == 3:  # Q5_0: f(d[g]) * f(q - 16)
        return d * _unbias(lo, 16.0), d * _unbias(hi, 16.0)
    # Q4_1, Q5_1, int4: f(d[g]) * f(q) + f(m[g])
    m = load_f32(m_ptr, rows, s_m, gi, gmask)[:, :, None]
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


def _words_take(x: torch.Tensor, w: QuantizedTensor) -> bool:
    """Whether x [M, K] and w go to the v2 kernel where the tensor-core kernel does not take
    them: at most `words_rows_max` rows, a format and dtype it implements."""
    return x.shape[0] <= words_rows_max(w.format) and words_kernel_runs(x, w)


def qgemv(x: torch.Tensor, w: QuantizedTensor, bias: torch.Tensor | None = None,
          config: QGemvConfig | QGemvWConfig | None = None,
          pdl: bool | None = None, variant: str = "auto") -> torch.Tensor:
    """x [M, K] (bf16/fp16/fp32) @ w.dequantize().T (+ bias [N]) -> [M, N] in x's dtype, M <= 16,
    accumulated in fp32 from fp32 weights; `quantized_linear` where Triton cannot run.
    variant: "auto" (block formats where `qmma.mma_rows` says so: the CUDA tensor-core kernel of
    kernels/qmma.py; else the v2 kernel up to `words_rows_max` rows, the Triton tensor-core
    kernel above, where they run, else the first kernel) or "v1" (the first kernel always, for
    comparisons)."""
    if variant not in ("auto", "v1"):
        raise ValueError(f"qgemv variant must be 'auto' or 'v1', got {variant!r}")
    if x.dim() != 2 or x.shape[1] != w.in_features:
        raise ValueError(f"qgemv wants x [M, {w.in_features}], got {tuple(x.shape)}")
    if x.shape[0] > MAX_M:
        raise ValueError(f"qgemv handles at most {MAX_M} rows of x, got {x.shape[0]}")
    if not triton_runs(x):
        return quantized_linear(x, w, bias)
    x = x if x.stride(1) == 1 else x.contiguous()
    if config is None and variant == "auto" and qmma_runs(x, w, bias, pdl):
        return qmma_matmul(x, w, pdl)
    if isinstance(config, QGemvWConfig):
        return qgemv_words(x, w, bias, config, pdl)
    if config is None and variant == "auto":
        if _words_take(x, w):
            return qgemv_words(x, w, bias, None, pdl)
        if x.shape[0] > 1 and tc_kernel_runs(x, w) and family(w.format)[0] in TC_PICKED:
            tc = qgemm_tc_config(x.shape[0], w.out_features, w.in_features)
            return qgemm_tc(x, w, bias, tc.block_n, tc.num_warps, tc.num_stages, pdl=pdl,
                            split_k=tc.split_k)
    fmt, gs = family(w.format)
    m, k = x.shape
    n = w.out_features
    x = x if x.stride(1) == 1 else x.contiguous()
    names = PLANES.get(w.format, DEFAULT_PLANES)
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


def qgemv_add_norm(x: torch.Tensor, w: QuantizedTensor, bias: torch.Tensor | None,
                   norm: AddNorm) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(rms_norm(y + residual) * weight, y + residual) for y = `qgemv(x, w, bias)`, in one
    launch of the v2 kernel with the norm in its epilogue (`qgemv_words(norm=...)`), where
    `qgemv` would take that kernel for x and w and `norm_epilogue` says it pays; None elsewhere
    (the caller then projects and normalises apart)."""
    if (x.dim() != 2 or not norm_epilogue(x.shape[0], w.out_features, w.format)
            or x.shape[1] != w.in_features or not triton_runs(x) or not _words_take(x, w)
            or qmma_runs(x, w, bias, None)):
        return None
    return qgemv_words(x if x.stride(1) == 1 else x.contiguous(), w, bias, norm=norm)


def qgemv_silu_mul(x: torch.Tensor, w: QuantizedTensor, bias: torch.Tensor | None = None,
                   config: QGemvWConfig | None = None, pdl: bool | None = None) -> torch.Tensor:
    """silu(gate) * up [M, I] of x [M, K] through a fused gate/up weight w [2I, K] (gate rows
    first; bias [2I]): for up to `words_rows_max` rows of bf16 / fp16 x, one launch of the v2
    kernel with the activation in its epilogue (rounded as `silu_mul` of the unfused product);
    for the batches `qmma.mma_rows` picks among them, the tensor-core kernel, with SiLU*up in its
    epilogue where `qmma.glu_epilogue` (else `silu_mul` after it); otherwise `qgemv` then
    `silu_mul`."""
    if config is None and qmma_runs(x, w, bias, pdl):
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count
        if (qmma.glu_epilogue(x.shape[0], w.out_features, w.in_features, sms)
                and qmma_runs(x, w, bias, pdl, glu=True)):
            return qmma_matmul(x, w, pdl, glu=True)
        return silu_mul(qmma_matmul(x, w, pdl), pdl)
    if x.dim() == 2 and triton_runs(x) and _words_take(x, w):
        x = x if x.stride(1) == 1 else x.contiguous()
        return qgemv_words(x, w, bias, config, pdl, glu=True)
    return silu_mul(qgemv(x, w, bias, config, pdl), pdl)
