"""Mistral 7B and Mistral-Nemo: Llama's layer, a sliding window in the config, an explicit
head_dim (Nemo). llama.cpp writes their GGUFs as `llama` (which `llama.py` claims)."""

from llm.model.arch.spec import Architecture

MISTRAL = Architecture(
    name="mistral",
    hf_model_types=("mistral",),
    hf_classes=("MistralForCausalLM",),
    gguf_archs=("mistral",),
    hf_model_type_out="mistral",
    sliding_window="always",
    gguf_permuted_qk=True,
)
