"""Decode batches of 17..64 rows on the codes (kernels/qgemm_batch.py) against
x @ dequantize(W).T: small shapes everywhere (Triton's interpreter on the CPU), the routing of
`QuantLinear` and Llama-3.1-8B shapes on a GPU."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")
from llm.backends.torch.kernels.qgemm_batch import (  # noqa: E402
    BATCH_FORMATS,
    batch_kernel_takes,
    qgemm_batch,
)
from llm.backends.torch.kernels.qgemm_tc import qgemm_tc  # noqa: E402
from llm.backends.torch.kernels.qgemv_config import TC_BATCH_MAX_ROWS, qgemm_tc_config  # noqa: E402
from llm.backends.torch.weight import QGEMV_MAX_ROWS, TC_BATCH_ROWS, QuantLinear  # noqa: E402
from tests.torch_backend.test_qgemv import DEVICE, _ref, random_quantized  # noqa: E402

# the formats `qgemm_batch` takes: 8-bit, 4-bit with and without an offset, 6-bit, K-quants
FORMATS = list(BATCH_FORMATS)
GPU = pytest.mark.skipif(DEVICE == "cpu", reason="needs a GPU")


def _shape(fmt: str) -> tuple[int, int]:
    """N odd (a partial tile); K of whole 256-blocks for the K-quants, else 5 groups."""
    return (11, 512) if fmt in ("q4_k", "q6_k", "int4_g128") else (13, 160)


def _close(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    err = (out.double() - ref).norm() / ref.norm()
    assert err < 8e-3, err  # bf16 output rounding (each element's 2^-9)


def test_the_limits_agree() -> None:
    assert TC_BATCH_ROWS == TC_BATCH_MAX_ROWS and QGEMV_MAX_ROWS == 16


@pytest.mark.parametrize("m", [17, 33, 64])
@pytest.mark.parametrize("fmt", FORMATS)
def test_batch_rows_match_the_dequantized_matmul(fmt: str, m: int) -> None:
    g = torch.Generator().manual_seed(m + 7 * len(fmt))
    n, k = _shape(fmt)
    w = random_quantized(fmt, n, k, g)
    x = torch.randn(m, k, generator=g).to(DEVICE, torch.bfloat16)
    bias = torch.randn(n, generator=g).to(DEVICE) if m == 33 else None
    assert batch_kernel_takes(x, w)
    _close(qgemm_batch(x, w, bias), _ref(x, w, bias))


def test_only_the_rows_above_the_small_batches_up_to_the_limit() -> None:
    g = torch.Generator().manual_seed(3)
    w = random_quantized("q4_0", 13, 160, g)
    for m, takes in ((16, False), (17, True), (TC_BATCH_MAX_ROWS, True),
                     (TC_BATCH_MAX_ROWS + 1, False)):
        assert batch_kernel_takes(torch.zeros(m, 160, dtype=torch.bfloat16, device=DEVICE),
                                  w) is takes, m
    assert not batch_kernel_takes(torch.zeros(32, 160, device=DEVICE), w)  # fp32: not bf16
    for fmt in ("q5_0", "q5_1", "int8"):  # not yet run at these rows on a GPU: dequantized
        other = random_quantized(fmt, 13, 160, g)
        assert not batch_kernel_takes(torch.zeros(32, 160, dtype=torch.bfloat16, device=DEVICE),
                                      other)
    with pytest.raises(ValueError, match="qgemm_batch takes bf16 x"):
        qgemm_batch(torch.zeros(16, 160, dtype=torch.bfloat16, device=DEVICE), w)


@GPU
@pytest.mark.parametrize("fmt", ["q4_0", "q4_k", "q6_k", "q8_0"])
def test_quant_linear_routes_batches_to_the_codes(fmt: str, monkeypatch) -> None:
    """17..64 rows go through `qgemm_batch` (not a dense copy), 65 rows dequantize; both within
    rounding of the dequantized product."""
    from llm.backends.torch.kernels import dequant

    g = torch.Generator().manual_seed(5)
    w = random_quantized(fmt, 4096, 4096, g)
    lin = QuantLinear(w, torch.bfloat16)
    dense_calls = []
    real = dequant.dequantize_dense
    monkeypatch.setattr(dequant, "dequantize_dense",
                        lambda *a, **kw: dense_calls.append(1) or real(*a, **kw))
    for m in (24, 64, 65):
        x = torch.randn(m, 4096, generator=g).to(DEVICE, torch.bfloat16)
        _close(lin(x), _ref(x, w, None))
        assert len(dense_calls) == (m > TC_BATCH_MAX_ROWS), m


@GPU
@pytest.mark.parametrize("m", [17, 33, 64])
@pytest.mark.parametrize("fmt", ["q5_0", "q5_1", "q5_k", "int8", *FORMATS])
def test_every_format_in_the_engine_launch_at_batch_rows(fmt: str, m: int) -> None:
    """The Triton kernel compiled in the engine's launch (`qgemm_tc_config`) at 17..64 rows of an
    8B-width matrix, for every format it computes, those `qgemm_batch` does not take yet too:
    what a format must pass before BATCH_FORMATS names it."""
    g = torch.Generator().manual_seed(m + 3 * len(fmt))
    w = random_quantized(fmt, 1024, 4096, g)
    x = torch.randn(m, 4096, generator=g).to(DEVICE, torch.bfloat16)
    tc = qgemm_tc_config(m, w.out_features, w.in_features)
    out = qgemm_tc(x, w, None, tc.block_n, tc.num_warps, tc.num_stages, split_k=tc.split_k)
    _close(out, _ref(x, w, None))


@GPU
def test_a_rows_sums_are_the_same_at_every_batch_of_one_padding() -> None:
    """Rows 0..19 of a 20-row and of a 32-row call (both padded to 32) are equal bit for bit."""
    g = torch.Generator().manual_seed(9)
    w = random_quantized("q4_0", 4096, 4096, g)
    x = torch.randn(32, 4096, generator=g).to(DEVICE, torch.bfloat16)
    assert torch.equal(qgemm_batch(x[:20], w), qgemm_batch(x, w)[:20])
