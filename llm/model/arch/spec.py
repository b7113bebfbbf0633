"""What one architecture is: the names it goes by, its tensor names and its switches.

An `Architecture` is data only. The config reader (`llm.model.config`) and the checkpoint readers
(`llm.model.checkpoint`) consult it; the backends never see it, only the `ModelConfig` switches
it sets and the canonical tensors (Hugging Face Llama names and layout) the readers produce.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

# llama.cpp's names of the tensors outside the layers -> canonical HF names.
GGUF_GLOBAL_NAMES: Mapping[str, str] = MappingProxyType({
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
})
# llama.cpp's per-layer names of the Llama family -> HF names relative to `model.layers.{i}.`.
LLAMA_GGUF_LAYER_NAMES: Mapping[str, str] = MappingProxyType({
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
})
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)")


@dataclass(frozen=True)
class Fused:
    """A checkpoint tensor holding several canonical ones stacked along its rows (dim 0), as
    Phi-3's `self_attn.qkv_proj` holds q, k and v: `stored` and `parts` are names relative to
    `model.layers.{i}.`, without the `.weight` / `.bias` suffix; parts in row order."""

    stored: str
    parts: tuple[str, ...]


@dataclass(frozen=True)
class Architecture:
    """One architecture as the readers see it.

    name: the `ModelConfig.arch` value. hf_model_types / hf_classes: the `config.json`
    `model_type` values and `architectures` classes it claims; hf_model_type_out is the
    model_type `ModelConfig.to_hf_dict` writes. gguf_archs: the GGUF `general.architecture`
    values it claims.

    Switches: qkv_bias: q/k/v projections always carry a bias (Qwen2); otherwise the HF
    `attention_bias` flag sets it, and also o_proj's bias when attention_bias_on_o. qk_norm:
    per-head RMSNorm of q and k (Qwen3). multipliers: Granite's embedding / residual / attention /
    logits multipliers. sliding_window: when the HF `sliding_window` field applies: "always",
    "flag" (only with `use_sliding_window`, Qwen2/3) or "never". hf_writes_attention_bias /
    hf_writes_mlp_bias: the transformers config class takes those flags.

    Tensors: hf_fused: checkpoint tensors that stack several canonical ones (split at load,
    stacked again by `save_hf_checkpoint`). gguf_layer_names: llama.cpp per-layer names -> HF
    names (a fused one names the `Fused.stored` tensor). gguf_permuted_qk: llama.cpp's converter
    permuted the Q/K rows to interleaved RoPE pairs (its LLAMA-style RoPE; NeoX-style models are
    stored unpermuted).
    """

    name: str
    hf_model_types: tuple[str, ...]
    hf_classes: tuple[str, ...]
    gguf_archs: tuple[str, ...]
    hf_model_type_out: str
    qkv_bias: bool = False
    attention_bias_on_o: bool = True
    qk_norm: bool = False
    multipliers: bool = False
    sliding_window: str = "never"
    hf_writes_attention_bias: bool = False
    hf_writes_mlp_bias: bool = False
    gguf_permuted_qk: bool = False
    hf_fused: tuple[Fused, ...] = ()
    gguf_layer_names: Mapping[str, str] = field(default_factory=lambda: LLAMA_GGUF_LAYER_NAMES)

    def __post_init__(self) -> None:
        if self.sliding_window not in ("always", "flag", "never"):
            raise ValueError(f"{self.name}: sliding_window must be 'always', 'flag' or 'never', "
                             f"got {self.sliding_window!r}")

    def hf_name(self, gguf_name: str) -> str | None:
        """The HF name of a llama.cpp tensor name (`blk.3.attn_q.weight` ->
        `model.layers.3.self_attn.q_proj.weight`), or None if this architecture has no such
        tensor. A fused tensor keeps its stored (fused) HF name: `split_name` splits it."""
        m = re.fullmatch(r"(?:blk\.(\d+)\.)?(\w+)\.(weight|bias)", gguf_name)
        if m is None:
            return None
        layer, base, kind = m.groups()
        if layer is None:
            return f"{GGUF_GLOBAL_NAMES[base]}.{kind}" if base in GGUF_GLOBAL_NAMES else None
        if base not in self.gguf_layer_names:
            return None
        return f"model.layers.{int(layer)}.{self.gguf_layer_names[base]}.{kind}"

    def split_name(self, name: str) -> tuple[str, ...] | None:
        """The canonical names stacked in the stored tensor `name`, in row order, or None when
        `name` is no fused tensor of this architecture."""
        m = _LAYER_RE.fullmatch(name)
        if m is None:
            return None
        layer, rest, kind = m.groups()
        for fused in self.hf_fused:
            if fused.stored == rest:
                return tuple(f"model.layers.{layer}.{p}.{kind}" for p in fused.parts)
        return None
