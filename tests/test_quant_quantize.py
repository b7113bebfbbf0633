"""Round-to-nearest quantizers of float weights: every weight within half a step of its level,
byte-for-byte reproducible, and exactly as many bytes as `llm.model.quant.int_formats` documents.
"""

from __future__ import annotations

import pytest
import torch

from llm.model.quant import QuantizedTensor, quantize_int4, quantize_int8
from llm.model.quant.bits import unpack4

N, K = 24, 512
REL = 1e-5  # float32 rounding of the division and of the dequantized level, relative to a step


def weights(seed: int = 0) -> torch.Tensor:
    """Weight-like values: normal rows of varied scale, an outlier, a zero row, a constant row."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * torch.logspace(-4, 1, N).unsqueeze(1)
    w[3, 17] = 40.0
    w[5] = 0.0
    w[6] = 0.3
    w[7, :128] = 1.0 + torch.rand(128, generator=g) * 1e-3  # far from zero, narrow range
    return w


def assert_planes_equal(a: QuantizedTensor, b: QuantizedTensor) -> None:
    assert (a.format, a.shape, sorted(a.planes)) == (b.format, b.shape, sorted(b.planes))
    for name, t in a.planes.items():
        assert t.dtype == b.planes[name].dtype and torch.equal(t, b.planes[name]), name


def test_int8_error_is_at_most_half_a_step() -> None:
    w = weights()
    q = quantize_int8(w)
    d = q.planes["d"]  # [N, 1] float32
    assert q.format == "int8" and d.dtype == torch.float32 and d.shape == (N, 1)
    assert torch.equal(d[:, 0], w.abs().amax(dim=1) / 127)
    err = (q.dequantize().double() - w.double()).abs()
    assert bool((err <= d.double() / 2 * (1 + REL)).all())
    codes = q.planes["qs"]
    assert codes.dtype == torch.int8 and int(codes.min()) >= -127
    assert bool((codes.abs().amax(dim=1) == 127)[w.abs().amax(dim=1) > 0].all())
    assert bool((q.dequantize()[5] == 0).all())  # an all-zero row stays exactly zero


@pytest.mark.parametrize("group", [32, 128])
def test_int4_error_is_at_most_half_a_step(group) -> None:
    w = weights()
    q = quantize_int4(w, group_size=group)
    assert q.format == f"int4_g{group}"
    d, m = q.planes["d"], q.planes["m"]
    assert d.dtype == m.dtype == torch.bfloat16 and d.shape == m.shape == (N, K // group)
    step = d.double().repeat_interleave(group, dim=1)  # [N, K]: each weight's own step
    err = (q.dequantize().double() - w.double()).abs()
    assert bool((err <= step / 2 * (1 + REL)).all())
    groups = w.reshape(N, -1, group)
    assert bool((m.float() <= groups.amin(-1)).all())  # the levels span the whole group
    assert bool((m.float() + 15 * d.float() >= groups.amax(-1)).all())
    codes = unpack4(q.planes["qs"])
    assert int(codes.max()) == 15 and int(codes.min()) == 0


def test_quantizers_are_reproducible_and_dtype_independent() -> None:
    w = weights(1)
    quantizers = (quantize_int8, lambda x: quantize_int4(x, 128), lambda x: quantize_int4(x, 32))
    for quantize in quantizers:
        assert_planes_equal(quantize(w), quantize(w.clone()))
        half = w.to(torch.bfloat16)
        assert_planes_equal(quantize(half), quantize(half.float()))


@pytest.mark.parametrize(("group", "bits"), [(32, 5.0), (128, 4.25)])
def test_int4_bytes_are_as_documented(group, bits) -> None:
    q = quantize_int4(weights(), group_size=group)
    assert q.nbytes == N * K // 2 + 2 * 2 * N * (K // group)  # codes + bf16 d and m per group
    assert q.planes["qs"].shape == (N, K // 2) and q.planes["qs"].dtype == torch.uint8
    assert q.layout.bits_per_weight(N, K) == bits


def test_int8_bytes_are_as_documented() -> None:
    q = quantize_int8(weights())
    assert q.nbytes == N * K + 4 * N  # int8 codes + one float32 scale per row


def test_default_int4_group_is_128() -> None:
    assert quantize_int4(weights()).format == "int4_g128"


def test_int4_slices_follow_the_group_size() -> None:
    w = weights()
    q = quantize_int4(w, group_size=128)
    full = q.dequantize()
    assert torch.equal(q.slice_cols(128, 384).dequantize(), full[:, 128:384])
    assert torch.equal(q.slice_rows(4, 9).dequantize(), full[4:9])
    with pytest.raises(ValueError, match="block size 128"):
        q.slice_cols(32, 128)
    q8 = quantize_int8(w)
    assert torch.equal(q8.slice_cols(5, 77).dequantize(), q8.dequantize()[:, 5:77])


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_int4(weights(), group_size=48)
    with pytest.raises(ValueError, match="not a multiple of the int4 group size 128"):
        quantize_int4(torch.randn(4, 96))
    with pytest.raises(ValueError, match="inf or NaN"):
        quantize_int8(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="2-D floating-point"):
        quantize_int8(torch.ones(4, 4, dtype=torch.int32))
