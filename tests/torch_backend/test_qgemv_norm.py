"""The quantized one-row GEMV with the residual add and the next RMSNorm in its epilogue
(kernels/qgemv_words.py, `norm=`): the normalised row and the residual sum are bit-equal to the
plain GEMV followed by kernels/norm.py's `add_rms_norm`, for the word formats and 1..4 rows of
x, and the arrival counter is zero again after every launch (Triton's interpreter on the CPU);
a model's decode through `DecoderLayer.decode_chained` gives the logits of `decode` bit for bit
(CPU, bf16: every norm apart; CUDA: a quantized model's batch-1 decode with the norm in o_proj's and
down's launch in every layer)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")
from test_qgemv import random_quantized  # noqa: E402
from test_qgemv_rope import decode_logits  # noqa: E402

from llm.backends.torch.kernels.norm import add_rms_norm  # noqa: E402
from llm.backends.torch.kernels.qgemv_config import QGemvWConfig, norm_epilogue  # noqa: E402
from llm.backends.torch.kernels.qgemv_words import AddNorm, qgemv_words  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("fmt, m", [("q8_0", 1), ("q4_0", 1), ("q4_0", 3), ("q6_k", 2),
                                    ("int4_g128", 4), ("q5_k", 1)])
def test_norm_epilogue_equals_gemv_then_add_rms_norm(fmt: str, m: int) -> None:
    g = torch.Generator().manual_seed(m + len(fmt))
    n, k = 320, 512  # 40 programs of 8 rows; N no power of two (the norm's masked tail)
    w = random_quantized(fmt, n, k, g).to(DEVICE)
    x = torch.randn(m, k, generator=g).to(DEVICE, torch.bfloat16)
    bias = (0.1 * torch.randn(n, generator=g)).to(DEVICE, torch.bfloat16)
    res = torch.randn(m, n, generator=g).to(DEVICE, torch.bfloat16)
    weight = (1 + 0.1 * torch.randn(n, generator=g)).to(DEVICE, torch.bfloat16)
    arrivals = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    cfg = QGemvWConfig(8, 4)
    want = add_rms_norm(qgemv_words(x, w, bias, cfg), res, weight, 1e-5)
    for _ in range(2):  # the counter is left at zero for the next launch
        normed, total = qgemv_words(x, w, bias, cfg, norm=AddNorm(res, weight, 1e-5, arrivals))
        assert torch.equal(normed, want[0]) and torch.equal(total, want[1])
        assert int(arrivals) == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available on this machine")
@pytest.mark.parametrize("fmt", ["q4_0", "q4_k", "q6_k"])
@pytest.mark.parametrize("n, k", [(4096, 4096), (4096, 14336)])
def test_norm_epilogue_at_8b_widths_equals_the_norm_kernel(fmt: str, n: int, k: int) -> None:
    """Compiled, at the widths the engine's rule gives the epilogue (8B o_proj and down, their
    default configs): the same bits as the GEMV then the norm kernel (the statistic's sum in
    the norm kernel's order, at its 4 warps)."""
    from llm.backends.torch.kernels.qgemv import qgemv, qgemv_add_norm

    g = torch.Generator().manual_seed(n + k)
    w = random_quantized(fmt, n, k, g).to("cuda")
    x = torch.randn(1, k, generator=g).to("cuda", torch.bfloat16)
    res = torch.randn(1, n, generator=g).to("cuda", torch.bfloat16)
    weight = (1 + 0.1 * torch.randn(n, generator=g)).to("cuda", torch.bfloat16)
    arrivals = torch.zeros(1, dtype=torch.int32, device="cuda")
    want = add_rms_norm(qgemv(x, w), res, weight, 1e-5)
    got = qgemv_add_norm(x, w, None, AddNorm(res, weight, 1e-5, arrivals))
    assert got is not None  # the rule takes these shapes
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert int(arrivals) == 0


def test_norm_epilogue_refuses_what_it_cannot_do() -> None:
    g = torch.Generator().manual_seed(0)
    w = random_quantized("q4_0", 64, 64, g).to(DEVICE)
    x = torch.randn(5, 64, generator=g).to(DEVICE, torch.bfloat16)
    res = torch.zeros(5, 64, dtype=torch.bfloat16, device=DEVICE)
    weight = torch.ones(64, dtype=torch.bfloat16, device=DEVICE)
    arr = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="at most 4 rows"):
        qgemv_words(x, w, norm=AddNorm(res, weight, 1e-5, arr))
    with pytest.raises(ValueError, match="neither glu nor rope"):
        qgemv_words(x[:1], w, glu=True, norm=AddNorm(res[:1], weight, 1e-5, arr))
    with pytest.raises(ValueError, match="a residual like y"):
        qgemv_words(x[:2], w, norm=AddNorm(res[:1], weight, 1e-5, arr))
    with pytest.raises(ValueError, match="int32 counter"):
        qgemv_words(x[:1], w, norm=AddNorm(res[:1], weight, 1e-5, arr.long()))


def test_the_epilogue_is_taken_where_it_measured_faster() -> None:
    assert norm_epilogue(1, 4096, "q4_0") and norm_epilogue(1, 4096, "q6_k")
    assert norm_epilogue(1, 8192, "int4_g128")
    assert not norm_epilogue(1, 2048, "q4_0")  # 1B: slower
    assert not norm_epilogue(1, 4096, "q8_0") and not norm_epilogue(1, 4096, "int8")
    assert not norm_epilogue(2, 4096, "q4_0")  # not timed


@pytest.mark.parametrize("name, mode", [("llama_gqa", None), ("llama_gqa", "int8"),
                                        ("granite_scaled", None), ("qwen3_qk_norm", None)])
def test_chained_decode_equals_decode_on_the_cpu(name: str, mode: str | None) -> None:
    """Every norm apart on the CPU: the chained loop runs the same operations in the same order
    (Granite: its residual multiplier before each add; Qwen3: its q / k head norms)."""
    from hf_reference import SMALL_CONFIGS, hf_model, state_dict

    from llm.model.checkpoint.load import quantize_matrices

    config = SMALL_CONFIGS[name]
    tensors = state_dict(hf_model(config))
    if mode is not None:
        tensors = quantize_matrices(tensors, mode, False)
    chained = decode_logits(config, tensors, "cpu", steps=4)
    assert torch.equal(chained, decode_logits(config, tensors, "cpu", steps=4, chained=False))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available on this machine")
@pytest.mark.parametrize("name, mode", [("llama_gqa", "int4"), ("qwen2_bias", "int8"),
                                        ("llama_gqa", "int4_mix")])
def test_quantized_decode_takes_it_with_the_same_logits(monkeypatch, name: str,
                                                        mode: str) -> None:
    """Batch-1 decode of a quantized model on CUDA puts the norm into o_proj's and down's launch
    in every layer, with the logits of the unchained decode, bit for bit."""
    from hf_reference import SMALL_CONFIGS, hf_model, state_dict

    from llm.backends.torch.kernels import qgemv
    from llm.model.checkpoint.load import quantize_matrices

    config = SMALL_CONFIGS[name]
    tensors = quantize_matrices(state_dict(hf_model(config)), mode, False)
    calls, fused = [], qgemv.qgemv_add_norm

    def counting(*args, **kwargs):
        out = fused(*args, **kwargs)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(qgemv, "qgemv_add_norm", counting)
    monkeypatch.setattr(qgemv, "norm_epilogue", lambda m, n, fmt: True)  # the small model too
    chained = decode_logits(config, tensors, "cuda", steps=4)
    assert len(calls) == 4 * 2 * config.num_layers and all(calls)
    assert torch.equal(chained, decode_logits(config, tensors, "cuda", steps=4, chained=False))
