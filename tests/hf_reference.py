"""Small random transformers models for PCC tests, and the PCC metric."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from llm.model.config import ModelConfig, RopeScaling

_BASE = dict(vocab_size=320, hidden_size=64, intermediate_size=160, num_layers=2, num_heads=4,
             num_kv_heads=2, head_dim=16, max_position_embeddings=512, rms_norm_eps=1e-5,
             rope_theta=10000.0, bos_token_id=1, eos_token_ids=(2,))

# name -> ModelConfig; together they cover GQA and MHA, tied and untied embeddings, Qwen2 q/k/v
# bias, llama3 RoPE scaling, an explicit head_dim != hidden / heads, and odd head counts (9 q / 3
# kv).
SMALL_CONFIGS = {
    "llama_gqa": ModelConfig(arch="llama", **_BASE),
    "llama_mha_tied": ModelConfig(arch="llama", **{**_BASE, "num_kv_heads": 4},
                                  tie_word_embeddings=True),
    "qwen2_bias": ModelConfig(arch="qwen2", **_BASE, qkv_bias=True),
    "llama3_rope": ModelConfig(
        arch="llama", **{**_BASE, "rope_theta": 500000.0},
        rope_scaling=RopeScaling(
            "llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=64)),
    "odd_heads_headdim": ModelConfig(arch="llama", **{**_BASE, "num_heads": 9, "num_kv_heads": 3,
                                                      "head_dim": 16, "hidden_size": 72}),
}


def hf_model(config: ModelConfig, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A transformers model with random weights (norms and biases randomised too), eval mode."""
    torch.manual_seed(seed)
    d = config.to_hf_dict()
    d.pop("model_type")
    if config.arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**d, attn_implementation="eager"))
    else:
        model = LlamaForCausalLM(LlamaConfig(**d, attn_implementation="eager"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
    rotary = model.model.rotary_emb
    inv_freq = rotary.inv_freq.clone()
    model = model.to(dtype).eval()
    rotary.inv_freq = inv_freq  # RoPE frequencies stay fp32, as from_pretrained keeps them
    return model


def state_dict(model) -> dict[str, torch.Tensor]:
    """Canonical tensors (HF names) of a transformers model, tied lm_head dropped."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


def pcc(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of the flattened tensors, in float64."""
    a = a.detach().double().flatten()
    b = b.detach().double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / (a.norm() * b.norm()).clamp_min(1e-300))


def causal_mask(s: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive causal mask [1, 1, S, S] for eager transformers attention."""
    m = torch.full((s, s), torch.finfo(dtype).min, dtype=dtype).triu(1)
    return m[None, None]
