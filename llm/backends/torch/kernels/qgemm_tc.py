"""The v2 quantized GEMM for 2..16 rows of x: tensor cores on the exact codes, scales per group.

Per 32-group, the codes (exact in bf16) times 16 padded rows of x on the tensor cores (fp32
accumulation), then the group's scale in fp32 (8B Q4_0 batch 8: 1.7x the first kernel, still 1.7x
slower than bf16; docs/performance.md). `qgemv` (kernels/qgemv.py) picks it for Q8_0 and Q4_0.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from llm.backends.torch.kernels.pdl import launch_options, use_pdl, wait_then_release
from llm.backends.torch.kernels.qgemv_common import (
    DEFAULT_PLANES,
    INT4,
    PLANES,
    family,
    group_scale,
    load_f32,
)
from llm.model.quant.tensor import QuantizedTensor

# formats the tensor-core kernel takes when qgemv picks it (measured faster than the first
# kernel at batch 8 on an H200: Q8_0, Q4_0); the kernel itself also computes Q4_1, Q4_K and
# int4_g (tested), which measured slower end to end (8B Q4_K batch 8: 449 against 556 tok/s)
_TC_FAMILIES = {0, 1, 2, 5, INT4}
TC_PICKED = {0, 1}


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
        acc += load_f32(d_ptr, rows, s_d, g2, mask2) * S
    else:
        sx = (tl.sum(x0.to(tl.float32), axis=0) + tl.sum(x1.to(tl.float32), axis=0))[None, :]
        acc += group_scale(S, sx, rows, g2, mask2, d_ptr, m_ptr, sc_ptr, mn_ptr, s_d, s_m,
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


def tc_kernel_runs(x: torch.Tensor, w: QuantizedTensor) -> bool:
    """Whether the tensor-core kernel (`_qgemm_tc_kernel`) can take x and w: bf16 activations
    on a GPU (not the interpreter: tl.dot there is not bf16 x bf16 -> fp32 as compiled), a
    format it implements, whole 32-groups."""
    if x.dtype != torch.bfloat16 or w.in_features % 32:
        return False
    fmt, gs = family(w.format)
    return fmt in _TC_FAMILIES and gs % 32 == 0


def qgemm_tc(x: torch.Tensor, w: QuantizedTensor, bias: torch.Tensor | None = None,
             block_n: int = 64, num_warps: int = 4, num_stages: int = 3, groups: int = 8,
             pdl: bool | None = None) -> torch.Tensor:
    """x [M, K] (bf16, M <= 16) @ w.dequantize().T (+ bias) on the tensor cores."""
    fmt, gs = family(w.format)
    m, k = x.shape
    n = w.out_features
    names = PLANES.get(w.format, DEFAULT_PLANES)
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
