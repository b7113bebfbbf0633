"""RMSNorm as Llama defines it: normalise in fp32, cast back, then scale."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llm.backends.torch.quant.native import NativeKernels
from llm.backends.torch.weight import QuantLinear, linear


class RMSNorm:
    """y = weight * (x / sqrt(mean(x^2) + eps)), statistics in fp32, result in the input dtype.

    fused: use the Triton kernel (residual add and norm in one pass); kernels: the C kernels
    (quant/native.py) do the same for float32 on the CPU; otherwise torch ops.
    """

    def __init__(self, weight: torch.Tensor, eps: float, fused: bool = False,
                 kernels: NativeKernels | None = None) -> None:
        self.weight = weight  # [H]
        self.eps = eps
        self.fused = fused
        self.kernels = kernels

    def add_norm(self, x: torch.Tensor, residual: torch.Tensor | None,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual) for x, residual [N, H]; residual None means zero."""
        if self.fused:
            from llm.backends.torch.kernels.norm import add_rms_norm

            return add_rms_norm(x, residual, self.weight, self.eps)
        if self.kernels is not None and x.dtype == torch.float32 and x.dim() == 2:
            res = None if residual is None else residual.contiguous()
            return self.kernels.add_rms_norm(x.contiguous(), res, self.weight, self.eps)
        total = x if residual is None else x + residual
        return self(total), total

    def after(self, x: torch.Tensor, w: torch.Tensor | QuantLinear, bias: torch.Tensor | None,
              residual: torch.Tensor, arrivals: torch.Tensor,
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """add_norm(linear(x, w, bias), residual) for x [B, K], residual [B, N]: in one launch
        where the fused path's quantized one-row GEMV takes w (the norm in its epilogue,
        kernels/qgemv_words.py `norm=`; arrivals: that launch site's int32 zero counter), else
        the projection, then `add_norm`. The same values either way (the GEMV's configs have the
        norm kernel's 4 warps, and so its order of the statistic's sum)."""
        if self.fused and isinstance(w, QuantLinear) and w.decodes(x) \
                and residual.dtype == x.dtype:
            from llm.backends.torch.kernels.qgemv import qgemv_add_norm
            from llm.backends.torch.kernels.qgemv_words import AddNorm

            res = residual if residual.stride(1) == 1 else residual.contiguous()
            out = qgemv_add_norm(x, w.weight, bias, AddNorm(res, self.weight, self.eps, arrivals))
            if out is not None:
                return out
        return self.add_norm(linear(x, w, bias), residual)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., H] -> [..., H]. One fused op in float32 (torch's rms_norm computes
        x * rsqrt(mean(x^2) + eps) * weight, the same operations in the same order)."""
        shape = (x.shape[-1],)
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, shape, self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), shape, None, self.eps).to(x.dtype)
