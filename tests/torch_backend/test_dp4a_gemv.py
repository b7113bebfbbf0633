"""bench/dp4a_gemv.py (one row of x times Q4_0 / Q8_0 planes by dp4a on x's exact byte planes):
the planes give x back, and the product is the dequantized one's to float32 rounding, under the
interpreter (dp4a from the bytes) and compiled on a GPU (the instruction)."""

from __future__ import annotations

import pytest
import torch

from bench.dp4a_gemv import dp4a_gemv, dp4a_gemv_split, x_planes, x_planes_split
from bench.quant_decode import random_quantized


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _x_back(planes: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """x [K] as float64 from its planes: (65536 a + 256 b + c) * s."""
    p, s, _ = planes
    a = p[0].cpu().view(torch.int8).long()
    X = a * 65536 + p[1].cpu().long() * 256 + p[2].cpu().long()
    return X.double() * s.cpu().double().repeat_interleave(32)


def test_planes_give_x_back_exactly_down_to_2_to_the_minus_16_of_the_group() -> None:
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(1, 256, generator=g) * 3).to(torch.bfloat16)
    x[0, 32:64] = 0  # a group of zeros
    x[0, 64:96] *= 1e-33  # a group of tiny values (its scale is clamped to 2^-126)
    x[0, 100] = float(x[0, 96:128].abs().max()) * 2 ** -20  # below the group's reach
    planes = x_planes(x.to(_device()))
    back = _x_back(planes)
    want = x[0].double()
    exact = torch.ones(256, dtype=torch.bool)
    exact[100] = False
    assert torch.equal(back[exact], want[exact])
    assert abs(float(back[100] - want[100])) < float(planes[1][3].cpu())  # less than s, toward 0
    p, _, sums = planes
    a = p[0].cpu().view(torch.int8).long().view(-1, 32)
    assert torch.equal(sums[0].cpu().long(), a.sum(1))
    assert torch.equal(sums[1].cpu().long(), p[1].cpu().long().view(-1, 32).sum(1))
    assert torch.equal(sums[2].cpu().long(), p[2].cpu().long().view(-1, 32).sum(1))
    X = (a * 65536 + p[1].cpu().long().view(-1, 32) * 256 + p[2].cpu().long().view(-1, 32))
    assert int(X.abs().max()) < 2 ** 23


@pytest.mark.parametrize("fmt", ["q4_0", "q8_0"])
@pytest.mark.parametrize(("n", "k", "block_n", "block_g"), [(40, 256, 16, 4), (32, 96, 32, 2),
                                                            (7, 128, 8, 4)])
def test_product_is_the_dequantized_one(fmt: str, n: int, k: int, block_n: int,
                                        block_g: int) -> None:
    """Row tiles past N, K not a multiple of a chunk (96 = 3 groups in chunks of 2); in float32
    every group's dot product is exact before one rounding, so the error is float32's."""
    dev = _device()
    g = torch.Generator(device=dev).manual_seed(n + k)
    w = random_quantized(fmt, n, k, g, dev)
    x = (torch.randn(1, k, device=dev, generator=g) * 0.5).to(torch.bfloat16)
    want = x.double() @ w.dequantize(torch.float64).T
    y = dp4a_gemv(x_planes(x), w, dtype=torch.float32, block_n=block_n, block_g=block_g,
                  num_warps=2)
    assert y.shape == (1, n)
    assert float((y.double() - want).abs().max()) <= 1e-6 * float(want.abs().max())


@pytest.mark.parametrize(("n", "k", "block_n", "block_g"), [(40, 256, 16, 4), (32, 96, 32, 2)])
def test_split_planes_product_is_the_dequantized_one(n: int, k: int, block_n: int,
                                                     block_g: int) -> None:
    dev = _device()
    g = torch.Generator(device=dev).manual_seed(n + k + 1)
    w = random_quantized("q4_0", n, k, g, dev)
    x = (torch.randn(1, k, device=dev, generator=g) * 0.5).to(torch.bfloat16)
    want = x.double() @ w.dequantize(torch.float64).T
    planes, meta = x_planes_split(x)
    for prefetch in (False, True):
        y = dp4a_gemv_split((planes, meta), w, dtype=torch.float32, block_n=block_n,
                            block_g=block_g, num_warps=2, prefetch=prefetch)
        assert float((y.double() - want).abs().max()) <= 1e-6 * float(want.abs().max())
    p, s, sums = x_planes(x)  # the same bytes, the groups' halves apart
    half = torch.cat([p.view(3, -1, 2, 16)[:, :, 0], p.view(3, -1, 2, 16)[:, :, 1]], 1)
    assert torch.equal(planes.view(3, -1, 16).cpu(), half.cpu())
    assert torch.equal(meta[:, :3].T.cpu(), -8 * sums.cpu())
    assert torch.equal(meta[:, 3].cpu().view(torch.float32), s.cpu())


def test_a_wrong_plane_is_caught() -> None:
    """The test can fail: plane b read as plane c (a wrong word offset)."""
    dev = _device()
    g = torch.Generator(device=dev).manual_seed(3)
    w = random_quantized("q4_0", 16, 128, g, dev)
    x = (torch.randn(1, 128, device=dev, generator=g)).to(torch.bfloat16)
    p, s, sums = x_planes(x)
    swapped = (torch.stack([p[0], p[2], p[1]]), s, sums)
    want = x.double() @ w.dequantize(torch.float64).T
    y = dp4a_gemv(swapped, w, dtype=torch.float32, block_n=16, block_g=4, num_warps=2)
    assert float((y.double() - want).abs().max()) > 1e-3 * float(want.abs().max())


def test_a_non_finite_x_gives_nan_where_dense_does() -> None:
    dev = _device()
    g = torch.Generator(device=dev).manual_seed(4)
    w = random_quantized("q8_0", 8, 64, g, dev)
    x = torch.randn(1, 64, device=dev, generator=g).to(torch.bfloat16)
    x[0, 40] = float("inf")
    y = dp4a_gemv(x_planes(x), w, dtype=torch.float32, block_n=8, block_g=2, num_warps=2)
    assert bool(torch.isnan(y).all())


def test_refusals() -> None:
    with pytest.raises(ValueError, match="one row of x with K a multiple of 32"):
        x_planes(torch.zeros(2, 64, dtype=torch.bfloat16))
    w = random_quantized("q4_1", 8, 64, torch.Generator().manual_seed(0), torch.device("cpu"))
    with pytest.raises(ValueError, match="takes"):
        dp4a_gemv(x_planes(torch.zeros(1, 64, dtype=torch.bfloat16)), w)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("fmt", ["q4_0", "q8_0"])
def test_compiled_bf16_output_at_8b_width(fmt: str) -> None:
    """Compiled (dp4a instructions, PDL where the GPU has it), bf16 out: within bf16's rounding
    of the float64 product."""
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(5)
    w = random_quantized(fmt, 1024, 4096, g, dev)
    x = (torch.randn(1, 4096, device=dev, generator=g) * 0.5).to(torch.bfloat16)
    want = x.double() @ w.dequantize(torch.float64).T
    for bn, bg, wp in [(16, 32, 4), (32, 32, 4), (16, 64, 8)]:
        y = dp4a_gemv(x_planes(x), w, block_n=bn, block_g=bg, num_warps=wp)
        assert torch.equal(y, want.to(torch.bfloat16)) or float(
            (y.double() - want).abs().max()) <= 2 ** -8 * float(want.abs().max())
        y32 = dp4a_gemv(x_planes(x), w, dtype=torch.float32, block_n=bn, block_g=bg,
                        num_warps=wp)
        assert float((y32.double() - want).abs().max()) <= 1e-6 * float(want.abs().max())
        if fmt == "q4_0":
            y32 = dp4a_gemv_split(x_planes_split(x), w, dtype=torch.float32, block_n=bn,
                                  block_g=bg, num_warps=wp, prefetch=True)
            assert float((y32.double() - want).abs().max()) <= 1e-6 * float(
                want.abs().max())
