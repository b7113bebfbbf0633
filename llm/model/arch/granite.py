"""Granite 3.x: Llama's layer with four multipliers (HF `embedding_multiplier`,
`residual_multiplier`, `attention_multiplier`, `logits_scaling`; GGUF `granite.embedding_scale`,
`.residual_scale`, `.attention.scale`, `.logit_scale`); llama.cpp converts it as Llama (Q/K
permuted)."""

from llm.model.arch.spec import Architecture

GRANITE = Architecture(
    name="granite",
    hf_model_types=("granite",),
    hf_classes=("GraniteForCausalLM",),
    gguf_archs=("granite",),
    hf_model_type_out="granite",
    multipliers=True,
    hf_writes_attention_bias=True,
    hf_writes_mlp_bias=True,
    gguf_permuted_qk=True,
)
