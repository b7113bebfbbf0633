"""Small-batch GEMV kernels (kernels/gemv.py) against independent torch references.

fp32 runs everywhere (Triton's interpreter on the CPU); bf16 only on a GPU, at small shapes and
at Llama-3.2-1B decode shapes.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")
from llm.backends.torch.kernels.gemv import (  # noqa: E402
    MAX_M,
    GemvConfig,
    gate_up_silu_gemv,
    gemv,
    gemv_config,
    norm_gate_up_silu_gemv,
    norm_gemv,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-5
BF16 = pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    DEVICE == "cpu", reason="Triton's CPU interpreter computes bf16 dots wrongly (numpy has no "
    "bfloat16); bf16 runs on the GPU"))
# small shapes: N, K not multiples of the block sizes; an explicit config with several K chunks;
# K = 1100 takes the statistics pass through several chunks at M = 8
SHAPES = [(100, 300, None), (48, 96, None), (40, 200, GemvConfig(16, 64, 4, 2)), (24, 1100, None)]


def _rand(*shape, g, dtype, scale=1.0):
    return (scale * torch.randn(*shape, generator=g)).to(DEVICE, dtype)


def _linear_ref(h: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear in float64, rounded once to h's dtype (what a fp32-accumulating GEMM returns)."""
    y = h.double() @ w.double().T
    if bias is not None:
        y = y + bias.double()
    return y.to(h.dtype)


def _norm_ref(x, residual, weight):
    """(rms_norm(x + residual) * weight, x + residual), rounded as transformers' Llama rounds."""
    total = x if residual is None else (x.float() + residual.float()).to(x.dtype)
    xf = total.double()
    xn = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype)
    return (xn.float() * weight.float()).to(x.dtype), total


def _silu_mul_ref(gu: torch.Tensor) -> torch.Tensor:
    gate, up = gu.chunk(2, dim=-1)
    g = gate.double()
    return ((g / (1 + torch.exp(-g))).to(gu.dtype).double() * up.double()).to(gu.dtype)


def _assert_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert torch.isfinite(out).all()
    if out.dtype == torch.float32:
        assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5), (out - ref).abs().max()
    else:  # bf16: accumulation order moves a few outputs by one rounding step
        err = (out.double() - ref.double()).norm() / ref.double().norm()
        assert err < 1e-2, err


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
@pytest.mark.parametrize("n, k, config", SHAPES)
@pytest.mark.parametrize("m", [1, 3, 8, 16])  # 1: the compact input; else 16 masked rows
def test_gemv(m, n, k, config, dtype) -> None:
    g = torch.Generator().manual_seed(m * 1000 + n)
    x, w = _rand(m, k, g=g, dtype=dtype), _rand(n, k, g=g, dtype=dtype, scale=k ** -0.5)
    bias = _rand(n, g=g, dtype=dtype) if m != 3 else None
    _assert_close(gemv(x, w, bias, config=config), _linear_ref(x, w, bias))


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
@pytest.mark.parametrize("n, k, config", SHAPES)
@pytest.mark.parametrize("m, with_residual", [(1, True), (3, False), (8, True), (16, False)])
def test_norm_gemv(m, with_residual, n, k, config, dtype) -> None:
    g = torch.Generator().manual_seed(m * 1000 + n + 1)
    x = _rand(m, k, g=g, dtype=dtype, scale=3.0)
    res = _rand(m, k, g=g, dtype=dtype) if with_residual else None
    nw = (1 + 0.1 * torch.randn(k, generator=g)).to(DEVICE, dtype)
    w = _rand(n, k, g=g, dtype=dtype, scale=k ** -0.5)
    bias = _rand(n, g=g, dtype=dtype) if with_residual else None
    y, total = norm_gemv(x, res, nw, EPS, w, bias, config=config)
    h, ref_total = _norm_ref(x, res, nw)
    assert torch.equal(total, ref_total)
    if res is None:
        assert total is x  # no residual: the stream is x itself, nothing copied
    _assert_close(y, _linear_ref(h, w, bias))


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
@pytest.mark.parametrize("inter, k, config", SHAPES)
@pytest.mark.parametrize("m, norm", [(1, False), (3, True), (8, False), (8, True)])
def test_gate_up_silu_gemv(m, norm, inter, k, config, dtype) -> None:
    g = torch.Generator().manual_seed(m * 1000 + inter + 2)
    x, res = _rand(m, k, g=g, dtype=dtype), _rand(m, k, g=g, dtype=dtype)
    nw = (1 + 0.1 * torch.randn(k, generator=g)).to(DEVICE, dtype)
    w = _rand(2 * inter, k, g=g, dtype=dtype, scale=3 * k ** -0.5)  # gates over silu's bend
    bias = _rand(2 * inter, g=g, dtype=dtype) if m != 8 else None
    if norm:
        y, total = norm_gate_up_silu_gemv(x, res, nw, EPS, w, bias, config=config)
        h, ref_total = _norm_ref(x, res, nw)
        assert torch.equal(total, ref_total)
    else:
        y, h = gate_up_silu_gemv(x, w, bias, config=config), x
    _assert_close(y, _silu_mul_ref(_linear_ref(h, w, bias)))


FMA_CONFIGS = [GemvConfig(4, 64, 4, 1, fma=True), GemvConfig(8, 128, 4, 3, fma=True),
               GemvConfig(2, 256, 2, 2, fma=True)]


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
@pytest.mark.parametrize("n, k", [(100, 300), (24, 1100), (48, 96)])
@pytest.mark.parametrize("config", FMA_CONFIGS, ids=lambda c: f"n{c.block_n}k{c.block_k}")
def test_fma_kernels_at_batch_1(n, k, config, dtype) -> None:
    """The CUDA-core path (one row of x, block_n below the dot's 16) for all four kernels."""
    g = torch.Generator().manual_seed(n + k + config.block_n)
    x, res = _rand(1, k, g=g, dtype=dtype, scale=3.0), _rand(1, k, g=g, dtype=dtype)
    nw = (1 + 0.1 * torch.randn(k, generator=g)).to(DEVICE, dtype)
    w = _rand(n, k, g=g, dtype=dtype, scale=k ** -0.5)
    wgu = _rand(2 * n, k, g=g, dtype=dtype, scale=3 * k ** -0.5)
    bias, bgu = _rand(n, g=g, dtype=dtype), _rand(2 * n, g=g, dtype=dtype)
    h, ref_total = _norm_ref(x, res, nw)
    _assert_close(gemv(x, w, bias, config=config), _linear_ref(x, w, bias))
    y, total = norm_gemv(x, res, nw, EPS, w, bias, config=config)
    assert torch.equal(total, ref_total)
    _assert_close(y, _linear_ref(h, w, bias))
    _assert_close(gate_up_silu_gemv(x, wgu, bgu, config=config),
                  _silu_mul_ref(_linear_ref(x, wgu, bgu)))
    y, total = norm_gate_up_silu_gemv(x, res, nw, EPS, wgu, None, config=config)
    assert torch.equal(total, ref_total)
    _assert_close(y, _silu_mul_ref(_linear_ref(h, wgu, None)))


def test_gate_up_silu_matches_the_unfused_kernels() -> None:
    """Same semantics as the MLP's current path: F.linear then kernels/silu_mul.py."""
    from llm.backends.torch.kernels.silu_mul import silu_mul

    g = torch.Generator().manual_seed(5)
    x, w = _rand(2, 64, g=g, dtype=torch.float32), _rand(2 * 80, 64, g=g, dtype=torch.float32)
    ref = silu_mul(torch.nn.functional.linear(x, w))
    assert torch.allclose(gate_up_silu_gemv(x, w), ref, rtol=1e-5, atol=1e-5)


def test_config_heuristic_fills_an_h100() -> None:
    n_sm = 132
    shapes = [(2048, 2048), (3072, 2048), (8192, 2048), (2048, 8192), (576, 576), (960, 576),
              (4096, 4096), (6144, 4096), (14336, 4096), (4096, 14336), (28672, 4096)]
    for n, k in shapes:
        for m in (1, 4, 16):
            for glu in (False, True):
                for norm in (False, True):
                    cfg = gemv_config(m, n, k, glu, 2, n_sm, norm)
                    programs = -(-n // cfg.block_n)
                    if m == 1:  # the CUDA-core path: short rows, long K chunks, every SM busy
                        assert cfg.fma and cfg.block_n in (2, 4, 16), (n, k, cfg)
                        assert 16 <= cfg.block_k <= 1024 and programs >= n_sm, (n, k, cfg)
                        # the fp32 accumulators stay within 64 registers a thread
                        acc = cfg.block_n * (2 if glu else 1) * cfg.block_k
                        assert acc <= 64 * 32 * cfg.num_warps, (n, k, glu, cfg)
                        continue
                    assert not cfg.fma and cfg.block_n in (16, 32), (n, k, cfg)
                    assert 16 <= cfg.block_k <= 256, (n, k, cfg)
                    assert programs >= min(0.7 * n_sm, n / 16), (n, k, cfg)  # SMs busy
                    # shared memory per program (w tiles + x chunk, num_stages - 1 buffers)
                    # leaves room for at least two resident programs per SM (228 KB)
                    stage = ((2 if glu else 1) * cfg.block_n + 16) * cfg.block_k * 2
                    assert (cfg.num_stages - 1) * stage <= 114 * 1024, (n, k, glu, cfg)
    assert gemv_config(4, 100, 40, elem_bytes=4).block_k == 64  # no chunk past a small K
    assert gemv_config(1, 100, 40, elem_bytes=4).block_k == 64


def test_rejects_what_it_cannot_compute() -> None:
    w = torch.zeros(32, 64, device=DEVICE)
    with pytest.raises(ValueError, match="at most"):
        gemv(torch.zeros(MAX_M + 1, 64, device=DEVICE), w)
    with pytest.raises(ValueError, match="x \\[M, K\\]"):
        gemv(torch.zeros(2, 65, device=DEVICE), w)
    with pytest.raises(ValueError, match="dtype|float"):
        gemv(torch.zeros(2, 64, device=DEVICE, dtype=torch.float64), w)
    with pytest.raises(ValueError, match="odd"):
        gate_up_silu_gemv(torch.zeros(2, 64, device=DEVICE), w[:31])
    with pytest.raises(ValueError, match="one row"):
        gemv(torch.zeros(2, 64, device=DEVICE), w, config=GemvConfig(4, 64, 4, 1, fma=True))


@pytest.mark.skipif(DEVICE == "cpu", reason="full 1B shapes in bf16 need the GPU")
@pytest.mark.parametrize("m", [1, 4, 16])
def test_llama_1b_shapes_bf16(m) -> None:
    from llm.backends.torch.kernels.norm import add_rms_norm
    from llm.backends.torch.kernels.silu_mul import silu_mul

    g = torch.Generator().manual_seed(m)
    dt, hdim, inter = torch.bfloat16, 2048, 8192
    x, res = _rand(m, hdim, g=g, dtype=dt), _rand(m, hdim, g=g, dtype=dt)
    nw = (1 + 0.1 * torch.randn(hdim, generator=g)).to(DEVICE, dt)
    wqkv = _rand(3072, hdim, g=g, dtype=dt, scale=hdim ** -0.5)
    wgu = _rand(2 * inter, hdim, g=g, dtype=dt, scale=hdim ** -0.5)
    wdown = _rand(hdim, inter, g=g, dtype=dt, scale=inter ** -0.5)
    h, total = add_rms_norm(x, res, nw, EPS)
    y, t2 = norm_gemv(x, res, nw, EPS, wqkv)
    assert torch.equal(t2, total)
    _assert_close(y, torch.nn.functional.linear(h, wqkv))
    y, _ = norm_gate_up_silu_gemv(x, res, nw, EPS, wgu)
    act = silu_mul(torch.nn.functional.linear(h, wgu))
    _assert_close(y, act)
    _assert_close(gate_up_silu_gemv(h, wgu), act)
    _assert_close(gemv(act, wdown), torch.nn.functional.linear(act, wdown))
    _assert_close(gemv(h, wqkv[:hdim]), torch.nn.functional.linear(h, wqkv[:hdim]))  # a view


def test_lm_head_through_the_gemv(monkeypatch) -> None:
    """LMHead(gemv=True): the whole (or a rank's slice of the) vocabulary in one GEMV launch,
    equal to the chunked matmul; a weight past the kernel's 32-bit offsets takes the chunks."""
    from llm.backends.torch.kernels import gemv as gemv_module
    from llm.backends.torch.lm_head import LMHead

    g = torch.Generator().manual_seed(11)
    full = _rand(700, 96, g=g, dtype=torch.float32, scale=96 ** -0.5)
    x = _rand(1, 96, g=g, dtype=torch.float32)
    for w in (full, full[300:]):  # a tensor-parallel rank's rows are a view of the whole
        head = LMHead(w, chunk_size=128)
        _assert_close(head(x, gemv=True), _linear_ref(x, w, None))
        assert torch.allclose(head(x, gemv=True), head(x), rtol=1e-5, atol=1e-5)
    head = LMHead(full, chunk_size=128)
    monkeypatch.setattr(gemv_module, "MAX_W_SPAN", full.numel())  # now "too large"
    assert torch.equal(head(x, gemv=True), head(x))


def test_transformer_uses_the_gemvs_only_with_the_decode_kernels() -> None:
    """Batch 1 takes the GEMVs by default where the Triton decode kernels run, never without."""
    from hf_reference import SMALL_CONFIGS, hf_model, state_dict

    from llm.backends.torch.model import GEMV_MAX_BATCH, Transformer
    from llm.model.config import RuntimeConfig

    config = SMALL_CONFIGS["qwen2_bias"]
    weights = state_dict(hf_model(config))
    runtime = RuntimeConfig(device=DEVICE, max_batch=2, max_seq_len=32, block_size=16)
    assert GEMV_MAX_BATCH == 1
    assert Transformer(config, weights, runtime, decode_kernel=True).gemv_max_batch == 1
    assert Transformer(config, weights, runtime, decode_kernel=False).gemv_max_batch == 0
    with pytest.raises(ValueError, match="needs the Triton decode kernels"):
        Transformer(config, weights, runtime, decode_kernel=False, gemv_max_batch=1)
