"""The one-row quantized GEMV with RoPE and the K/V write in its epilogue (kernels/qgemv_words.py,
`rope=`): q, the written K and V and every other cache slot are bit-equal to the plain GEMV
followed by kernels/rope_kv.py's `rope_and_cache`, for the word formats, with a QKV bias, GQA
heads and a page slot in the middle of the pool (Triton's interpreter on the CPU); compiled, q and
K also equal transformers' rotation in the dtype; on a GPU a quantized model's batch-1 decode
takes it in every layer with the logits of the unfused path (the last test)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")
from test_qgemv import random_quantized  # noqa: E402

from llm.backends.torch.kernels.qgemv_config import QGemvWConfig  # noqa: E402
from llm.backends.torch.kernels.qgemv_words import RopeTarget, qgemv_words  # noqa: E402
from llm.backends.torch.kernels.rope_kv import rope_and_cache  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q4_1", "q6_k", "int8", "int4_g128"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rope_epilogue_equals_gemv_then_rope_and_cache(fmt: str, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(len(fmt))
    nh, n_kv, hd, k = 4, 2, 32, 256
    n = (nh + 2 * n_kv) * hd
    w = random_quantized(fmt, n, k, g).to(DEVICE)
    x = torch.randn(1, k, generator=g).to(DEVICE, dtype)
    bias = (0.1 * torch.randn(n, generator=g)).to(DEVICE, dtype)
    angles = torch.rand(1, hd // 2, generator=g) * 6
    cos = torch.cat([angles.cos()] * 2, dim=1).to(DEVICE, dtype)  # [1, hd] as the tables
    sin = torch.cat([angles.sin()] * 2, dim=1).to(DEVICE, dtype)
    blocks, offsets = (torch.tensor([v], device=DEVICE) for v in (3, 5))
    pools = [torch.randn(6, n_kv, 16, hd, generator=g).to(DEVICE, dtype) for _ in range(2)]
    k_ref, v_ref = (p.clone() for p in pools)
    cfg = QGemvWConfig(8, 4)  # 16 programs: pairs of several heads and of q, k and v
    q_ref = rope_and_cache(qgemv_words(x, w, bias, cfg), cos, sin, blocks, offsets, k_ref,
                           v_ref, nh)  # [1, nh, hd]
    q = qgemv_words(x, w, bias, cfg, rope=RopeTarget(cos, sin, blocks, offsets, *pools, nh))
    assert q.shape == (1, nh * hd)
    assert torch.equal(q.reshape(-1), q_ref.reshape(-1))
    assert torch.equal(pools[0], k_ref) and torch.equal(pools[1], v_ref)
    assert not torch.equal(k_ref[3, :, 5], k_ref[3, :, 4])  # the slot was written
    if DEVICE == "cpu":  # Triton's interpreter rounds float32 to bf16 its own way
        return
    # compiled: as transformers rotates in this dtype, each product rounded, then the sum
    heads = qgemv_words(x, w, bias, cfg)[0, : (nh + n_kv) * hd].view(nh + n_kv, hd)
    x1, x2 = heads[:, : hd // 2], heads[:, hd // 2:]
    c, sn = cos[0, : hd // 2], sin[0, : hd // 2]
    want = torch.cat([x1 * c + (-x2) * sn, x2 * c + x1 * sn], dim=1)  # [nh + n_kv, hd]
    assert torch.equal(q.view(nh, hd), want[:nh])
    assert torch.equal(pools[0][3, :, 5], want[nh:])


def test_rope_epilogue_refuses_what_it_cannot_do() -> None:
    g = torch.Generator().manual_seed(0)
    w = random_quantized("q4_0", 8 * 32, 64, g).to(DEVICE)
    x = torch.randn(2, 64, generator=g).to(DEVICE, torch.bfloat16)
    pool = torch.zeros(2, 2, 16, 32, device=DEVICE, dtype=torch.bfloat16)
    idx = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    cs = torch.ones(1, 32, device=DEVICE, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="one token"):
        qgemv_words(x, w, rope=RopeTarget(cs, cs, idx, idx, pool, pool.clone(), 4))
    with pytest.raises(ValueError, match=r"\(nh \+ 2 n_kv\) \* hd"):
        qgemv_words(x[:1], w, rope=RopeTarget(cs, cs, idx, idx, pool, pool.clone(), 3))


def count_fused_qkv(monkeypatch) -> list[bool]:
    """Patch `Attention._qkv_rope` to record, per call, whether the fused QKV GEMV ran."""
    from llm.backends.torch import attention

    calls, fused = [], attention.Attention._qkv_rope

    def counting(self, *args):
        q = fused(self, *args)
        calls.append(q is not None)
        return q

    monkeypatch.setattr(attention.Attention, "_qkv_rope", counting)
    return calls


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available on this machine")
@pytest.mark.parametrize("name, mode", [("llama_gqa", "int4"), ("qwen2_bias", "int4"),
                                        ("llama_gqa", "int4_mix")])
def test_quantized_decode_takes_it_with_the_same_logits(monkeypatch, name: str,
                                                        mode: str) -> None:
    """A quantized model's batch-1 decode on CUDA runs the fused QKV GEMV in every layer, and its
    logits over 6 steps equal those of the same model with the fusion switched off, bit for bit."""
    from hf_reference import SMALL_CONFIGS, hf_model, state_dict

    from llm.backends.torch import attention
    from llm.model.checkpoint.load import quantize_matrices

    config = SMALL_CONFIGS[name]
    tensors = quantize_matrices(state_dict(hf_model(config)), mode, False)
    calls = count_fused_qkv(monkeypatch)
    with_fusion = decode_logits(config, tensors, "cuda")
    assert calls and all(calls)  # every layer of every step
    monkeypatch.setattr(attention.Attention, "_qkv_rope", lambda self, *args: None)
    assert torch.equal(with_fusion, decode_logits(config, tensors, "cuda"))


def decode_logits(config, tensors: dict, device: str, steps: int = 6,
                  chained: bool = True) -> torch.Tensor:
    """Greedy decode logits [steps, V] of one user after a 7-token prompt (bf16, no CUDA
    graphs), the model's `chained_norms` set as given."""
    from llm.backends.torch.runner import TorchBackend
    from llm.engine.contract.backend import PrefillInput, SequenceSampling
    from llm.engine.contract.sampling_params import SamplingParams
    from llm.engine.paged_kv import PageTable, PageTableSpec
    from llm.model.checkpoint.common import Checkpoint
    from llm.model.config import RuntimeConfig

    rt = RuntimeConfig(device=device, dtype="bfloat16", max_batch=2, max_seq_len=64,
                       block_size=16)
    backend = TorchBackend(Checkpoint(config, tensors, source=None), rt, cuda_graphs=False)
    backend.model.chained_norms = chained
    pages = PageTable(PageTableSpec(rt.total_blocks, rt.block_size, rt.blocks_per_seq), 2)
    prompt = [5, 9, 17, 33, 65, 100, 7]
    pages.reserve(0, 20)
    token = backend.prefill(PrefillInput(0, prompt, 0, pages.row(0),
                                         SequenceSampling(SamplingParams(), 0)))
    out = []
    for i in range(steps):
        pos = len(prompt) + i
        logits = backend.model.decode(
            torch.tensor([token], device=device), torch.tensor([pos], device=device),
            torch.tensor(pages.table([0]), device=device), backend.cache, pos)  # [1, V]
        out.append(logits)
        token = int(logits.argmax())
    backend.close()
    return torch.cat(out)
