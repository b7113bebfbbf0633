"""CPU quantized linears (`prepare_cpu`) against F.linear(x, w.dequantize(float32)).

Tolerances are relative to B = |x| @ Gmax.T, Gmax[n, k] the largest |w| of k's 32-group of row n
(the scale that the format's rounding errors are proportional to):

- float32 (`dense`: exact ggml weights): only summation order differs, |err| <= K * 2^-24 * B,
  and K * 2^-24 < 2^-14 for K <= 1024.
- bfloat16 (unit roundoff u = 2^-8): the int4 kernel's weights differ by the bf16 rounding of
  scale and zero, <= u * (8|s| + |z|), at most 1.3 u * Gmax on these blocks (1.5 u asserted
  below), and the output is rounded once to bf16 (<= u * B): in all <= 2.5 u * B < 2^-6 * B.
  `dense` bf16 (Q6_K) and int8pack round each weight instead (<= u * |w|): the same bound.
- float16 (`dense`, u = 2^-11): weights and output rounded, < 2^-9 * B.
- float32 activations with bf16 compute: as bf16 plus the rounding of x to bf16 (<= u * B) and
  with the output rounded in bf16 before widening: <= 3.5 u * B < 2^-6 * B.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_quant_gguf import random_blocks

from llm.backends.torch.quant.cpu import CpuQuantLinear, describe_kinds, pack_int4, prepare_cpu
from llm.backends.torch.quant.int4_groups import to_int4_groups
from llm.model.quant import GGUF_FORMATS, quantize_int4, quantize_int8, repack_gguf

N, K = 40, 512  # N not a multiple of 16: the int4 path pads rows
TOL = {torch.float32: 2.0**-14, torch.bfloat16: 2.0**-6, torch.float16: 2.0**-9}
# (activation dtype, compute dtype or None) -> tolerance
CASES = {(dtype, None): tol for dtype, tol in TOL.items()}
CASES[(torch.float32, torch.bfloat16)] = 2.0**-6
INT4_KINDS = {"q4_0", "q4_1", "q4_k", "q5_0", "q5_1", "q5_k", "q8_0", "int4_g128", "int4_g32",
              "int4_g96"}


def all_formats() -> list:
    torch.manual_seed(0)
    w = torch.randn(N, K) * 0.05
    ws = [quantize_int8(w), quantize_int4(w), quantize_int4(w, 32),
          quantize_int4(w[:, :480], 96)]
    ws += [repack_gguf(random_blocks(t, N, K, seed=i, scale=0.01), t, (N, K))
           for i, t in enumerate(GGUF_FORMATS)]
    return ws


FORMATS = all_formats()


def group_max(w: torch.Tensor) -> torch.Tensor:
    """Gmax [N, K]: the largest |w| of each 32-group, broadcast over the group."""
    n, k = w.shape
    g = w.abs().reshape(n, k // 32, 32).amax(dim=-1, keepdim=True)
    return g.expand(n, k // 32, 32).reshape(n, k)


def expected_kind(fmt: str, compute: torch.dtype) -> str:
    if compute != torch.bfloat16 or fmt == "q6_k":
        return "dense"
    return "int8pack" if fmt == "int8" else "int4pack"


@pytest.mark.parametrize("case", list(CASES), ids=lambda c: f"{c[0]}-compute-{c[1]}")
@pytest.mark.parametrize("w", FORMATS, ids=lambda w: w.format)
def test_output_equals_the_dequantized_matmul(w, case) -> None:
    dtype, compute = case
    lin = prepare_cpu(w, dtype, compute)
    assert lin.kind == expected_kind(w.format, compute or dtype)
    weight = w.dequantize().double()
    gen = torch.Generator().manual_seed(1)
    for m in (1, 3, 17):
        x = torch.randn(m, w.in_features, generator=gen).to(dtype)
        bias = torch.randn(w.out_features, generator=gen).to(dtype)
        for b in (None, bias):
            y = lin(x, b)
            assert y.shape == (m, w.out_features) and y.dtype == dtype
            ref = F.linear(x.double(), weight, None if b is None else b.double())
            bound = x.double().abs() @ group_max(weight).T
            if b is not None:
                bound = bound + b.double().abs()
            err = (y.double() - ref).abs()
            assert bool((err <= CASES[case] * bound + 1e-30).all()), (
                f"{w.format} {case} M={m}: max err/bound {(err / bound).max().item():.3g}"
            )


@pytest.mark.parametrize("w", [w for w in FORMATS if w.format in INT4_KINDS],
                         ids=lambda w: w.format)
def test_int4_rewrite_is_ggml_exact_in_float32(w) -> None:
    """Scale and zero in float32: the rewritten weights are ggml's up to the float32 rounding of
    the zero (z = m + 8d or 8S - dmin*m), of the low part of a two-part format, and of ggml's own
    weight; bit for bit for Q4_0 and Q8_0 (exact zero and low part) and, on these blocks, for the
    other one-part formats (z exact: its terms' significands fit in 24 bits).
    """
    groups = to_int4_groups(w)
    weight = w.dequantize().double()
    got = groups.weight(torch.float32)
    if groups.copies == 1 or w.format == "q8_0":
        assert torch.equal(got.float().double(), weight)
    s = groups.scale.double().repeat_interleave(groups.group, dim=1)[:, :w.in_features]
    z = groups.zero.double().repeat_interleave(groups.group, dim=1)[:, :w.in_features]
    low = (groups.codes[:, :w.in_features].double() - 8) * s + z
    bound = 2.0**-24 * (z.abs() + low.abs() + weight.abs())  # half an ulp of each
    assert bool(((got - weight).abs() <= bound).all())


def test_bf16_rewrite_error_is_within_the_stated_bound() -> None:
    for w in FORMATS:
        groups = to_int4_groups(w)
        if groups is None:
            continue
        weight = w.dequantize().double()
        err = (groups.weight(torch.bfloat16) - weight).abs()
        assert bool((err <= 1.5 * 2.0**-8 * group_max(weight)).all()), w.format


def test_no_int4_form_for_q6_k_and_int8() -> None:
    assert {w.format for w in FORMATS if to_int4_groups(w) is None} == {"q6_k", "int8"}


@pytest.mark.parametrize(("k", "kind"), [(40, "dense"), (344, "dense"), (24, "dense"),
                                         (48, "int8pack"), (80, "int8pack")])
def test_int8_widths_torchs_kernel_cannot_take_stay_dense(k: int, kind: str) -> None:
    """torch's int8 kernel reads past its rows unless K % 16 == 0 (wrong sums at these widths,
    a crash in a model with K = 344): those layers are dequantized instead, and every width
    gives the dequantized product."""
    g = torch.Generator().manual_seed(k)
    w = quantize_int8(torch.randn(24, k, generator=g))
    lin = prepare_cpu(w, torch.bfloat16)
    assert lin.kind == kind
    x = torch.randn(3, k, generator=g).to(torch.bfloat16)
    want = x.double() @ w.dequantize().to(torch.bfloat16).double().T
    got = lin(x).double()
    assert float((got - want).abs().max()) <= 2e-2 * float(want.abs().max())


def test_layer_kinds_are_described_as_they_run() -> None:
    assert describe_kinds({}) == ""
    assert describe_kinds({"native": 9}) == "quantized matrices by the C kernels"
    assert describe_kinds({"dense": 2, "int8pack": 9, "int4pack": 1}) == (
        "quantized blocks: 1 by torch's int4 kernel, 9 by torch's int8 kernel, "
        "2 dequantized (dense)")


def test_int4pack_packs_once_in_fewer_bytes_than_bf16() -> None:
    w = next(w for w in FORMATS if w.format == "q4_1")
    lin = prepare_cpu(w, torch.bfloat16)
    padded = 48  # N = 40 rounded up to 16
    assert lin.weight.dtype == torch.uint8 and lin.weight.shape == (padded, K // 2)
    assert lin.scales.shape == (K // 32, padded, 2) and lin.scales.dtype == torch.bfloat16
    assert lin.nbytes < N * K * 2 / 2.5


def test_packing_in_row_chunks_gives_the_same_bytes() -> None:
    codes = torch.randint(0, 16, (208, 96), dtype=torch.uint8)  # 3 blocks of 64 rows and 16
    whole = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
    assert torch.equal(pack_int4(codes, rows=64), whole)
    assert torch.equal(pack_int4(codes, rows=128), whole)
    with pytest.raises(ValueError, match="multiple of 64"):
        pack_int4(codes, rows=48)


def test_bad_inputs_are_refused_clearly() -> None:
    w = next(w for w in FORMATS if w.format == "q4_1")
    lin = prepare_cpu(w, torch.bfloat16)
    with pytest.raises(ValueError, match=r"expected activations \[M, 512\].*got \(2, 256\)"):
        lin(torch.randn(2, 256).bfloat16())
    with pytest.raises(ValueError, match=r"expected activations \[M, 512\]"):
        lin(torch.randn(2, 3, K).bfloat16())
    with pytest.raises(TypeError, match="prepared for torch.bfloat16, x is torch.float32"):
        lin(torch.randn(2, K))
    with pytest.raises(ValueError, match=r"bias must be \[40\] torch.bfloat16"):
        lin(torch.randn(2, K).bfloat16(), torch.randn(40))
    with pytest.raises(TypeError, match="activation dtype must be one of"):
        prepare_cpu(w, torch.float64)
    with pytest.raises(TypeError, match="only bf16 compute for float32 activations"):
        prepare_cpu(w, torch.float16, torch.bfloat16)
    with pytest.raises(TypeError, match="only bf16 compute for float32 activations"):
        prepare_cpu(w, torch.bfloat16, torch.float32)
    with pytest.raises(TypeError, match="needs a QuantizedTensor, got Tensor"):
        prepare_cpu(torch.randn(N, K), torch.bfloat16)
    assert isinstance(lin, CpuQuantLinear)
