"""Block-float numerics against an independent per-element reference (reference 0.1)."""

import math

import pytest
import torch

import llm.ttnn_emu as ttnn


def ref_bfp(x: torch.Tensor, mant_bits: int) -> torch.Tensor:
    """Independent scalar reference: rows of 16 share e = floor(log2(max|x|))."""
    max_mag = (1 << mant_bits) - 1
    out = torch.zeros_like(x, dtype=torch.float64)
    flat = x.to(torch.float64).reshape(-1, x.shape[-1])
    res = out.reshape(-1, x.shape[-1])
    for r in range(flat.shape[0]):
        for g0 in range(0, flat.shape[1], 16):
            group = [float(v) for v in flat[r, g0:g0 + 16]]
            if any(not math.isfinite(v) for v in group):
                for i, v in enumerate(group):
                    res[r, g0 + i] = v if not math.isfinite(v) else 0.0
                continue
            m = max(abs(v) for v in group)
            if m == 0:
                continue
            e = math.floor(math.log2(m))
            if 2.0**e > m:  # guard log2 rounding
                e -= 1
            step = 2.0 ** (e - (mant_bits - 1))
            for i, v in enumerate(group):
                q = min(round(abs(v) / step), max_mag)  # Python round = half to even
                res[r, g0 + i] = math.copysign(q * step, v) if q else 0.0
    return res.reshape(x.shape).to(torch.float32)


def roundtrip(x, dtype):
    return ttnn.to_torch(ttnn.from_torch(x, dtype=dtype, layout=ttnn.TILE_LAYOUT))


def test_outlier_flushes_exactly_its_15_neighbours():
    x = torch.full((32, 32), 1e-3)
    x[7, 20] = 1000.0
    y = roundtrip(x, ttnn.bfloat8_b)
    zero = y == 0
    assert zero.sum() == 15
    assert zero[7, 16:32].sum() == 15 and y[7, 20] == 1000.0
    assert not zero[7, :16].any()


@pytest.mark.parametrize(
    "dtype,value,expect",
    [
        (ttnn.bfloat8_b, 1.999, 1.984375),
        (ttnn.bfloat4_b, 1.999, 1.75),
        (ttnn.bfloat4_b, 1000.0, 896.0),
        (ttnn.bfloat8_b, 1 + 1 / 128, 1.0),  # tie -> even
        (ttnn.bfloat8_b, 1 + 3 / 128, 1.03125),  # tie -> even (up)
    ],
)
def test_worked_examples(dtype, value, expect):
    assert roundtrip(torch.tensor([[value]]), dtype).item() == expect


def test_tie_examples_share_group_with_one():
    x = torch.tensor([[1.0, 1 + 1 / 128, 1 + 3 / 128]])
    assert roundtrip(x, ttnn.bfloat8_b).tolist() == [[1.0, 1.0, 1.03125]]


def test_inf_nan_flush_group():
    x = torch.ones(1, 32)
    x[0, 3] = float("inf")
    x[0, 20] = float("nan")
    y = roundtrip(x, ttnn.bfloat8_b)
    assert torch.isinf(y[0, 3]) and torch.isnan(y[0, 20])
    assert (y[0, :16] == 0).sum() == 15 and (y[0, 16:] == 0).sum() == 15


@pytest.mark.parametrize("dtype,bits", [(ttnn.bfloat8_b, 7), (ttnn.bfloat4_b, 3)])
def test_random_matches_reference(dtype, bits):
    x = torch.randn(2, 32, 64) * torch.logspace(-3, 3, 64)
    got = roundtrip(x, dtype)
    assert got.dtype == torch.float32
    assert torch.equal(got, ref_bfp(x, bits))


def test_padding_participates_and_is_stripped():
    x = torch.randn(5, 40)
    got = roundtrip(x, ttnn.bfloat8_b)
    assert got.shape == (5, 40)
    padded = torch.nn.functional.pad(x, (0, 24, 0, 27))
    assert torch.equal(got, ref_bfp(padded, 7)[:5, :40])


def test_tile_bytes():
    assert ttnn.types.tile_bytes(ttnn.bfloat16) == 2048
    assert ttnn.types.tile_bytes(ttnn.bfloat8_b) == 1088
    assert ttnn.types.tile_bytes(ttnn.bfloat4_b) == 576
    assert ttnn.types.tile_bytes(ttnn.float32) == 4096


def test_col_tilize_transposes():
    x = torch.randn(64, 32)
    t = ttnn.from_torch(x, dtype=ttnn.bfloat8_b, layout=ttnn.TILE_LAYOUT, col_tilize=True)
    assert tuple(t.shape) == (32, 64)
    assert torch.equal(ttnn.to_torch(t), ref_bfp(x.T.contiguous(), 7))
