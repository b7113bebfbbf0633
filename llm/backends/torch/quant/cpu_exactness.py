"""How far the CPU int4 kernel's weights are from ggml's, measured on a GGUF's own tensors.

    python -m llm.backends.torch.quant.cpu_exactness [model.gguf]   (default: the default model)

For every quantized tensor with an int4 form (`int4_groups`), grouped by format and by embedding /
other tensors, prints

- how many tensors the float32 rewrite (scale and zero in float32) does not reproduce bit for bit;
- max |w' - w| / max |w| of the weight's 32-group, w' the kernel's weights with scale and zero in
  bf16, and the same for `dense` bf16 (w rounded to bf16);
- max |w' - w| / |w| over the non-zero weights, for both.

The numbers quoted in `llm.backends.torch.quant.cpu` come from this script (~20 s, default model).
"""

from __future__ import annotations

import sys
from pathlib import Path

import gguf
import torch

from llm.backends.torch.quant.int4_groups import to_int4_groups
from llm.model.paths import default_model_path
from llm.model.quant import QuantizedTensor, from_gguf_tensor

GROUP = 32


def errors(w: QuantizedTensor) -> dict[str, float] | None:
    """{"inexact_f32": 0 or 1, "group_q", "group_dense", "rel_q", "rel_dense"} for one tensor,
    None if it has no int4 form."""
    groups = to_int4_groups(w)
    if groups is None:
        return None
    ref = w.dequantize().double()  # [N, K]
    n = ref.shape[0]
    gmax = ref.abs().reshape(n, -1, GROUP).amax(dim=-1, keepdim=True)
    gmax = torch.where(gmax == 0, 1.0, gmax)
    nonzero = ref != 0
    out = {"inexact_f32": float(not torch.equal(groups.weight(torch.float32), ref))}
    for key, got in (("q", groups.weight(torch.bfloat16)),
                     ("dense", w.dequantize(torch.bfloat16).double())):
        diff = (got - ref).abs()
        out[f"group_{key}"] = (diff.reshape(n, -1, GROUP) / gmax).max().item()
        out[f"rel_{key}"] = (diff[nonzero] / ref.abs()[nonzero]).max().item()
    return out


def main() -> None:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else default_model_path()
    stats: dict[tuple[str, str], dict[str, float]] = {}
    counts: dict[tuple[str, str], int] = {}
    for t in gguf.GGUFReader(path).tensors:
        w = from_gguf_tensor(t)
        if not isinstance(w, QuantizedTensor):
            continue
        found = errors(w)
        if found is None:
            continue
        key = (w.format, "embedding" if "token_embd" in t.name else "other")
        counts[key] = counts.get(key, 0) + 1
        agg = stats.setdefault(key, dict.fromkeys(found, 0.0))
        for name, value in found.items():
            agg[name] = agg[name] + value if name == "inexact_f32" else max(agg[name], value)
    for (fmt, kind), agg in stats.items():
        print(f"{fmt} {kind} ({counts[(fmt, kind)]} tensors): float32 rewrite not bit-exact in "
              f"{agg['inexact_f32']:.0f}; max |dw|/group max: int4pack bf16 {agg['group_q']:.2e}, "
              f"dense bf16 {agg['group_dense']:.2e}; max |dw|/|w|: int4pack bf16 "
              f"{agg['rel_q']:.2e}, dense bf16 {agg['rel_dense']:.2e}")


if __name__ == "__main__":
    main()
