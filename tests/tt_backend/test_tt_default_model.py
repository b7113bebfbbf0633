"""The tt backend on the real default model (SmolLM2-135M-Instruct), against the torch backend.

"accuracy" (bf16): greedy tokens through the Generator equal the torch backend's in bf16 for 32
tokens on 2 prompts decoded together. "performance": teacher-forced top-1 agreement with the
torch backend in bf16 over 511 positions of English prose (demos/tt_accuracy.py, one prefill,
compared position by position).

"performance" is per model (llm/backends/tt/precision.py): this model is under 1B parameters, so
it gets the bf16-attention-bf8-mlp preset (tt_transformers' setting for models degraded under its
performance mode), which reaches the issue's >= 90%. tt_transformers' performance mode as it is
(bfloat4_b gate/up, preset "bf4-mlp") stays near 79% on this 4-bit-derived model, as on
tt_transformers' own Llama-3.2-1B (PERF.md: 79% on N150); its level is asserted so a regression
is caught.

On 1x2 and 1x8 meshes (query heads padded, KV heads replicated) the accuracy policy gives the same
greedy tokens as on one device.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import llm
from llm.backends.torch.runner import TorchBackend
from llm.engine.contract.sampling_params import SamplingParams
from llm.model.checkpoint.load import load_checkpoint
from llm.model.config import RuntimeConfig
from llm.model.paths import default_model_path

PROMPTS = ["Once upon a time", "Water boils at"]
TIE_PROMPT = "The capital of France is"
BF16_STEP = 0.25  # bf16 spacing of logits in [32, 64)
PERFORMANCE_AGREEMENT = 0.76  # bf4-mlp, vs torch-bf16: measured 0.789 over 877 positions
TARGET_AGREEMENT = 0.90  # the target; "performance" measured 0.957 over 877 positions
NEW_TOKENS = 32
ROOT = Path(__file__).resolve().parent.parent.parent


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
def accuracy_table():
    """demos/tt_accuracy.py's evaluate over the first 512 tokens of demos/data/eval_text.txt (775
    words of English prose): one 512-token teacher-forced window, 511 predictions."""
    spec = importlib.util.spec_from_file_location("tt_accuracy_demo",
                                                  ROOT / "demos" / "tt_accuracy.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["tt_accuracy_demo"] = module  # its dataclass looks its module up
    spec.loader.exec_module(module)
    args = module.parse_args(["--configs", "performance", "performance:bf4-mlp",
                              "--window", "512", "--max-tokens", "512"])
    return {row.config: row for row in module.evaluate(args)}


def test_performance_reaches_the_target(accuracy_table) -> None:
    """"performance" on this model (under 1B parameters: the bf16-attention-bf8-mlp preset):
    teacher-forced top-1 vs torch-bf16 >= 0.90 over >= 500 positions (measured 0.957 over 877)."""
    row = accuracy_table["performance"]
    print(f"\nperformance: top-1 vs bf16 {row.top1_bf16:.3f}, vs fp32 {row.top1_fp32:.3f}, "
          f"top-5 vs fp32 {row.top5_fp32:.3f} over {row.tokens}")
    assert row.tokens >= 500 and "bf16-attention-bf8-mlp" in row.described
    assert row.top1_bf16 >= TARGET_AGREEMENT


def test_plain_performance_mode_level(accuracy_table) -> None:
    """tt_transformers' performance mode as it is (bfloat4_b MLP, preset "bf4-mlp"): the measured
    level (0.789 vs torch-bf16 over 877 positions), asserted so a regression is caught."""
    row = accuracy_table["performance:bf4-mlp"]
    print(f"\nbf4-mlp: top-1 vs bf16 {row.top1_bf16:.3f} over {row.tokens}")
    assert row.tokens >= 500 and row.top1_bf16 >= PERFORMANCE_AGREEMENT


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
