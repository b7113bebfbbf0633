"""Llama 2/3 (and SmolLM, which is a Llama): the plain layer every other family varies."""

from llm.model.arch.spec import Architecture

LLAMA = Architecture(
    name="llama",
    hf_model_types=("llama",),
    hf_classes=("LlamaForCausalLM",),
    gguf_archs=("llama",),
    hf_model_type_out="llama",
    hf_writes_attention_bias=True,
    hf_writes_mlp_bias=True,
    gguf_permuted_qk=True,
)

# Some exports name SmolLM's own model_type; its weights and config are Llama's.
SMOLLM = Architecture(
    name="smollm",
    hf_model_types=("smollm",),
    hf_classes=(),
    gguf_archs=("smollm",),
    hf_model_type_out="llama",
    hf_writes_attention_bias=True,
    hf_writes_mlp_bias=True,
    gguf_permuted_qk=True,
)
