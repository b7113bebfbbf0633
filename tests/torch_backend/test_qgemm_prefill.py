"""Prompt chunks on the codes (kernels/qgemm_prefill.py) against x @ dequantize(W).T: every
format on small shapes (Triton's interpreter on the CPU), the dense path's bits and Llama-3.1-8B
shapes on a GPU."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")
from llm.backends.torch.kernels.dequant import dequantize_dense  # noqa: E402
from llm.backends.torch.kernels.qgemm_prefill import (  # noqa: E402
    prefill_kernel_takes,
    qgemm_prefill,
)
from tests.torch_backend.test_qgemv import DEVICE, GGML, _ref, random_quantized  # noqa: E402

FORMATS = [*GGML, "int8", "int4_g128", "int4_g32"]
GPU = pytest.mark.skipif(DEVICE == "cpu", reason="needs a GPU")
SMALL = {"block_m": 32, "block_n": 16, "block_k": 64, "num_warps": 4, "group_n": 2}


def _shape(fmt: str) -> tuple[int, int]:
    """N not a multiple of block_n; K of whole 256-blocks for the K-quants and int4_g128, else
    5 groups (a partial last step of 64 columns)."""
    return (37, 512) if fmt in ("q4_k", "q5_k", "q6_k", "int4_g128") else (37, 160)


def _close(out: torch.Tensor, ref: torch.Tensor, bound: float = 8e-3) -> None:
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    err = (out.double() - ref).norm() / ref.norm()
    assert err < bound, err  # bf16 rounding of the weights and of the output


@pytest.mark.parametrize("natural", [False, True])
@pytest.mark.parametrize("fmt", FORMATS)
def test_prompt_rows_match_the_dequantized_matmul(fmt: str, natural: bool) -> None:
    g = torch.Generator().manual_seed(11 + len(fmt))
    n, k = _shape(fmt)
    w = random_quantized(fmt, n, k, g)
    x = torch.randn(70, k, generator=g).to(DEVICE, torch.bfloat16)  # 3 row tiles, the last partial
    bias = torch.randn(n, generator=g).to(DEVICE)
    assert prefill_kernel_takes(x, w)
    _close(qgemm_prefill(x, w, bias, natural=natural, **SMALL), _ref(x, w, bias))
    _close(qgemm_prefill(x[:5], w, None, natural=natural, **SMALL), _ref(x[:5], w, None))


def test_program_order_covers_every_tile_once() -> None:
    """Groups of column tiles narrower at the end (5 tiles in groups of 2), rows in 3 tiles: each
    output element written once, by the program of its tile."""
    g = torch.Generator().manual_seed(2)
    w = random_quantized("q4_0", 80, 64, g)
    x = torch.randn(70, 64, generator=g).to(DEVICE, torch.bfloat16)
    _close(qgemm_prefill(x, w, **SMALL), _ref(x, w, None))


def test_refusals_name_what_is_wrong() -> None:
    g = torch.Generator().manual_seed(4)
    w = random_quantized("q4_0", 16, 64, g)
    with pytest.raises(ValueError, match=r"16-bit x \[M, 64\].*float32"):
        qgemm_prefill(torch.zeros(80, 64, device=DEVICE), w)
    with pytest.raises(ValueError, match=r"16-bit x \[M, 64\].*\(80, 96\)"):
        qgemm_prefill(torch.zeros(80, 96, dtype=torch.bfloat16, device=DEVICE), w)
    with pytest.raises(ValueError, match="block_k must be a positive multiple of 32, got 48"):
        qgemm_prefill(torch.zeros(80, 64, dtype=torch.bfloat16, device=DEVICE), w, block_k=48)
    int8 = random_quantized("int8", 16, 100, g)  # a partial last group: the dense path's
    assert not prefill_kernel_takes(torch.zeros(80, 100, dtype=torch.bfloat16, device=DEVICE),
                                    int8)


@GPU
@pytest.mark.parametrize("natural", [False, True])
@pytest.mark.parametrize("fmt", FORMATS)
def test_the_dense_paths_weights_at_8b_width(fmt: str, natural: bool) -> None:
    """Against F.linear on `dequantize_dense`'s bf16 copy (the same weights): the same products
    summed in another order, so within fp32 accumulation error, far below bf16's."""
    g = torch.Generator().manual_seed(7)
    w = random_quantized(fmt, 1024, 4096, g)
    x = torch.randn(256, 4096, generator=g).to(DEVICE, torch.bfloat16)
    dense = torch.nn.functional.linear(x.float(), dequantize_dense(w, torch.bfloat16).float())
    out = qgemm_prefill(x, w, natural=natural)
    assert out.dtype == torch.bfloat16
    err = (out.float() - dense).norm() / dense.norm()
    assert err < 4e-3, err  # the output's bf16 rounding only
    assert torch.equal(qgemm_prefill(x[:200], w, natural=natural),
                       qgemm_prefill(x, w, natural=natural)[:200])
