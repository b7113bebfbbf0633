"""A fused projection of quantized parts in different formats (Q4_K_M / Q5_K_M files: attn_v in
Q6_K in half the layers, attn_q / attn_k in Q4_K) stays as stored (weight.py `RowBlocks`): one
block a run of one format, each by its own kernel; the one-row QKV GEMV's RoPE epilogue runs one
launch a block (`RopeTarget.row0`), bit-equal to the block GEMVs then `rope_and_cache` (Triton's
interpreter on the CPU, or the GPU); a model with such layers gives the logits of the same
weights dequantized, and on a GPU takes the epilogue in every layer with the unfused logits."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")
from test_qgemv import random_quantized  # noqa: E402
from test_qgemv_rope import count_fused_qkv  # noqa: E402

from llm.backends.torch.kernels.qgemv_config import QGemvWConfig  # noqa: E402
from llm.backends.torch.kernels.qgemv_words import RopeTarget, qgemv_words  # noqa: E402
from llm.backends.torch.kernels.rope_kv import rope_and_cache  # noqa: E402
from llm.backends.torch.weight import QuantLinear, RowBlocks, linear, stack_rows  # noqa: E402
from llm.model.quant.quantize import quantize_int4  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _parts(formats: list[str], rows: list[int], k: int, g: torch.Generator) -> list[QuantLinear]:
    return [QuantLinear(random_quantized(f, n, k, g), torch.bfloat16)
            for f, n in zip(formats, rows, strict=True)]


def test_stack_rows_keeps_mixed_formats_as_stored() -> None:
    """q, k in Q4_K and v in Q6_K: two blocks (q and k fused), the stored bytes, and x @ W^T (+
    the bias) of the whole as the dequantized matrix gives."""
    g = torch.Generator().manual_seed(1)
    parts = _parts(["q4_k", "q4_k", "q6_k"], [128, 64, 64], 256, g)
    w = stack_rows(parts)
    assert isinstance(w, RowBlocks) and [b.weight.format for b in w.blocks] == ["q4_k", "q6_k"]
    assert w.shape == (256, 256) and w.starts == [0, 192, 256]
    assert w.nbytes == sum(p.weight.nbytes for p in parts)
    dense = torch.cat([p.weight.dequantize(torch.float32) for p in parts]).to(DEVICE)
    x = torch.randn(3, 256, generator=g).to(DEVICE, torch.bfloat16)
    bias = (0.1 * torch.randn(256, generator=g)).to(DEVICE, torch.bfloat16)
    for b in w.blocks:
        b.weight = b.weight.to(DEVICE)
    for bb in (None, bias):
        got = linear(x, w, bb).double()
        want = x.double() @ dense.double().T + (0 if bb is None else bb.double())
        assert got.shape == (3, 256)
        assert float((got - want).abs().max() / want.abs().max()) < 1e-2  # bf16 output


def test_stack_rows_one_format_is_one_linear_and_dense_mixes_are_dense() -> None:
    g = torch.Generator().manual_seed(2)
    same = stack_rows(_parts(["q8_0", "q8_0", "q8_0"], [64, 32, 32], 64, g))
    assert isinstance(same, QuantLinear) and same.shape == (128, 64)
    mixed = stack_rows([*_parts(["q8_0"], [64], 64, g), torch.randn(32, 64).to(DEVICE).bfloat16()])
    assert isinstance(mixed, torch.Tensor) and mixed.shape == (96, 64)
    with pytest.raises(ValueError, match="two or more"):
        RowBlocks(_parts(["q8_0"], [64], 64, g))


@pytest.mark.parametrize("formats, heads", [
    (("q4_k", "q6_k"), (6, 2)),  # q + k, then v
    (("q8_0", "q4_0"), (6, 2)),
    (("q4_0", "q8_0", "q6_k"), (4, 2, 2)),  # q, k, v in three formats
    (("q4_0", "q8_0"), (3, 5)),  # a block boundary inside the query heads
])
def test_rope_epilogue_one_launch_a_block(formats: tuple[str, ...], heads: tuple[int, ...]
                                          ) -> None:
    """A QKV of `heads` heads per block, each block in its format: q (pre-filled with NaN), the
    K / V slot and every other cache slot as the block GEMVs side by side, then
    `rope_and_cache`, bit for bit."""
    g = torch.Generator().manual_seed(3)
    nh, n_kv, hd, k, dtype = 4, 2, 32, 256, torch.bfloat16
    ws = [random_quantized(f, h * hd, k, g).to(DEVICE) for f, h in zip(formats, heads,
                                                                       strict=True)]
    starts = [0]
    for w in ws:
        starts.append(starts[-1] + w.out_features)
    x = torch.randn(1, k, generator=g).to(DEVICE, dtype)
    bias = (0.1 * torch.randn((nh + 2 * n_kv) * hd, generator=g)).to(DEVICE, dtype)
    angles = torch.rand(1, hd // 2, generator=g) * 6
    cos = torch.cat([angles.cos()] * 2, dim=1).to(DEVICE, dtype)
    sin = torch.cat([angles.sin()] * 2, dim=1).to(DEVICE, dtype)
    blocks, offsets = (torch.tensor([i], device=DEVICE) for i in (2, 7))
    pools = [torch.randn(4, n_kv, 16, hd, generator=g).to(DEVICE, dtype) for _ in range(2)]
    k_ref, v_ref = (p.clone() for p in pools)
    cfg, spans = QGemvWConfig(8, 4), list(zip(starts[:-1], starts[1:], strict=True))
    whole = torch.cat([qgemv_words(x, w, bias[lo:hi], cfg)
                       for w, (lo, hi) in zip(ws, spans, strict=True)], dim=1)  # [1, q + 2kv]
    q_ref = rope_and_cache(whole, cos, sin, blocks, offsets, k_ref, v_ref, nh)  # [1, nh, hd]
    q = torch.full((1, nh * hd), float("nan"), dtype=dtype, device=DEVICE)
    for w, (lo, hi) in zip(ws, spans, strict=True):
        out = qgemv_words(x, w, bias[lo:hi], cfg,
                          rope=RopeTarget(cos, sin, blocks, offsets, *pools, nh, lo, q))
        assert out is q
    assert torch.equal(q.reshape(-1), q_ref.reshape(-1))
    assert torch.equal(pools[0], k_ref) and torch.equal(pools[1], v_ref)


def test_rope_epilogue_refuses_blocks_it_cannot_place() -> None:
    g = torch.Generator().manual_seed(4)
    w = random_quantized("q4_0", 2 * 32, 64, g).to(DEVICE)
    x = torch.randn(1, 64, generator=g).to(DEVICE, torch.bfloat16)
    pool = torch.zeros(2, 2, 16, 32, device=DEVICE, dtype=torch.bfloat16)
    idx = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    cs = torch.ones(1, 32, device=DEVICE, dtype=torch.bfloat16)

    def target(row0: int, q: torch.Tensor | None = None) -> RopeTarget:
        return RopeTarget(cs, cs, idx, idx, pool, pool.clone(), 4, row0, q)

    for row0 in (16, 7 * 32, -32):  # inside a head; past the QKV's 8 heads; negative
        with pytest.raises(ValueError, match="block of whole heads"):
            qgemv_words(x, w, rope=target(row0))
    bad_q = torch.empty(1, 64, device=DEVICE, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"contiguous \[1, 128\]"):
        qgemv_words(x, w, rope=target(0, bad_q))


def _mixed_model_tensors(config) -> dict:
    """int4 weights at load, v_proj and up_proj in groups of 32 where the others take 64: a
    mixed QKV and a mixed gate/up."""
    from hf_reference import hf_model, state_dict

    from llm.model.checkpoint.load import quantize_matrices

    sd = state_dict(hf_model(config))
    tensors = quantize_matrices(sd, "int4", False)
    for name, t in sd.items():
        if name.endswith(("v_proj.weight", "up_proj.weight")):
            tensors[name] = quantize_int4(t, 32)
    assert tensors["model.layers.0.self_attn.q_proj.weight"].format != \
        tensors["model.layers.0.self_attn.v_proj.weight"].format
    return tensors


def _prompt_and_decode(model, config, rt, device: str) -> torch.Tensor:
    """The prompt's logits [8, V], then 4 greedy decode steps' [4, V]."""
    from llm.backends.torch.kv_cache import PagedKVCache

    cache = PagedKVCache(config, rt, device, model.dtype)
    page_row = torch.tensor([3, 1, 0, 0], device=device)
    prompt = torch.tensor([5, 9, 17, 33, 65, 100, 7, 3], device=device)
    out = [model.prefill(prompt, 0, page_row, cache, all_logits=True)]
    token = out[0][-1].argmax()
    for t in range(4):
        pos = torch.tensor([8 + t], device=device)
        logits = model.decode(token[None], pos, page_row[None], cache, 8 + t)  # [1, V]
        out.append(logits)
        token = logits[0].argmax()
    return torch.cat(out)


@pytest.mark.parametrize("name", ["llama_gqa", "qwen2_bias"])
def test_a_model_with_a_mixed_qkv_gives_the_dequantized_models_logits(name: str) -> None:
    """On the CPU, float32: the layers hold `RowBlocks`, and the logits of a prompt and of 4
    decode steps equal those of the same weights dequantized, within accumulation order."""
    from hf_reference import SMALL_CONFIGS

    from llm.backends.torch.model import Transformer
    from llm.model.config import RuntimeConfig
    from llm.model.quant.tensor import QuantizedTensor

    config = SMALL_CONFIGS[name]
    tensors = _mixed_model_tensors(config)
    dense = {n: t.dequantize(torch.float32) if isinstance(t, QuantizedTensor) else t
             for n, t in tensors.items()}
    rt = RuntimeConfig(device="cpu", dtype="float32", max_batch=1, max_seq_len=64,
                       block_size=16)
    mixed = Transformer(config, tensors, rt)
    assert all(isinstance(layer.attn.wqkv, RowBlocks) and isinstance(layer.mlp.gate_up, RowBlocks)
               for layer in mixed.layers)
    got = _prompt_and_decode(mixed, config, rt, "cpu")
    want = _prompt_and_decode(Transformer(config, dense, rt), config, rt, "cpu")
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available on this machine")
def test_a_mixed_qkv_decodes_through_the_rope_epilogue_with_the_unfused_logits(
        monkeypatch) -> None:
    """bf16 on a GPU: batch-1 decode runs the RoPE epilogue (two launches) in every layer, and
    the logits equal those with it switched off, bit for bit."""
    from hf_reference import SMALL_CONFIGS

    from llm.backends.torch import attention
    from llm.backends.torch.model import Transformer
    from llm.model.config import RuntimeConfig
    from llm.model.quant.tensor import QuantizedTensor

    config = SMALL_CONFIGS["qwen2_bias"]
    tensors = _mixed_model_tensors(config)
    rt = RuntimeConfig(device="cuda", dtype="bfloat16", max_batch=1, max_seq_len=64,
                       block_size=16)
    model = Transformer(config, tensors, rt)
    assert model.weight_bytes == sum(  # the blocks as stored, not a bf16 QKV
        t.nbytes if isinstance(t, QuantizedTensor) else t.numel() * 2 for t in tensors.values())
    calls = count_fused_qkv(monkeypatch)
    with_fusion = _prompt_and_decode(model, config, rt, "cuda")
    assert len(calls) == 4 * config.num_layers and all(calls)
    monkeypatch.setattr(attention.Attention, "_qkv_rope", lambda self, *args: None)
    assert torch.equal(with_fusion, _prompt_and_decode(model, config, rt, "cuda"))
