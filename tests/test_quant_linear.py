"""The reference quantized linear: x @ dequantize(W).T (+ bias), in x's dtype, for every format."""

from __future__ import annotations

import pytest
import torch
from test_quant_gguf import random_blocks

from llm.model.quant import (
    GGUF_FORMATS,
    quantize_int4,
    quantize_int8,
    quantized_linear,
    repack_gguf,
)

N, K = 48, 512


def all_formats() -> list:
    torch.manual_seed(0)
    w = torch.randn(N, K) * 0.05
    ws = [quantize_int8(w), quantize_int4(w), quantize_int4(w, group_size=32)]
    ws += [repack_gguf(random_blocks(t, N, K, seed=i, scale=0.001), t, (N, K))
           for i, t in enumerate(GGUF_FORMATS)]
    return ws


@pytest.mark.parametrize("w", all_formats(), ids=lambda w: w.format)
def test_quantized_linear_is_a_matmul_with_the_dequantized_weights(w) -> None:
    x = torch.randn(2, 3, K)
    bias = torch.randn(N)
    ref = x.double() @ w.dequantize().double().T  # [2, 3, N]
    for b, expected in ((None, ref), (bias, ref + bias.double())):
        y = quantized_linear(x, w, b)
        assert y.shape == (2, 3, N) and y.dtype == torch.float32
        torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)


def test_half_precision_activations_see_weights_in_their_dtype() -> None:
    w = quantize_int4(torch.randn(N, K))
    x = torch.randn(4, K).to(torch.bfloat16)
    y = quantized_linear(x, w)
    assert y.dtype == torch.bfloat16
    wb = w.dequantize().to(torch.bfloat16).double()
    torch.testing.assert_close(y.double(), x.double() @ wb.T, rtol=1e-2, atol=1e-2)


def test_mismatched_inputs_are_refused() -> None:
    w = quantize_int8(torch.randn(N, K))
    with pytest.raises(ValueError, match="256 features, the int8 weight expects 512"):
        quantized_linear(torch.randn(2, 256), w)
    with pytest.raises(TypeError, match="floating-point"):
        quantized_linear(torch.ones(2, K, dtype=torch.int64), w)
