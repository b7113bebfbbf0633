"""A quantized matrix (`QuantizedTensor`) dequantized on the GPU into a dense half-precision one,
for prompts: each layer's weight is written to a fresh dense tensor just before its matmul (cuBLAS)
and dropped after it, so the weights stay quantized in memory between calls.

One pass: the packed planes are read once and the dense matrix written once (8B Q4_0: 4.5 GB read,
15 GB written in bf16 for the whole model). The values are `QuantizedTensor.dequantize(float32)`'s
bit for bit (kernels/qgemv.py `_dequant_chunk`, the GEMV's own dequantization), then rounded to
the output dtype as `.to(dtype)` rounds them, so a prompt computes what dequantize-then-matmul did
before this kernel."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from llm.backends.torch.kernels.qgemv import _dequant_chunk
from llm.backends.torch.kernels.qgemv_common import DEFAULT_PLANES, PLANES, family, triton_runs
from llm.model.quant.tensor import QuantizedTensor

BLOCK_N = 16  # rows of w per program
BLOCK_K = 256  # columns per program (a multiple of 32)


@triton.jit
def _dequant_kernel(y_ptr, qs_ptr, qh_ptr, d_ptr, m_ptr, sc_ptr, mn_ptr, rows_ptr, N, stride_y,
                    s_qs, s_qh, s_d, s_m, s_sc, s_mn, K: tl.constexpr, FMT: tl.constexpr,
                    GS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    GATHER: tl.constexpr, COMPILED: tl.constexpr):
    """y[n0:n0 + BLOCK_N, k0:k0 + BLOCK_K] for program (n0 / BLOCK_N, k0 / BLOCK_K): rows n of w,
    or with GATHER rows rows_ptr[n] (an embedding lookup)."""
    H: tl.constexpr = BLOCK_K // 16  # half-groups of 8 lanes
    ns = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_live = ns < N
    if GATHER:
        src = tl.load(rows_ptr + ns, mask=n_live, other=0)
    else:
        src = ns
    k0 = tl.program_id(1) * BLOCK_K
    w_lo, w_hi = _dequant_chunk(qs_ptr, qh_ptr, d_ptr, m_ptr, sc_ptr, mn_ptr, s_qs, s_qh, s_d,
                                s_m, s_sc, s_mn, src, n_live, k0 // 16, K, FMT, GS, H, COMPILED)
    hs = tl.arange(0, H)[None, :, None]
    cols = k0 + 32 * (hs // 2) + 8 * (hs % 2) + tl.arange(0, 8)[None, None, :]  # [1, H, 8] lo
    out = y_ptr + ns[:, None, None] * stride_y + cols  # [BLOCK_N, H, 8]
    live = n_live[:, None, None]
    tl.store(out, w_lo.to(y_ptr.dtype.element_ty), mask=live & (cols < K))
    tl.store(out + 16, w_hi.to(y_ptr.dtype.element_ty), mask=live & (cols + 16 < K))


def dequantize_dense(w: QuantizedTensor, dtype: torch.dtype,
                     rows: torch.Tensor | None = None) -> torch.Tensor:
    """w [N, K] as a dense contiguous [N, K] tensor of `dtype`, equal to
    `w.dequantize(torch.float32).to(dtype)`: the Triton kernel where Triton runs (a GPU, or the
    interpreter), else that expression. rows: int64 [R] row indices (in range): only those rows,
    [R, K], equal to `w.take_rows(rows).dequantize(torch.float32).to(dtype)` (one launch: an
    embedding lookup in a decode step was ~10 small torch kernels)."""
    probe = next(iter(w.planes.values()))
    if not triton_runs(probe):
        picked = w if rows is None else w.take_rows(rows)
        return picked.dequantize(torch.float32).to(dtype)
    fmt, gs = family(w.format)
    n, k = w.shape if rows is None else (rows.numel(), w.in_features)
    names = PLANES.get(w.format, DEFAULT_PLANES)
    compiled = not os.environ.get("TRITON_INTERPRET")
    # the interpreter truncates float32 -> bfloat16 (compiled: round to nearest even, as torch):
    # there the kernel writes float32 and torch rounds
    y = torch.empty(n, k, dtype=dtype if compiled else torch.float32, device=probe.device)
    planes = [w.planes[p] if p in w.planes else None for p in names]
    planes = [y if p is None else (p if p.stride(1) == 1 else p.contiguous()) for p in planes]
    index = y if rows is None else rows.to(device=probe.device, dtype=torch.int64).reshape(-1)
    _dequant_kernel[(triton.cdiv(n, BLOCK_N), triton.cdiv(k, BLOCK_K))](
        y, *planes, index, n, y.stride(0), *(p.stride(0) for p in planes), K=k, FMT=fmt, GS=gs,
        BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, GATHER=rows is not None, COMPILED=compiled,
        num_warps=4)
    return y.to(dtype)
