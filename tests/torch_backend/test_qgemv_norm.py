"""The one-row quantized GEMV with the residual add and RMSNorm in its prologue
(kernels/qgemv_words.py `qgemv_words_norm`): its output equals kernels/norm.py `add_rms_norm`
followed by the plain GEMV (and its GLU / RoPE modes), the residual sum bit for bit, for the word
formats, with and without a residual, in bf16 and fp16 (Triton's interpreter on the CPU; compiled
on a GPU)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")
from test_qgemv import random_quantized  # noqa: E402

from llm.backends.torch.kernels.norm import add_rms_norm  # noqa: E402
from llm.backends.torch.kernels.qgemv_config import QGemvWConfig  # noqa: E402
from llm.backends.torch.kernels.qgemv_words import (  # noqa: E402
    AddNorm,
    RopeTarget,
    qgemv_words,
    qgemv_words_norm,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(k: int, dtype: torch.dtype, g: torch.Generator):
    x = (3 * torch.randn(1, k, generator=g)).to(DEVICE, dtype)
    res = (5 * torch.randn(1, k, generator=g)).to(DEVICE, dtype)
    nw = (1 + 0.2 * torch.randn(k, generator=g)).to(DEVICE, dtype)
    return x, res, nw


@pytest.mark.parametrize("fmt, k", [("q8_0", 512), ("q4_0", 512), ("q4_1", 512), ("q6_k", 512),
                                    ("q4_k", 512), ("int4_g128", 512),
                                    ("q4_0", 416), ("q8_0", 4352)])
@pytest.mark.parametrize("glu", [False, True])
@pytest.mark.parametrize("with_residual", [True, False])
def test_norm_prologue_equals_add_rms_norm_then_gemv(fmt: str, k: int, glu: bool,
                                                     with_residual: bool) -> None:
    """K = 416: a partial last chunk (13 groups in chunks of 4); K = 4352: a statistic over
    two passes of at most 4096 values."""
    g = torch.Generator().manual_seed(len(fmt) + 2 * glu)
    n = 64  # Q6_K / Q4_K: K a multiple of 256
    w = random_quantized(fmt, n, k, g).to(DEVICE)
    x, res, nw = _inputs(k, torch.bfloat16, g)
    res = res if with_residual else None
    cfg = QGemvWConfig(8, 4, prefetch=True)  # 8 programs, chunks of 4 groups
    h, total_ref = add_rms_norm(x, res, nw, 1e-5)
    want = qgemv_words(h, w, None, cfg, glu=glu)
    got, total = qgemv_words_norm(x, AddNorm(res, nw, 1e-5), w, None, cfg, glu=glu)
    assert torch.equal(total, total_ref)
    if not with_residual:
        assert total is x
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)
    assert (got == want).float().mean() > 0.95  # the statistic's order only: nearly all equal


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_norm_prologue_with_rope_and_bias(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(7)
    nh, n_kv, hd, k = 4, 2, 32, 256
    n = (nh + 2 * n_kv) * hd
    w = random_quantized("q4_0", n, k, g).to(DEVICE)
    x, res, nw = _inputs(k, dtype, g)
    bias = (0.1 * torch.randn(n, generator=g)).to(DEVICE, dtype)
    angles = torch.rand(1, hd // 2, generator=g) * 6
    cos = torch.cat([angles.cos()] * 2, dim=1).to(DEVICE, dtype)
    sin = torch.cat([angles.sin()] * 2, dim=1).to(DEVICE, dtype)
    blocks, offsets = (torch.tensor([v], device=DEVICE) for v in (1, 3))
    pools = [torch.randn(3, n_kv, 16, hd, generator=g).to(DEVICE, dtype) for _ in range(2)]
    ref_pools = [p.clone() for p in pools]
    before = [p.clone() for p in pools]
    cfg = QGemvWConfig(8, 4)
    h, total_ref = add_rms_norm(x, res, nw, 1e-6)
    q_ref = qgemv_words(h, w, bias, cfg, rope=RopeTarget(cos, sin, blocks, offsets, *ref_pools,
                                                         nh))
    q, total = qgemv_words_norm(x, AddNorm(res, nw, 1e-6), w, bias, cfg,
                                rope=RopeTarget(cos, sin, blocks, offsets, *pools, nh))
    assert torch.equal(total, total_ref)
    torch.testing.assert_close(q, q_ref, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(pools[0], ref_pools[0], rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(pools[1], ref_pools[1], rtol=1e-2, atol=1e-2)
    assert not torch.equal(pools[1][1, :, 3], before[1][1, :, 3])  # V's slot was written


def test_norm_prologue_refuses_what_it_cannot_do() -> None:
    g = torch.Generator().manual_seed(0)
    w = random_quantized("q4_0", 32, 64, g).to(DEVICE)
    x, res, nw = _inputs(64, torch.bfloat16, g)
    with pytest.raises(ValueError, match="one row"):
        qgemv_words_norm(torch.cat([x, x]), AddNorm(None, nw, 1e-5), w)
    with pytest.raises(ValueError, match="norm weight"):
        qgemv_words_norm(x, AddNorm(res, nw.float(), 1e-5), w)
    with pytest.raises(ValueError, match="residual"):
        qgemv_words_norm(x, AddNorm(res[:, :32], nw, 1e-5), w)
    with pytest.raises(ValueError, match="64 columns"):
        qgemv_words_norm(x.float(), AddNorm(None, nw.float(), 1e-5), w)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available on this machine")
@pytest.mark.parametrize("name, mode, per_layer", [
    ("llama_gqa", "int4", 2), ("qwen2_bias", "int4", 2), ("granite_scaled", "int4", 2),
    ("qwen3_qk_norm", "int4", 1)])  # q/k head norms: the QKV GEMV keeps its separate norm
def test_quantized_decode_takes_it_with_the_logits_of_separate_norms(
        monkeypatch, name: str, mode: str, per_layer: int) -> None:
    """A quantized model's batch-1 decode on CUDA puts the norms of every layer into the
    GEMVs' prologue (where those GEMVs run), with the greedy tokens and (up to the statistic's
    summation order) the logits of the same model with separate norm kernels."""
    from test_qgemv_rope import quantized_decode_logits

    from llm.backends.torch.kernels import qgemv_words

    calls = []
    launch = qgemv_words.qgemv_words_norm

    def counting(*args, **kwargs):
        calls.append(1)
        return launch(*args, **kwargs)

    monkeypatch.setattr(qgemv_words, "qgemv_words_norm", counting)
    fused = quantized_decode_logits(name, mode, norm_prologue=True)
    from hf_reference import SMALL_CONFIGS

    assert len(calls) == per_layer * SMALL_CONFIGS[name].num_layers * 6  # every layer and step
    separate = quantized_decode_logits(name, mode, norm_prologue=False)
    assert len(calls) == per_layer * SMALL_CONFIGS[name].num_layers * 6
    assert torch.equal(fused.argmax(-1), separate.argmax(-1))
    torch.testing.assert_close(fused, separate, rtol=0, atol=0.05 * float(separate.abs().max()))
