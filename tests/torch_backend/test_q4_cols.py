"""bench/q4_0_cols.cu (one row of x times Q4_0 planes, each 32-group a column of B): its lane and
fragment mapping, its sums of x by ALU and its SiLU*up launch's halves emulated in numpy by the
PTX ISA's m16n8k16 layouts (everywhere), and the compiled kernel against dequantize-then-matmul
(CUDA only)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench import q4_cols_explore as cols


@pytest.mark.parametrize(("rb", "warps", "n", "k"), [(1, 2, 32, 1024), (2, 4, 64, 768),
                                                      (4, 2, 64, 256), (1, 8, 16, 512)])
def test_emulated_lanes_give_the_dequantized_product(rb: int, warps: int, n: int, k: int) -> None:
    """Warps splitting K's chunks evenly, unevenly (3 chunks, 4 warps) and with idle warps."""
    x, qs, d = cols.random_q4_0(n, k, seed=rb + warps)
    want = cols.dequantized_product(x, qs, d)
    got = cols.emulate(x, qs, d, rb, warps)
    assert np.abs(got - want).max() <= 1e-9 * np.abs(want).max()


@pytest.mark.parametrize(("rb", "warps", "n", "k"), [(1, 4, 64, 1280), (2, 2, 64, 512),
                                                      (1, 8, 32, 768)])
def test_emulated_sums_of_x_and_glu_halves(rb: int, warps: int, n: int, k: int) -> None:
    """The sums of x by ALU (lane sums, group shuffles) and the SiLU*up launch's halves (gate rows
    on the first warps, up rows I + the same on the others), each against float64."""
    x, qs, d = cols.random_q4_0(n, k, seed=rb + k)
    want = cols.dequantized_product(x, qs, d)
    got = cols.emulate(x, qs, d, rb, warps, sa=True)
    assert np.abs(got - want).max() <= 1e-9 * np.abs(want).max()
    want = cols.glu_product(x, qs, d)
    for sa in (False, True):
        got = cols.emulate(x, qs, d, rb, warps, sa=sa, glu=True)
        assert np.abs(got - want).max() <= 1e-9 * np.abs(want).max()


def test_a_wrong_x_pair_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """The emulation can fail: x's pairs built in another column order than the codes'."""
    real = cols._prmt
    monkeypatch.setattr(cols, "_prmt", lambda a, b, sel: real(a, b, sel ^ 0x2222))
    x, qs, d = cols.random_q4_0(32, 512, seed=5)
    want = cols.dequantized_product(x, qs, d)
    got = cols.emulate(x, qs, d, 1, 2)
    assert np.abs(got - want).max() > 0.1 * np.abs(want).max()


def test_the_source_names_one_kernel_per_launch_shape() -> None:
    src = cols.kernel_source(2, 4, True)
    assert src.rstrip().endswith("COLS_KERNEL(q4_0_cols_r2_w4_x, 2, 4, true, false, 1, false)")
    assert cols.kernel_name(1, 4, na=4) == "q4_0_cols_r1_w4_a4"
    assert cols.kernel_name(2, 4, glu=True) == "q4_0_cols_r2_w4_glu"
    assert cols.kernel_name(1, 8) == "q4_0_cols_r1_w8"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(("rb", "warps", "xp", "na", "sa"),
                         [(1, 4, False, 1, False), (2, 8, True, 2, True), (4, 4, False, 1, False),
                          (1, 8, True, 4, True), (1, 4, False, 1, True), (4, 1, False, 1, True)])
def test_the_kernel_gives_the_dequantized_product(rb: int, warps: int, xp: bool, na: int,
                                                  sa: bool) -> None:
    from bench.quant_decode import random_quantized

    g = torch.Generator(device="cuda").manual_seed(rb)
    w = random_quantized("q4_0", 256, 2304, g, torch.device("cuda"))  # 9 chunks: uneven
    x = (torch.randn(1, 2304, device="cuda", generator=g) * 0.5).to(torch.bfloat16)
    ref = x.double() @ w.dequantize(torch.float64).T
    for pdl in (False, True):
        y = cols.cols_matmul(x, w, rb, warps, pdl, xp, na=na, sa=sa)
        assert float((y.double() - ref).abs().max() / ref.abs().max()) <= 5e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(("rb", "warps", "sa"), [(1, 8, True), (2, 4, False)])
def test_the_glu_kernel_gives_silu_mul_of_the_product(rb: int, warps: int, sa: bool) -> None:
    """SiLU*up in the epilogue: the bits of silu_mul on the product of the plain launch whose
    warps split K as each half of the glu launch's do (the same sums in the same order), and
    within the bf16 rounding of silu(gate) * up in float64."""
    from bench.quant_decode import random_quantized
    from llm.backends.torch.kernels.silu_mul import silu_mul

    g = torch.Generator(device="cuda").manual_seed(rb)
    w = random_quantized("q4_0", 2 * 512, 1024, g, torch.device("cuda"))
    x = (torch.randn(1, 1024, device="cuda", generator=g) * 0.5).to(torch.bfloat16)
    plain = cols.cols_matmul(x, w, rb, warps // 2, sa=sa)
    fused = cols.cols_matmul(x, w, rb, warps, glu=True, sa=sa)
    assert torch.equal(fused, silu_mul(plain))
    ref = x.double() @ w.dequantize(torch.float64).T  # [1, 2I]
    want = torch.nn.functional.silu(ref[:, :512]) * ref[:, 512:]
    assert float((fused.double() - want).abs().max() / want.abs().max()) <= 2e-2
