"""RMSNorm as Llama defines it: normalise in fp32, cast back, then scale."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llm.backends.torch.quant.native import NativeKernels


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

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., H] -> [..., H]. One fused op in float32 (torch's rms_norm computes
        x * rsqrt(mean(x^2) + eps) * weight, the same operations in the same order)."""
        shape = (x.shape[-1],)
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, shape, self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), shape, None, self.eps).to(x.dtype)
