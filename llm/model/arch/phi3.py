"""Phi-3 / Phi-3.5 / Phi-4-mini: Llama's layer with q/k/v stacked in one `self_attn.qkv_proj`
and gate/up in one `mlp.gate_up_proj` (split at load into the canonical tensors), LongRoPE
("su" / "longrope") scaling, a sliding window in the config. llama.cpp writes `attn_qkv` and a
2 x intermediate `ffn_up` (gate rows first), NeoX-style RoPE (no Q/K permutation), and the
LongRoPE factors as the tensors `rope_factors_long` / `rope_factors_short`. Phi-4-mini rotates
only part of each head (partial_rotary_factor 0.75: `ModelConfig.partial_rotary_dim`)."""

from types import MappingProxyType

from llm.model.arch.spec import LLAMA_GGUF_LAYER_NAMES, Architecture, Fused

_GGUF_LAYER_NAMES = {k: v for k, v in LLAMA_GGUF_LAYER_NAMES.items() if k != "ffn_gate"}
_GGUF_LAYER_NAMES.update({"attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"})

PHI3 = Architecture(
    name="phi3",
    hf_model_types=("phi3",),
    hf_classes=("Phi3ForCausalLM",),
    gguf_archs=("phi3",),
    hf_model_type_out="phi3",
    sliding_window="always",
    hf_fused=(
        Fused("self_attn.qkv_proj", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        Fused("mlp.gate_up_proj", ("mlp.gate_proj", "mlp.up_proj")),
    ),
    gguf_layer_names=MappingProxyType(_GGUF_LAYER_NAMES),
)
