"""Reference quantized linear layer: dequantize, then an ordinary matmul.

This is the CPU/GPU fallback and the function every quantized kernel is tested against: a kernel
must compute the same values up to accumulation order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llm.model.quant.tensor import QuantizedTensor


def quantized_linear(
    x: torch.Tensor, w: QuantizedTensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x [..., K] @ w.dequantize(x.dtype).T [K, N] (+ bias [N]) -> [..., N].

    The weights are dequantized in float32 (exactly ggml's values) and then cast to x's dtype, as
    a half-precision matmul on dequantized weights sees them; compare a kernel that keeps the
    dequantized weights in float32 with `quantized_linear(x.float(), w)` instead.
    """
    if not x.is_floating_point():
        raise TypeError(f"quantized_linear needs floating-point activations, got {x.dtype}")
    if x.shape[-1] != w.in_features:
        raise ValueError(
            f"activations have {x.shape[-1]} features, the {w.format} weight expects "
            f"{w.in_features}"
        )
    return F.linear(x, w.dequantize(x.dtype), bias)
