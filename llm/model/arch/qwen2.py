"""Qwen2 / Qwen2.5: q/k/v biases (o_proj none); NeoX-style RoPE in llama.cpp, so its GGUF Q/K
rows are stored unpermuted."""

from llm.model.arch.spec import Architecture

QWEN2 = Architecture(
    name="qwen2",
    hf_model_types=("qwen2",),
    hf_classes=("Qwen2ForCausalLM",),
    gguf_archs=("qwen2",),
    hf_model_type_out="qwen2",
    qkv_bias=True,
    attention_bias_on_o=False,
    sliding_window="flag",
)
