"""The whole tt model against transformers: logits of prefill (last tile) and of decode steps
in both precision policies, on one device and on 1x2 / 1x8 meshes (also with the default model's
9 / 3 head counts, padded and replicated over the mesh, and o_proj / MLP biases); PCC, max
relative error and gain error within the policy's tolerance (tt_helpers.TOLERANCE)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from hf_reference import assert_matches, check_failures
from tt_helpers import (
    MESH_CONFIG,
    MESHES,
    ODD_MESH_CONFIG,
    RUNTIME,
    TOLERANCE,
    TT_CONFIGS,
    build_parts,
    ints,
)

from llm.backends.tt.model import Transformer
from llm.backends.tt.trace import DecodeRunner

# The decoder-override presets (precision.PRESETS) have their own tolerances, near those of
# their MLP format: bfloat8_b MLP everywhere, or bfloat4_b MLP in every decoder but the last.
CASES = ([("llama_gqa", (1, 1), p) for p in TOLERANCE] + [("odd_heads", (1, 1), "performance")]
         + [("qwen3_qk_norm", (1, 1), p) for p in ("accuracy", "bf8")]
         + [("granite_scaled", (1, 1), p) for p in ("accuracy", "bf8")]
         + [("mistral_nemo_headdim", (1, 1), "accuracy")]
         + [("phi3_fused", (1, 1), "accuracy"), ("phi3_longrope", (1, 1), "accuracy"),
            ("phi3_longrope", (1, 1), "bf8"), ("phi4_mini_partial", (1, 1), "accuracy")]
         + [("mesh", m, p) for m in MESHES[1:] for p in ("accuracy", "bf8", "performance")]
         + [("mesh", (1, 2), "bf8-mlp-last-decoder")]
         + [("odd_mesh", m, p) for m in MESHES for p in ("accuracy", "bf8")])

# ODD_MESH_CONFIG (hidden 576, every bias) in bf16 has a larger max relative error than the other
# configs: measured 0.032 / 0.038 / 0.034 (prefill) and up to 0.029 / 0.032 / 0.029 (decode) on
# 1x1 / 1x2 / 1x8, so 1x1 alone is already near the 0.035 bound; the gain bound is unchanged.
ODD_MESH_ACCURACY = replace(TOLERANCE["accuracy"], max_rel=0.05)


def _logits(name: str, mesh, policy: str, planted: dict[str, float] | None = None):
    """Yields (what, our logits, transformers' logits): the prefill's last tile up to the last
    token, then 3 decode steps. `planted` scales some of our weights (name -> factor), the
    reference's staying as they are."""
    config = {"mesh": MESH_CONFIG, "odd_mesh": ODD_MESH_CONFIG}.get(name) or TT_CONFIGS[name]
    parts = build_parts(config, mesh, policy)
    ttnn = parts.ttnn
    w = dict(parts.tensors)
    for k, factor in (planted or {}).items():
        w[k] = w[k] * factor
    model = Transformer(parts.mesh, config, RUNTIME, w, parts.cfg, parts.weights)
    g = torch.Generator().manual_seed(5)
    n, steps = 45, 3
    seq = torch.randint(0, config.vocab_size, (n + steps,), generator=g)
    with torch.no_grad():
        ref = parts.hf(seq[None]).logits[0]  # [n + steps, V]
    s = parts.cfg.prefill_length(n)
    tok = torch.zeros(1, 1, 1, s, dtype=torch.int64)
    tok[0, 0, 0, :n] = seq[:n]
    pages = torch.arange(1, RUNTIME.blocks_per_seq + 1)[None]
    hidden = model.prefill_hidden(ints(parts, tok, ttnn.uint32), ints(parts, pages, ttnn.int32))
    logits = parts.mesh.read(model.lm_head.gather(model.tile_logits(hidden, (n - 1) // 32)))
    got = logits.float()[0, 0, :(n - 1) % 32 + 1]  # rows of the last tile up to the last token
    yield "prefill", got, ref[(n - 1) // 32 * 32:n]
    runner = DecodeRunner(model, traced=False)
    for t in range(steps):
        pos = n + t
        d = runner.inputs  # decode one user (row 0) feeding the true token at its position
        d.write(runner.wanted([0], [int(seq[pos])], [pos], [pages[0].tolist()]))
        out = model.decode(d.dev["tokens"], d.dev["rot_idxs"], d.dev["cur_pos"],
                           d.dev["page_table"], d.next_tokens)
        d.advance(parts.mesh.read(d.next_tokens).reshape(-1).to(torch.int64))
        got = parts.mesh.read(model.lm_head.gather(out)).float()[0, 0, 0]
        yield f"decode step {t}", got, ref[pos]


@pytest.mark.parametrize("name,mesh,policy", CASES)
def test_model_logits_prefill_and_decode(name, mesh, policy) -> None:
    for what, got, want in _logits(name, mesh, policy):
        tol = ODD_MESH_ACCURACY if (name, policy) == ("odd_mesh", "accuracy") else \
            TOLERANCE[policy]
        assert_matches(got, want, tol, what)


@pytest.mark.parametrize("name,mesh", [("llama_gqa", (1, 1)), ("mesh", (1, 2))])
def test_planted_scale_error_fails_accuracy(name, mesh) -> None:
    """The final norm's weight 1% too large in the accuracy policy: PCC passes, the gain bound
    fails every comparison (gain error 0.0072..0.0113 measured)."""
    outputs = list(_logits(name, mesh, "accuracy", {"model.norm.weight": 1.01}))
    failed = check_failures(outputs, TOLERANCE["accuracy"])
    assert len(failed) == len(outputs) == 4 and all("gain error" in m for m in failed), failed


def test_planted_o_proj_error_fails_accuracy() -> None:
    """The issue's case: layer 1's o_proj 5% too large on a 1x2 mesh in the accuracy policy.
    PCC stays >= 0.999 (min 0.99943); the max relative error bound fails it. With rounding
    noise near 2.5% not every comparison shows it (measured 0.029..0.043 against 0.035)."""
    planted = {"model.layers.1.self_attn.o_proj.weight": 1.05}
    failed = check_failures(_logits("mesh", (1, 2), "accuracy", planted), TOLERANCE["accuracy"])
    assert failed and all("max relative error" in m for m in failed), failed
