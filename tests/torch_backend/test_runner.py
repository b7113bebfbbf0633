"""The torch Backend through its interface, on CPU and (where present) CUDA.

Greedy tokens equal transformers' greedy tokens (full forward per step) for users of different
lengths decoded together; seeded sampling agrees across devices.
"""

from __future__ import annotations

import pytest
import torch
from hf_reference import SMALL_CONFIGS, hf_model, state_dict

from llm.backends.torch.runner import TorchBackend
from llm.engine.contract.backend import DecodeInput, PrefillInput, SequenceSampling
from llm.engine.contract.sampling_params import SamplingParams
from llm.engine.drive import decode_together
from llm.engine.paged_kv import PageTable, PageTableSpec
from llm.model.checkpoint.common import Checkpoint
from llm.model.config import RuntimeConfig

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="CUDA is not available on this machine"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["llama_gqa", "qwen2_bias", "qwen3_qk_norm", "granite_scaled",
                                  "mistral_nemo_headdim", "phi3_fused"])
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


def test_cpu_sampling_hashes_the_vocabulary_once(monkeypatch) -> None:
    """On the CPU the backend hashes its vocabulary's columns once, at construction, and its
    sampled steps use that table (no per-step column hash), with the tokens of the draw's
    definition (the same seeded tokens without the table)."""
    from llm.backends.torch import sampling

    config = SMALL_CONFIGS["llama_gqa"]
    w = state_dict(hf_model(config))
    params = [SequenceSampling(SamplingParams(temperature=0.9, seed=s), s) for s in (3, 4)]
    calls = []
    hash_columns = sampling._column_hash
    monkeypatch.setattr(sampling, "_column_hash", lambda col: calls.append(1) or
                        hash_columns(col))
    rt = RuntimeConfig(device="cpu", max_batch=2, max_seq_len=64, block_size=8)
    backend = TorchBackend(Checkpoint(config, w, source=None), rt)
    assert len(calls) == 1  # the table
    held = decode_together(backend, [[5, 6, 7], [9]], 8, params)
    assert len(calls) == 1
    plain = TorchBackend(Checkpoint(config, w, source=None), rt)
    plain._col_hash = None  # no table: hashed in each draw, the same tokens
    assert decode_together(plain, [[5, 6, 7], [9]], 8, params) == held
    assert len(calls) > 2


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
    """Greedy and seeded-sampled users mixed in one batch (3 users: bucket 4, one padding row;
    one of them with min_p), with top-k / top-p (the sorted graphs) and without; then greedy."""
    config = SMALL_CONFIGS["llama_gqa"]
    w = state_dict(hf_model(config))
    rt = RuntimeConfig(device="cuda", dtype=dtype, max_batch=5, max_seq_len=96, block_size=16)
    sampling = [SequenceSampling(SamplingParams(), 0),
                SequenceSampling(SamplingParams(temperature=0.7, top_k=20, seed=4), 4),
                SequenceSampling(SamplingParams(temperature=1.0, top_p=0.8, min_p=0.05, seed=5),
                                 5)]
    prompts = [[5, 6, 7, 8, 9], list(range(10, 50)), [3]]
    graphs = TorchBackend(Checkpoint(config, w, source=None), rt)
    eager = TorchBackend(Checkpoint(config, w, source=None), rt, cuda_graphs=False)
    assert graphs.graphs is not None and eager.graphs is None
    unsorted = [SequenceSampling(SamplingParams(), 0),  # no top-k / top-p: no sort
                SequenceSampling(SamplingParams(temperature=0.7, seed=4), 4),
                SequenceSampling(SamplingParams(temperature=1.0, min_p=0.05, seed=5), 5)]
    allowed = (3, 9, 17, 40, 41)  # the penalty path: a restricted sampled user beside others
    restricted = [sampling[0], SequenceSampling(SamplingParams(temperature=1.2, seed=6,
                                                               allowed_token_ids=allowed), 6),
                  sampling[2]]
    for mode in (sampling, unsorted, restricted, [SequenceSampling(SamplingParams(), 0)] * 3):
        want = decode_together(eager, prompts, 24, mode)
        assert decode_together(graphs, prompts, 24, mode) == want
        if mode is restricted:
            assert set(want[1]) <= set(allowed)


def _churn(backend: TorchBackend, prompts: list[list[int]]) -> list[list[int]]:
    """Decode with users leaving and a new user joining mid-way (the batch changes under the
    pipelined graph decode); returns every user's tokens.
    """
    rt = backend.runtime
    pages = PageTable(PageTableSpec(rt.total_blocks, rt.block_size, rt.blocks_per_seq),
                      rt.max_batch)
    greedy = SequenceSampling(SamplingParams(), 0)
    sampled = SequenceSampling(SamplingParams(temperature=0.9, seed=11), 11)
    out: dict[int, list[int]] = {}
    lens: dict[int, int] = {}

    def join(slot: int, prompt: list[int], s: SequenceSampling) -> None:
        pages.reserve(slot, len(prompt) + 30)
        out[slot] = [backend.prefill(PrefillInput(slot, prompt, 0, pages.row(slot), s))]
        lens[slot] = len(prompt)

    for slot, p in enumerate(prompts):
        join(slot, p, sampled if slot == 1 else greedy)
    active = list(out)
    finished = []
    for step in range(20):
        if step == 6:  # user 0 leaves; its pages go back to the pool
            finished.append(out.pop(0))
            active.remove(0)
            pages.release(0)
        if step == 9:  # a new user takes slot 0 (and, likely, the freed pages)
            join(0, [7, 7, 7, 1, 2], greedy)
            active.insert(0, 0)
        samp = [sampled if s == 1 else greedy for s in active]
        toks = backend.decode(DecodeInput(active, [out[s][-1] for s in active],
                                          [lens[s] + len(out[s]) - 1 for s in active],
                                          pages.table(active), samp))
        for s, t in zip(active, toks):
            out[s].append(t)
    return finished + [out[s] for s in sorted(out)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available on this machine")
def test_pipelined_graph_decode_with_users_leaving_and_joining() -> None:
    config = SMALL_CONFIGS["llama_gqa"]
    w = state_dict(hf_model(config))
    rt = RuntimeConfig(device="cuda", max_batch=4, max_seq_len=64, block_size=16)
    prompts = [[5, 6, 7, 8, 9], list(range(10, 40)), [3, 4]]
    graphs = TorchBackend(Checkpoint(config, w, source=None), rt)
    eager = TorchBackend(Checkpoint(config, w, source=None), rt, cuda_graphs=False)
    assert _churn(graphs, prompts) == _churn(eager, prompts)
    stats = graphs.graphs.stats
    assert stats["ahead_hits"] >= stats["steps"] - 4  # only the steps after a change missed


@pytest.mark.parametrize("name", ["qwen3_qk_norm", "granite_scaled", "mistral_nemo_headdim",
                                  "phi3_fused"])
def test_gguf_greedy_tokens_equal_transformers(tmp_path, name: str) -> None:
    """A Qwen3 GGUF written as llama.cpp writes one (architecture `qwen3`: Q/K rows not
    permuted, `attn_q_norm` / `attn_k_norm`, key_length 32 != hidden / heads), or a Granite one
    (Q/K permuted as Llama's, the four `granite.*` scales), or a Mistral-Nemo-like one (written
    as `llama`, as llama.cpp does, key_length 32 != hidden / heads) loads to the config it was
    written from, and decodes transformers' greedy tokens."""
    from test_checkpoint import gguf_like_llama_cpp

    config = SMALL_CONFIGS[name]
    model = hf_model(config)
    ck = gguf_like_llama_cpp(tmp_path, name, config, state_dict(model))
    backend = TorchBackend(ck, RuntimeConfig(max_batch=2, max_seq_len=64, block_size=8))
    prompts = [[5, 17, 200, 3, 9], [44] * 19]
    ours = decode_together(backend, prompts, 12, [SequenceSampling(SamplingParams(), 0)] * 2)
    for p, o in zip(prompts, ours):
        with torch.no_grad():
            logits = model(torch.tensor([p + o])).logits[0, len(p) - 1:-1]
        assert o == logits.argmax(-1).tolist()


@pytest.mark.parametrize("name", ["phi3_longrope", "phi4_mini_partial"])
@pytest.mark.parametrize("source", ["hf", "gguf"])
def test_longrope_greedy_tokens_equal_transformers(tmp_path, source: str, name: str) -> None:
    """Phi-3 with LongRoPE (original context 16), or Phi-4-mini's kind (also RoPE on 12 of 16
    dims), from its tensors or from a GGUF written as llama.cpp writes Phi-3 (attn_qkv,
    2 x intermediate ffn_up, rope_factors_long/short, rope.dimension_count): a user whose prompt
    is past the original context (long factors throughout) and one that stays within it (short
    factors throughout) decode transformers' greedy tokens (full forward of the whole sequence
    per step)."""
    from test_checkpoint import gguf_like_llama_cpp

    config = SMALL_CONFIGS[name]
    model = hf_model(config)
    ck = (Checkpoint(config, state_dict(model), source=None) if source == "hf"
          else gguf_like_llama_cpp(tmp_path, "phi3", config, state_dict(model)))
    backend = TorchBackend(ck, RuntimeConfig(max_batch=2, max_seq_len=64, block_size=8))
    prompts, steps = [[7, 300, 41, 2, 99] * 5, [5, 17, 200, 3, 9]], 10
    ours = decode_together(backend, prompts, steps, [SequenceSampling(SamplingParams(), 0)] * 2)
    assert len(prompts[1]) + steps <= config.rope_scaling.original_max_position_embeddings
    for p, o in zip(prompts, ours):
        seq = list(p)
        with torch.no_grad():
            for _ in range(steps):
                seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
        assert o == seq[len(p):]


def test_longrope_decode_past_the_original_context_follows_transformers_with_a_cache() -> None:
    """A sequence that crosses the original context while decoding: from that position on each
    step rotates with the long factors, and the keys cached before keep the short ones, as
    transformers' forward with a KV cache computes (its generate() instead recomputes the whole
    sequence at the crossing, which needs the engine to prefill the sequence again: not done,
    see docs/architectures.md). Logits of every step compared."""
    from transformers import DynamicCache

    config = SMALL_CONFIGS["phi3_longrope"]
    model = hf_model(config)
    backend = TorchBackend(Checkpoint(config, state_dict(model), source=None),
                           RuntimeConfig(max_batch=1, max_seq_len=64, block_size=8))
    prompt, steps = [5, 17, 200, 3, 9, 8, 120, 33, 2, 61], 12  # positions 0 .. 21, limit 16
    ours = decode_together(backend, [prompt], steps, [SequenceSampling(SamplingParams(), 0)])[0]
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        out = model(torch.tensor([prompt]), past_key_values=cache, use_cache=True)
        ref = [int(out.logits[0, -1].argmax())]
        for _ in range(steps - 1):
            out = model(torch.tensor([[ref[-1]]]), past_key_values=cache, use_cache=True)
            ref.append(int(out.logits[0, -1].argmax()))
        full = list(prompt) + ref[:-1]
        regen = model(torch.tensor([full])).logits[0, len(prompt) - 1:].argmax(-1).tolist()
    assert ours == ref
    assert regen != ref  # the crossing matters here: a full forward rotates differently
