"""Block-float numerics against an independent per-element reference (reference 0.1)."""

import math
import struct

import pytest
import torch

import llm.ttnn_emu as ttnn


def _fp32_fields(v: float) -> tuple[int, int, int]:
    """(sign, exponent field, 24-bit mantissa with the hidden bit) of `v` rounded to fp32."""
    bits = struct.unpack("<I", struct.pack("<f", v))[0]
    return bits >> 31, (bits >> 23) & 0xFF, (bits & 0x7FFFFF) | (1 << 23)


def ref_bfp(x: torch.Tensor, mant_bits: int) -> torch.Tensor:
    """Independent scalar reference of ttnn's host packer (reference 0.1 plus tt-metal's
    convert_u32_to_bfp): rows of 16 share the largest fp32 exponent field e_s; each value's 24-bit
    mantissa (hidden bit included) is shifted right by e_s - e, the shifted-out bits dropped, then
    the `mant_bits`-bit magnitude is rounded half to even on the remaining bits and saturates;
    zeros and fp32 subnormals give 0, and a magnitude of 0 is +0.0."""
    max_mag = (1 << mant_bits) - 1
    drop = 24 - mant_bits  # bits below the kept magnitude after the alignment shift
    out = torch.zeros_like(x, dtype=torch.float64)
    flat = x.to(torch.float32).to(torch.float64).reshape(-1, x.shape[-1])
    res = out.reshape(-1, x.shape[-1])
    for r in range(flat.shape[0]):
        for g0 in range(0, flat.shape[1], 16):
            group = [float(v) for v in flat[r, g0:g0 + 16]]
            if any(not math.isfinite(v) for v in group):
                for i, v in enumerate(group):
                    res[r, g0 + i] = v if not math.isfinite(v) else 0.0
                continue
            fields = [_fp32_fields(v) for v in group]
            shared = max(e for _, e, _ in fields)
            for i, (sign, e, mant) in enumerate(fields):
                if e == 0:  # zero or subnormal
                    continue
                shift = shared - e
                aligned = mant >> shift if shift < 32 else 0  # shifted-out bits are lost
                mag, low = aligned >> drop, aligned & ((1 << drop) - 1)
                half = 1 << (drop - 1)
                if low > half or (low == half and mag % 2 == 1):
                    mag += 1
                mag = min(mag, max_mag)
                if mag:
                    q = mag * 2.0 ** (shared - 127 - (mant_bits - 1))
                    res[r, g0 + i] = -q if sign else q
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


def test_tie_with_tail_rounds_after_the_alignment_shift():
    # 0.5078125 + 2**-24 is 32.5 steps (2**-6, from the group's 1.0) plus its last mantissa bit;
    # the alignment shift by one drops that bit, leaving an exact tie that rounds to even (32),
    # where exact rounding would give 33 steps (0.515625)
    x = torch.tensor([[1.0, 0.5078125 + 2.0**-24, -(0.5078125 + 2.0**-24)]])
    assert roundtrip(x, ttnn.bfloat8_b).tolist() == [[1.0, 0.5, -0.5]]
    assert torch.equal(ref_bfp(torch.nn.functional.pad(x, (0, 29)), 7)[:, :3],
                       torch.tensor([[1.0, 0.5, -0.5]]))


def test_reference_rule_flushes_subnormals_and_negative_zero():
    x = torch.tensor([[1.0, 1e-39, -1e-39, -1e-9, -0.0]])
    expect = torch.tensor([[1.0, 0.0, 0.0, 0.0, 0.0]])
    got = roundtrip(x, ttnn.bfloat8_b)
    ref = ref_bfp(torch.nn.functional.pad(x, (0, 27)), 7)[:, :5]
    for y in (got, ref):
        assert torch.equal(y, expect) and not torch.signbit(y).any()


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
