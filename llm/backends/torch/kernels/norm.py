"""Fused residual add + RMSNorm in Triton: one pass over each row instead of about eight kernels.

Rounding follows transformers' Llama exactly: the sum is rounded to the activation dtype, the
statistics are fp32, the normalised row is rounded to the dtype, then multiplied by the weight.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llm.backends.torch.kernels.pdl import launch_options, use_pdl, wait_then_release


@triton.jit
def add_rms_norm_row(x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr, eps, HIDDEN: tl.constexpr,
                     BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr, CG: tl.constexpr):
    """One row: out = rms_norm(x + residual) * w, sum = x + residual (rounded to x's dtype).
    CG: x is read past the L1 (`.cg`), as where other programs of the same launch wrote it
    (the norm in a GEMV's epilogue, kernels/qgemv_words_kernel.py)."""
    cols = tl.arange(0, BLOCK)
    live = cols < HIDDEN
    if CG:
        x = tl.load(x_ptr + cols, mask=live, other=0.0, cache_modifier=".cg")
    else:
        x = tl.load(x_ptr + cols, mask=live, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + cols, mask=live, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)  # the residual stream, rounded
        tl.store(sum_ptr + cols, x, mask=live)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / HIDDEN + eps)
    w = tl.load(w_ptr + cols, mask=live, other=0.0)
    y = (xf * rstd).to(x.dtype).to(tl.float32) * w.to(tl.float32)
    tl.store(out_ptr + cols, y.to(out_ptr.dtype.element_ty), mask=live)


@triton.jit
def _add_rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr, eps, stride_x, stride_r,
                         stride_o, stride_s, HIDDEN: tl.constexpr, BLOCK: tl.constexpr,
                         HAS_RESIDUAL: tl.constexpr, USE_GDC: tl.constexpr):
    row = tl.program_id(0)
    wait_then_release(USE_GDC)
    add_rms_norm_row(x_ptr + row * stride_x, res_ptr + row * stride_r, w_ptr,
                     out_ptr + row * stride_o, sum_ptr + row * stride_s, eps, HIDDEN, BLOCK,
                     HAS_RESIDUAL, False)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float, pdl: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual [N, H] -> (rms_norm(x + residual) * weight, x + residual); without a residual,
    (rms_norm(x) * weight, x). pdl: see kernels/pdl.py (default: where supported).
    """
    gdc = use_pdl(x, pdl)
    n, h = x.shape
    out = torch.empty_like(x)
    total = torch.empty_like(x) if residual is not None else x
    res = residual if residual is not None else x
    _add_rms_norm_kernel[(n,)](x, res, weight, out, total, eps, x.stride(0), res.stride(0),
                               out.stride(0), total.stride(0), HIDDEN=h,
                               BLOCK=triton.next_power_of_2(h), HAS_RESIDUAL=residual is not None,
                               USE_GDC=gdc, **launch_options(gdc))
    return out, total
