"""Precision policies: which dtype each weight group, the KV cache and the attention inputs use.

"accuracy": everything bfloat16. "performance": bfloat8_b attention weights (wqkv, wo), the
down projection, the LM head and the KV cache; bfloat4_b gate/up (w1/w3) weights, the data
formats tt_transformers uses for its performance mode, with the math fidelity the tech report
recommends per weight format (HiFi4 for bf16, HiFi2 for bfloat8_b, LoFi for bfloat4_b).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

POLICIES = ("accuracy", "performance")


@dataclass(frozen=True)
class Precision:
    """Data formats (ttnn DataType values) and math fidelities (names) of one policy."""

    name: str
    wqkv: Any
    wo: Any
    w1: Any  # gate
    w3: Any  # up
    w2: Any  # down
    lm_head: Any
    kv_cache: Any
    prefill_sdpa: Any  # Q/K/V of prefill flash attention
    mlp_product: Any  # silu(w1 x) * (w3 x)
    fidelity: dict[str, str]  # weight group -> "hifi4" | "hifi2" | "lofi"


def precision(ttnn: Any, name: str) -> Precision:
    """The named policy with `ttnn`'s dtype objects."""
    if name == "accuracy":
        bf16 = ttnn.bfloat16
        return Precision(name, bf16, bf16, bf16, bf16, bf16, bf16, bf16, bf16, bf16,
                         {g: "hifi4" for g in ("wqkv", "wo", "w1", "w3", "w2", "lm_head")})
    if name == "performance":
        bf8, bf4 = ttnn.bfloat8_b, ttnn.bfloat4_b
        return Precision(name, wqkv=bf8, wo=bf8, w1=bf4, w3=bf4, w2=bf8, lm_head=bf8,
                         kv_cache=bf8, prefill_sdpa=bf8, mlp_product=bf8,
                         fidelity={"wqkv": "hifi2", "wo": "hifi2", "w1": "lofi", "w3": "lofi",
                                   "w2": "hifi2", "lm_head": "hifi2"})
    raise ValueError(f"unknown precision policy {name!r} (choose from {', '.join(POLICIES)})")
