"""Qwen3 dense: per-head RMSNorm of q and k before RoPE (`self_attn.q_norm` / `k_norm`; GGUF
`attn_q_norm` / `attn_k_norm`), explicit head_dim; NeoX-style RoPE in llama.cpp (no Q/K
permutation)."""

from llm.model.arch.spec import Architecture

QWEN3 = Architecture(
    name="qwen3",
    hf_model_types=("qwen3",),
    hf_classes=("Qwen3ForCausalLM",),
    gguf_archs=("qwen3",),
    hf_model_type_out="qwen3",
    qk_norm=True,
    sliding_window="flag",
    hf_writes_attention_bias=True,
)
