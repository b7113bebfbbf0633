"""RMSNorm as Llama defines it: normalise in fp32, cast back, then scale."""

from __future__ import annotations

import torch


class RMSNorm:
    """y = weight * (x / sqrt(mean(x^2) + eps)), statistics in fp32, result in the input dtype."""

    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        self.weight = weight  # [H]
        self.eps = eps

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., H] -> [..., H]."""
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)
