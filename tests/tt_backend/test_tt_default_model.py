"""The tt backend on the real default model (SmolLM2-135M-Instruct), against the torch backend.

"accuracy" (bf16): greedy tokens through the Generator equal the torch backend's in bf16 for 32
tokens on 2 prompts decoded together. "performance" (bfloat8_b / bfloat4_b): teacher-forced top-1
agreement with the torch backend over 64 positions (one prefill, compared position by position).

The issue's target for "performance" is >= 90%; it is NOT met: measured 0.797 (51/64; 0.785 over
256 positions). The policy is tt_transformers' performance mode (checked setting by setting, see
llm/backends/tt/precision.py); the loss is its bfloat4_b gate/up weights: with bfloat8_b w1/w3
(everything else unchanged) the same test gives 0.891. tt_transformers itself does not reach 90%
top-1 with this mode on its smallest model (PERF.md: Llama-3.2-1B 79% on N150, 87% in accuracy
mode), and it gives no rule that would select other settings for this model. Its setting for
models "degraded under standard high-performance settings" (Qwen2.5-7B: bf16 attention and KV
cache, bfloat8_b MLP), available here as the decoder_precision preset "bf16-attention-bf8-mlp",
reaches the target on this model (measured 0.922); the second test checks that. The first
asserts the measured level of plain "performance" so a regression is caught.

On 1x2 and 1x8 meshes (query heads padded, KV heads replicated) the accuracy policy gives the same
greedy tokens as on one device.
"""

from __future__ import annotations

import pytest
import torch

import llm
from llm.backends.torch.runner import TorchBackend
from llm.backends.tt.runner import TTBackend
from llm.engine.contract.sampling_params import SamplingParams
from llm.model.checkpoint.load import load_checkpoint
from llm.model.config import RuntimeConfig
from llm.model.paths import default_cache_dir, default_model_path

PROMPTS = ["Once upon a time", "Water boils at"]
TIE_PROMPT = "The capital of France is"
BF16_STEP = 0.25  # bf16 spacing of logits in [32, 64)
PERFORMANCE_AGREEMENT = 0.78  # measured 0.797 = 51/64 (target 0.9 not met, see the docstring)
TARGET_AGREEMENT = 0.90  # the target; measured 0.922 = 59/64 with the preset
NEW_TOKENS = 32
TEXT = ("The history of the printing press begins in the fifteenth century, when Johannes "
        "Gutenberg combined movable metal type, oil-based ink and a wooden screw press. Within "
        "a few decades, printing shops had spread to more than two hundred cities across "
        "Europe, books became far cheaper, and ideas travelled faster than ever before. "
        "Scholars, merchants and reformers all used the new technology to reach readers.")


@pytest.fixture(scope="module")
def checkpoint():
    return load_checkpoint(default_model_path(), progress=False)


def test_accuracy_greedy_equals_torch_bf16(checkpoint) -> None:
    """Greedy tokens equal torch-bf16's, except where two candidates are a bf16-level tie: the
    first divergence, if any, must be a position whose two tokens are both within one bf16 step
    (0.25 at that magnitude) of the fp32 model's top logit, where rounding order decides. Measured
    (torch 2.13 CPU, 2026-12-03): "The capital of France is" reaches such a tie at a date's digits
    (fp32 top logits 36.925 / 36.922 / 36.855), and torch-bf16 batched with 3 prompts picks
    another token than alone at token 29 of "Once upon a time" (0.16 below the fp32 max; ours is
    the fp32 argmax)."""
    params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    prompts = PROMPTS + [TIE_PROMPT]
    ours = llm.LLM(backend="tt", max_batch=3, max_seq_len=128, progress=False,
                   backend_options={"precision": "accuracy", "implementation": "emulator"})
    assert "ttnn_emu" in ours.backend.describe()
    got = ours.generate(prompts, params)
    ref = llm.LLM(backend="torch", dtype="bfloat16", max_batch=3, max_seq_len=128,
                  progress=False, weights="dequantize").generate(prompts, params)
    assert got[0].text.startswith(", the city of Nova Haven was a thriving metropolis")
    fp32 = TorchBackend(checkpoint, RuntimeConfig(max_batch=1, max_seq_len=128))
    equal = 0
    for g, r in zip(got, ref):
        a, b = g.token_ids, r.token_ids
        assert len(a) == NEW_TOKENS
        div = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if div is None:
            equal += 1
            continue
        assert div >= 8, (div, g.text, r.text)
        with torch.no_grad():
            logits = fp32.model.prefill(torch.tensor(g.prompt_token_ids + a[:div]), 0,
                                        torch.arange(1, 5), fp32.cache)
        top = float(logits.max())
        gaps = (top - float(logits[a[div]]), top - float(logits[b[div]]))
        assert max(gaps) < BF16_STEP, (div, gaps, g.text, r.text)
        print(f"\n{g.prompt_token_ids[:4]}...: equal for {div} tokens, then a bf16-level tie "
              f"(fp32 gaps to the max {gaps[0]:.3f} ours, {gaps[1]:.3f} torch-bf16)")
    assert equal >= 1


@pytest.fixture(scope="module")
def teacher_forced(checkpoint):
    """agreement(decoder_precision) -> teacher-forced top-1 agreement of the performance policy
    (with those decoder overrides) with the torch backend in bf16 over the 64 tokens of TEXT."""
    from llm.backends.torch.runner import TorchBackend

    tokenizer = llm.Tokenizer.from_path(default_model_path(), cache_dir=default_cache_dir(),
                                        digest=checkpoint.source_sha256)
    tokens = tokenizer.encode(TEXT)[:64]
    assert len(tokens) == 64
    rt = RuntimeConfig(max_batch=1, max_seq_len=128)
    ref_backend = TorchBackend(checkpoint, RuntimeConfig(max_batch=1, max_seq_len=128,
                                                         dtype="bfloat16"))
    with torch.no_grad():
        ref = ref_backend.model.prefill(torch.tensor(tokens), 0,
                                        torch.arange(1, rt.blocks_per_seq + 1),
                                        ref_backend.cache, all_logits=True).argmax(-1)

    def agreement(decoder_precision=None) -> float:
        tt = TTBackend(checkpoint, rt, precision_policy="performance",
                       decoder_precision=decoder_precision, implementation="emulator")
        ttnn, mesh = tt.mesh.ttnn, tt.mesh
        tok = ttnn.from_torch(torch.tensor(tokens).view(1, 1, 1, 64), dtype=ttnn.uint32,
                              layout=ttnn.ROW_MAJOR_LAYOUT, device=mesh.device,
                              memory_config=ttnn.DRAM_MEMORY_CONFIG)
        pages = ttnn.from_torch(torch.arange(1, rt.blocks_per_seq + 1)[None], dtype=ttnn.int32,
                                layout=ttnn.ROW_MAJOR_LAYOUT, device=mesh.device,
                                memory_config=ttnn.DRAM_MEMORY_CONFIG)
        hidden = tt.model.prefill_hidden(tok, pages)
        ours = torch.cat([mesh.read(tt.model.lm_head.argmax(tt.model.tile_logits(hidden, t)))
                          .reshape(-1).to(torch.int64) for t in range(2)])  # [64]
        tt.close()
        return float((ours == ref).float().mean())

    return agreement


def test_performance_teacher_forced_top1_agreement(teacher_forced) -> None:
    agreement = teacher_forced()
    print(f"\nperformance policy teacher-forced top-1 agreement: {agreement:.3f}")
    assert agreement >= PERFORMANCE_AGREEMENT


def test_degraded_model_preset_reaches_the_target(teacher_forced) -> None:
    """tt_transformers' settings for models degraded under its performance mode (bf16 attention
    and KV cache, bfloat8_b MLP) reach the issue's 90% on the default model."""
    agreement = teacher_forced("bf16-attention-bf8-mlp")
    print(f"\nbf16-attention-bf8-mlp teacher-forced top-1 agreement: {agreement:.3f}")
    assert agreement >= TARGET_AGREEMENT


def test_meshes_greedy_equal_1x1() -> None:
    """The default model's 9 query / 3 KV heads on 1x2 (query heads 4 + 5 padded to 5 per
    device, the KV head whose group the boundary cuts replicated) and 1x8 (1 or 2 query heads
    per device padded to 2, each device one replica of its KV head, the prefill residual
    replicated as 576 does not split into 8 tile columns): greedy tokens equal 1x1's. Measured
    (2 prompts x 12 tokens, emulator, shared 2-core box): 48 s for the three meshes with warm
    weight caches; a cold 1x8 cache adds ~35 s of conversion."""
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    tokens = {}
    for mesh in ("1x1", "1x2", "1x8"):
        model = llm.LLM(backend="tt", max_batch=2, max_seq_len=64, progress=False,
                        backend_options={"precision": "accuracy", "implementation": "emulator",
                                         "mesh": mesh})
        assert f"mesh {mesh}" in model.backend.describe()
        tokens[mesh] = [o.token_ids for o in model.generate(PROMPTS, params)]
        model.close()
    assert tokens["1x2"] == tokens["1x1"] and tokens["1x8"] == tokens["1x1"]
