"""The torch Backend through its interface, on CPU and (where present) CUDA.

Greedy tokens equal transformers' greedy tokens (full forward per step) for users of different
lengths decoded together; seeded sampling agrees across devices.
"""

from __future__ import annotations

import pytest
import torch
from hf_reference import SMALL_CONFIGS, hf_model, state_dict

from llm.backends.base import SequenceSampling
from llm.backends.drive import decode_together
from llm.backends.torch.runner import TorchBackend
from llm.checkpoint import Checkpoint
from llm.config import RuntimeConfig
from llm.sampling import SamplingParams

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="CUDA is not available on this machine"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["llama_gqa", "qwen2_bias"])
def test_greedy_tokens_equal_transformers(name: str, device: str) -> None:
    config = SMALL_CONFIGS[name]
    model = hf_model(config)
    backend = TorchBackend(Checkpoint(config, state_dict(model), source=None),
                           RuntimeConfig(device=device, max_batch=3, max_seq_len=96,
                                         block_size=8))
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, config.vocab_size, (n,), generator=g).tolist() for n in (7, 30, 12)]
    greedy = [SequenceSampling(SamplingParams(), 0)] * 3
    ours = decode_together(backend, prompts, 20, greedy)
    for p, o in zip(prompts, ours):
        seq = list(p)
        with torch.no_grad():  # reference: full forward over the whole sequence, no cache
            for _ in range(20):
                seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
        assert o == seq[len(p):]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available on this machine")
def test_seeded_sampling_agrees_between_cpu_and_cuda() -> None:
    config = SMALL_CONFIGS["llama_gqa"]
    w = state_dict(hf_model(config))
    sampling = [SequenceSampling(SamplingParams(temperature=0.8, top_p=0.9, seed=s), s)
                for s in (1, 2)]
    prompts = [[5, 6, 7, 8], [9, 10]]
    outs = [decode_together(TorchBackend(Checkpoint(config, w, source=None),
                                   RuntimeConfig(device=d, max_batch=2, max_seq_len=64,
                                                 block_size=8)), prompts, 16, sampling)
            for d in ("cpu", "cuda")]
    assert outs[0] == outs[1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available on this machine")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_graph_decode_equals_eager(dtype: str) -> None:
    """Greedy and seeded-sampled users mixed in one batch (3 users: bucket 4, one padding row)."""
    config = SMALL_CONFIGS["llama_gqa"]
    w = state_dict(hf_model(config))
    rt = RuntimeConfig(device="cuda", dtype=dtype, max_batch=5, max_seq_len=96, block_size=16)
    sampling = [SequenceSampling(SamplingParams(), 0),
                SequenceSampling(SamplingParams(temperature=0.7, top_k=20, seed=4), 4),
                SequenceSampling(SamplingParams(temperature=1.0, top_p=0.8, seed=5), 5)]
    prompts = [[5, 6, 7, 8, 9], list(range(10, 50)), [3]]
    graphs = TorchBackend(Checkpoint(config, w, source=None), rt)
    eager = TorchBackend(Checkpoint(config, w, source=None), rt, cuda_graphs=False)
    assert graphs.graphs is not None and eager.graphs is None
    for mode in (sampling, [SequenceSampling(SamplingParams(), 0)] * 3):  # mixed, then greedy
        want = decode_together(eager, prompts, 24, mode)
        assert decode_together(graphs, prompts, 24, mode) == want
