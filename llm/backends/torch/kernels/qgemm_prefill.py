"""Prompt chunks on the codes: a GEMM that dequantizes its weight tiles in registers.

A prompt chunk of more than 64 rows today dequantizes each matrix into a dense bf16 copy for the
call and multiplies it by cuBLAS (kernels/dequant.py): at 8B Q4_0 a 256-token chunk writes and
reads ~15 GB of copies besides the 4.5 GB of codes, more than the bf16 model's own 16 GB a chunk.
Here each program computes a [BLOCK_M, BLOCK_N] tile of x @ W.T: per BLOCK_K columns it
dequantizes the weight's [BLOCK_N, BLOCK_K] tile with the GEMV's own code (`_dequant_chunk`: the
values `QuantizedTensor.dequantize(float32)` gives, bit for bit), rounds it to x's dtype as
`dequantize_dense` rounds it, and multiplies it by x's tile on the tensor cores (fp32
accumulation). So it computes what dequantize-then-matmul computes, up to the order of the sums.

`_dequant_chunk` yields a tile's columns as half-groups of 8 lanes (lo: 32 g + 8 h + e, hi: the
same + 16); x's tile is loaded in that column order, so each product pairs the same columns.

Not routed yet: `QuantLinear` keeps dequantize-then-matmul for calls above 64 rows until a GPU
has timed this kernel against it (`bench/qgemm_prefill.py`, `bench/quant_prefill.py --fused`;
docs/performance.md, "Prompt chunks on the codes").
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from llm.backends.torch.kernels.qgemv import _dequant_chunk
from llm.backends.torch.kernels.qgemv_common import DEFAULT_PLANES, PLANES, family, triton_runs
from llm.model.quant.tensor import QuantizedTensor


@triton.jit
def _qgemm_prefill_kernel(x_ptr, y_ptr, b_ptr, qs_ptr, qh_ptr, d_ptr, m_ptr, sc_ptr, mn_ptr, M,
                          N, stride_x, stride_y, s_qs, s_qh, s_d, s_m, s_sc, s_mn,
                          K: tl.constexpr, FMT: tl.constexpr, GS: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          GROUP_N: tl.constexpr, NATURAL: tl.constexpr,
                          HAS_BIAS: tl.constexpr, COMPILED: tl.constexpr):
    """y[m0:m0 + BLOCK_M, n0:n0 + BLOCK_N] = x[m0:, :] @ W[n0:, :].T (+ bias) in y's dtype.
    Programs go along M inside groups of GROUP_N column tiles, so the tiles of W that the rows'
    programs share are read while they are in the L2."""
    H: tl.constexpr = BLOCK_K // 16  # half-groups of 8 lanes a step
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    group = pid // (GROUP_N * tiles_m)
    first_n = group * GROUP_N
    width = tl.minimum(tl.cdiv(N, BLOCK_N) - first_n, GROUP_N)
    pid_m = (pid % (GROUP_N * tiles_m)) // width
    pid_n = first_n + (pid % (GROUP_N * tiles_m)) % width
    ms = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_live = ms < M
    n_live = ns < N
    hs = tl.arange(0, H)[None, :, None]
    lanes = 32 * (hs // 2) + 8 * (hs % 2) + tl.arange(0, 8)[None, None, :]  # [1, H, 8] lo cols
    rows_x = x_ptr + ms[:, None, None] * stride_x  # [BLOCK_M, 1, 1]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        w_lo, w_hi = _dequant_chunk(qs_ptr, qh_ptr, d_ptr, m_ptr, sc_ptr, mn_ptr, s_qs, s_qh,
                                    s_d, s_m, s_sc, s_mn, ns, n_live, k0 // 16, K, FMT, GS, H,
                                    COMPILED)  # [BLOCK_N, H, 8] each, fp32
        w_lo = w_lo.to(x_ptr.dtype.element_ty)
        w_hi = w_hi.to(x_ptr.dtype.element_ty)
        if NATURAL:  # the tile's columns in order, x's tile loaded as it lies: one dot a step
            w = tl.reshape(tl.join(w_lo, w_hi), (BLOCK_N, H // 2, 2, 8, 2))  # [n, g, half, e, hi]
            w = tl.permute(w, (0, 1, 4, 2, 3))  # [n, g, hi, half, e]: column 32g + 16hi + 8half + e
            w = tl.reshape(w, (BLOCK_N, BLOCK_K))
            cols = k0 + tl.arange(0, BLOCK_K)[None, :]
            xt = tl.load(x_ptr + ms[:, None] * stride_x + cols, mask=m_live[:, None] & (cols < K),
                         other=0.0)  # [BLOCK_M, BLOCK_K]
            if not COMPILED:  # the interpreter's tl.dot multiplies 16-bit floats' bits as integers
                xt, w = xt.to(tl.float32), w.to(tl.float32)
            acc = tl.dot(xt, tl.trans(w), acc)
        else:  # x's tile loaded in the half-groups' column order: two dots a step
            cols = k0 + lanes
            x_lo = tl.load(rows_x + cols, mask=m_live[:, None, None] & (cols < K), other=0.0)
            x_hi = tl.load(rows_x + cols + 16, mask=m_live[:, None, None] & (cols + 16 < K),
                           other=0.0)  # [BLOCK_M, H, 8]
            if not COMPILED:
                x_lo, x_hi = x_lo.to(tl.float32), x_hi.to(tl.float32)
                w_lo, w_hi = w_lo.to(tl.float32), w_hi.to(tl.float32)
            acc = tl.dot(tl.reshape(x_lo, (BLOCK_M, 8 * H)),
                         tl.trans(tl.reshape(w_lo, (BLOCK_N, 8 * H))), acc)
            acc = tl.dot(tl.reshape(x_hi, (BLOCK_M, 8 * H)),
                         tl.trans(tl.reshape(w_hi, (BLOCK_N, 8 * H))), acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + ns, mask=n_live, other=0.0).to(tl.float32)[None, :]
    out = y_ptr + ms[:, None] * stride_y + ns[None, :]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=m_live[:, None] & n_live[None, :])


def prefill_kernel_takes(x: torch.Tensor, w: QuantizedTensor) -> bool:
    """Whether `qgemm_prefill` takes x [M, K] and w: 16-bit x where Triton runs (a GPU or the
    interpreter), whole 32-groups (the half-group tiles)."""
    return (x.dim() == 2 and x.dtype in (torch.bfloat16, torch.float16) and triton_runs(x)
            and w.in_features % 32 == 0 and w.in_features == x.shape[1])


def qgemm_prefill(x: torch.Tensor, w: QuantizedTensor, bias: torch.Tensor | None = None,
                  block_m: int = 128, block_n: int = 128, block_k: int = 64, num_warps: int = 8,
                  num_stages: int = 3, group_n: int = 8,
                  natural: bool = False) -> torch.Tensor:
    """x [M, K] @ w.dequantize().T (+ bias) -> [M, N] in x's dtype, each weight tile dequantized
    in registers and rounded to x's dtype (the weights `dequantize_dense` would write).
    block_k: columns a step, a multiple of 32 (whole groups of the half-group tiles). natural:
    the weight tile put in column order (one dot of x's tile as loaded), else x's tile loaded in
    the half-groups' order (two dots a step)."""
    if not prefill_kernel_takes(x, w):
        raise ValueError(f"qgemm_prefill takes 16-bit x [M, {w.in_features}] where Triton runs "
                         f"and whole 32-column groups; got {tuple(x.shape)} {x.dtype} on "
                         f"{x.device}, w {w.format} {tuple(w.shape)}")
    if block_k % 32 or block_k <= 0:
        raise ValueError(f"qgemm_prefill: block_k must be a positive multiple of 32, got {block_k}")
    fmt, gs = family(w.format)
    m, k = x.shape
    n = w.out_features
    x = x if x.stride(1) == 1 else x.contiguous()
    compiled = not os.environ.get("TRITON_INTERPRET")
    # the interpreter truncates float32 -> bfloat16 (compiled: round to nearest even)
    y = torch.empty(m, n, dtype=x.dtype if compiled else torch.float32, device=x.device)
    names = PLANES.get(w.format, DEFAULT_PLANES)
    planes = [w.planes[p] if p in w.planes else None for p in names]
    planes = [y if p is None else (p if p.stride(1) == 1 else p.contiguous()) for p in planes]
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
    _qgemm_prefill_kernel[grid](
        x, y, bias if bias is not None else y, *planes, m, n, x.stride(0), y.stride(0),
        *(p.stride(0) for p in planes), K=k, FMT=fmt, GS=gs, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_K=block_k, GROUP_N=group_n, NATURAL=natural, HAS_BIAS=bias is not None,
        COMPILED=compiled, num_warps=num_warps, num_stages=num_stages)
    return y.to(x.dtype)
