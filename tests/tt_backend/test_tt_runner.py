"""The tt Backend through its interface (prefill / decode with paged KV, as the Generator drives
it): greedy tokens against transformers, on one device and on 1x2 / 1x8 meshes; clear errors."""

from __future__ import annotations

import pytest
import torch
from hf_reference import hf_model, state_dict
from tt_helpers import MESH_CONFIG, ODD_MESH_CONFIG, QWEN3_MESH_CONFIG, TT_CONFIGS

from llm.backends.tt.op_configs import TTConfigError
from llm.backends.tt.runner import TTBackend, parse_mesh
from llm.engine.contract.backend import (
    BackendSpec,
    DecodeInput,
    PrefillInput,
    SequenceSampling,
    create_backend,
)
from llm.engine.contract.sampling_params import SamplingParams
from llm.engine.drive import decode_together
from llm.model.checkpoint.common import Checkpoint
from llm.model.config import RuntimeConfig

GREEDY = SequenceSampling(SamplingParams(), 0)
CONFIGS = {"mesh": MESH_CONFIG, "qwen3_mesh": QWEN3_MESH_CONFIG, "odd_mesh": ODD_MESH_CONFIG}
# A token counts as greedy when its fp32 logit is within this many bf16 steps (at the size of the
# maximum) of the max: the tt path rounds activations, partial sums of the mesh's all-reduces and
# the logits themselves to bf16. Measured: up to 3.4 steps (mesh 1x8, transformers 5.24's init).
BF16_TIE_STEPS = 4


def generate(backend, prompts: list[list[int]], steps: int) -> list[list[int]]:
    """Prefill each prompt into its slot, then decode all users together (greedy)."""
    return decode_together(backend, prompts, steps, [GREEDY] * len(prompts))


def assert_greedy(model, prompt: list[int], tokens: list[int]) -> None:
    """Every token is transformers' (fp32) argmax after the tokens before it, up to bf16 ties."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1]
    top = logits.max(-1).values
    chosen = logits.gather(-1, torch.tensor(tokens)[:, None])[:, 0]
    step = torch.exp2(torch.floor(torch.log2(top.abs())) - 7)  # bf16 spacing at the max
    gaps = ((top - chosen) / step).tolist()
    assert max(gaps) <= BF16_TIE_STEPS, gaps


@pytest.mark.parametrize("name,mesh", [("llama_gqa", "1x1"), ("qwen2_bias", "1x1"),
                                       ("qwen3_qk_norm", "1x1"), ("granite_scaled", "1x1"),
                                       ("mistral_nemo_headdim", "1x1"), ("odd_heads", "1x1"),
                                       ("mesh", "1x2"), ("mesh", "1x8"), ("qwen3_mesh", "1x2"),
                                       ("odd_mesh", "1x2"), ("odd_mesh", "1x8"),
                                       ("phi3_fused", "1x1"), ("phi3_longrope", "1x1"),
                                       ("phi4_mini_partial", "1x1")])
def test_greedy_tokens_follow_transformers(name: str, mesh: str) -> None:
    """(phi3_longrope, original context 32: the 40-token prompt rotates with the long factors,
    the others, 19 and 24 tokens with their decode steps, with the short ones.)"""
    config = CONFIGS.get(name) or TT_CONFIGS[name]
    model = hf_model(config)
    for p, o in zip(*_greedy_run(model, config, mesh)):
        assert_greedy(model, p, o)


def _greedy_run(model, config, mesh: str):
    """(prompts, greedy continuations) of three users decoding together on `mesh`."""
    spec = BackendSpec(Checkpoint(config, state_dict(model), source=None), max_batch=3,
                       max_seq_len=96, block_size=32,
                       options={"mesh": mesh, "implementation": "emulator"})
    backend = create_backend("tt", spec)
    assert isinstance(backend, TTBackend) and f"mesh {mesh}" in backend.describe()
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, config.vocab_size, (n,), generator=g).tolist() for n in (7, 40, 12)]
    outs = generate(backend, prompts, 12)
    backend.close()
    return prompts, outs


def test_default_head_counts_give_the_same_tokens_on_every_mesh() -> None:
    """The default model's head counts (9 q / 3 kv: query heads padded, KV heads replicated) with
    every bias: greedy tokens on 1x2 and 1x8 equal those on 1x1."""
    model = hf_model(ODD_MESH_CONFIG)
    one = _greedy_run(model, ODD_MESH_CONFIG, "1x1")[1]
    for mesh in ("1x2", "1x8"):
        assert _greedy_run(model, ODD_MESH_CONFIG, mesh)[1] == one, mesh


def test_clear_errors() -> None:
    config = TT_CONFIGS["llama_gqa"]
    ck = Checkpoint(config, state_dict(hf_model(config)), source=None)
    rt = RuntimeConfig(max_batch=2, max_seq_len=64, block_size=32)
    with pytest.raises(TTConfigError, match="a mesh of 8 devices exceeds the model's 4 query"):
        TTBackend(ck, rt, mesh="1x8", implementation="emulator")
    with pytest.raises(TTConfigError, match="block_size 8 must be a multiple of 32"):
        TTBackend(ck, RuntimeConfig(max_batch=2, max_seq_len=64, block_size=8),
                  implementation="emulator")
    with pytest.raises(ValueError, match="ROWSxCOLS"):
        parse_mesh("eight")
    with pytest.raises(ValueError, match="precision"):
        TTBackend(ck, rt, precision_policy="fast", implementation="emulator")
    backend = TTBackend(ck, rt, implementation="emulator")
    with_logprobs = SequenceSampling(SamplingParams(temperature=0.7, seed=1, logprobs=2), 1)
    served = backend.prefill_step(PrefillInput(0, [1, 2, 3], 0, [1, 2], with_logprobs))
    assert len(served.logprobs[0].top) == 2
    with pytest.raises(ValueError, match="multiple of the block size 32"):
        backend.prefill(PrefillInput(0, [1, 2, 3], 5, [1, 2], GREEDY))
    backend.close()
    with pytest.raises(RuntimeError, match="closed"):
        backend.prefill(PrefillInput(0, [1, 2, 3], 0, [1, 2], GREEDY))


@pytest.mark.parametrize("mesh", ["1x1", "1x2"])
def test_chunked_prefill_equals_whole_prompt(mesh: str) -> None:
    """A prompt prefilled in chunks at block-aligned start positions (as the scheduler does)
    gives the same next token and the same continuation as one prefill."""
    config = MESH_CONFIG
    model = hf_model(config)
    ck = Checkpoint(config, state_dict(model), source=None)
    rt = RuntimeConfig(max_batch=1, max_seq_len=128, block_size=32)
    prompt = torch.randint(0, config.vocab_size, (70,),
                           generator=torch.Generator().manual_seed(8)).tolist()
    row = [3, 1, 4, 2]
    outs = []
    for chunks in ([(0, 70)], [(0, 32), (32, 64), (64, 70)]):
        backend = TTBackend(ck, rt, mesh=mesh, implementation="emulator")
        for a, b in chunks:
            token = backend.prefill(PrefillInput(0, prompt[a:b], a, row, GREEDY))
        seq = [token]
        for t in range(4):
            seq += backend.decode(DecodeInput([0], [seq[-1]], [70 + t], [row], [GREEDY]))
        outs.append(seq)
    assert outs[0] == outs[1]
    assert_greedy(model, prompt, outs[1])


@pytest.mark.parametrize("name", ["qwen3_qk_norm", "granite_scaled", "mistral_nemo_headdim",
                                  "phi3_longrope", "phi4_mini_partial"])
def test_gguf_greedy_tokens_follow_transformers(tmp_path, name: str) -> None:
    """A Qwen3 GGUF (written as llama.cpp writes one: `attn_q_norm` / `attn_k_norm`, key_length
    64 != hidden / heads), a Granite one (Q/K permuted, the four `granite.*` scales), a
    Mistral-Nemo-like one (written as `llama`, key_length 64 != hidden / heads) or a Phi-3 one
    (`attn_qkv`, gate and up in `ffn_up`, rope_factors_long/short) through load_checkpoint and
    the tt backend: transformers' greedy tokens."""
    from test_checkpoint import gguf_like_llama_cpp

    config = TT_CONFIGS[name]
    model = hf_model(config)
    ck = gguf_like_llama_cpp(tmp_path, name, config, state_dict(model))
    spec = BackendSpec(ck, max_batch=2, max_seq_len=96, block_size=32,
                       options={"mesh": "1x1", "implementation": "emulator", "cache": False})
    prompts = [[5, 17, 200, 3, 9], [44] * 19]
    for p, o in zip(prompts, generate(create_backend("tt", spec), prompts, 12)):
        assert_greedy(model, p, o)

