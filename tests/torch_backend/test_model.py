"""Whole-model PCC of the torch Transformer against transformers: prefill and paged decode."""

from __future__ import annotations

import pytest
import torch
from hf_reference import SMALL_CONFIGS, hf_model, pcc, state_dict

from llm.backends.torch.kv_cache import PagedKVCache
from llm.backends.torch.model import Transformer
from llm.model.config import RuntimeConfig

DTYPES = {"fp32": (torch.float32, 0.9999), "bf16": (torch.bfloat16, 0.99)}
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="CUDA is not available on this machine"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("name", list(SMALL_CONFIGS))
def test_model_prefill_and_decode(name: str, dt: str, device: str) -> None:
    dtype, thr = DTYPES[dt]
    config = SMALL_CONFIGS[name]
    model = hf_model(config, dtype=dtype)
    rt = RuntimeConfig(device=device, dtype={"fp32": "float32", "bf16": "bfloat16"}[dt],
                       max_batch=2, max_seq_len=128, block_size=16)
    ours = Transformer(config, state_dict(model), rt)
    cache = PagedKVCache(config, rt, device, ours.dtype)
    g = torch.Generator().manual_seed(0)
    lens, steps = [23, 9], 5
    seqs = [torch.randint(0, config.vocab_size, (n + steps,), generator=g).to(device) for n in lens]
    pages = torch.tensor([[3, 1, 7, 5, 0, 0, 0, 0], [2, 6, 4, 0, 0, 0, 0, 0]], device=device)
    with torch.no_grad():
        refs = [model(s[None].cpu()).logits[0].to(device) for s in seqs]  # [S, V], on the CPU
    for u, n in enumerate(lens):
        logits = ours.prefill(seqs[u][:n], 0, pages[u], cache, all_logits=True)  # [n, V]
        assert pcc(logits, refs[u][:n]) >= thr
        last = ours.prefill(seqs[u][:n], 0, pages[u], cache)  # [V], rewrites the same K/V
        assert pcc(last, refs[u][n - 1]) >= thr
    for t in range(steps):
        positions = torch.tensor([n + t for n in lens], device=device)
        tokens = torch.stack([seqs[u][positions[u]] for u in range(2)])
        logits = ours.decode(tokens, positions, pages, cache, int(positions.max()))  # [2, V]
        for u in range(2):
            assert pcc(logits[u], refs[u][positions[u]]) >= thr
            if dt == "fp32":
                assert int(logits[u].argmax()) == int(refs[u][positions[u]].argmax())
