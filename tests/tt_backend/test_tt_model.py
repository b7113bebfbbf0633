"""The whole tt model against transformers: logits PCC of prefill (last tile) and of decode steps
in both precision policies, on one device and on 1x2 / 1x8 meshes."""

from __future__ import annotations

import pytest
import torch
from hf_reference import pcc
from tt_helpers import MESH_CONFIG, MESHES, RUNTIME, TT_CONFIGS, build_parts, ints

from llm.backends.tt.model import Transformer
from llm.backends.tt.trace import DecodeRunner

# Whole model: the tech report's ~0.99 with bfloat8_b weights ("bf8"); bf16 holds the module
# threshold. The performance policy adds bfloat4_b w1/w3 (3-bit mantissas): measured 0.956-0.983
# on these random 2-layer models (0.9977-0.9993 with bf8 w1/w3), hence its relaxed threshold.
# The decoder-override presets (precision.PRESETS) take the threshold of their MLP format:
# bfloat8_b MLP everywhere, or bfloat4_b MLP in every decoder but the last.
THRESHOLD = {"accuracy": 0.999, "bf8": 0.99, "performance": 0.95,
             "bf16-attention-bf8-mlp": 0.99, "bf8-mlp-last-decoder": 0.95}
CASES = ([("llama_gqa", (1, 1), p) for p in THRESHOLD] + [("odd_heads", (1, 1), "performance")]
         + [("mesh", m, p) for m in MESHES[1:] for p in ("accuracy", "bf8", "performance")]
         + [("mesh", (1, 2), "bf8-mlp-last-decoder")])


@pytest.mark.parametrize("name,mesh,policy", CASES)
def test_model_logits_prefill_and_decode(name, mesh, policy) -> None:
    config = MESH_CONFIG if name == "mesh" else TT_CONFIGS[name]
    parts = build_parts(config, mesh, policy)
    ttnn = parts.ttnn
    model = Transformer(parts.mesh, config, RUNTIME, parts.tensors, parts.cfg, parts.weights)
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
    want = ref[(n - 1) // 32 * 32:n]
    assert pcc(got, want) >= THRESHOLD[policy]
    runner = DecodeRunner(model, traced=False)
    for t in range(steps):
        pos = n + t
        d = runner.inputs  # decode one user (row 0) feeding the true token at its position
        d.write(runner.wanted([0], [int(seq[pos])], [pos], [pages[0].tolist()]))
        out = model.decode(d.dev["tokens"], d.dev["rot_idxs"], d.dev["cur_pos"],
                           d.dev["page_table"], d.next_tokens)
        d.advance(parts.mesh.read(d.next_tokens).reshape(-1).to(torch.int64))
        got = parts.mesh.read(model.lm_head.gather(out)).float()[0, 0, 0]
        assert pcc(got, ref[pos]) >= THRESHOLD[policy], t
