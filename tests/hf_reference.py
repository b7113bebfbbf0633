"""Small random transformers models as the reference of the module and model tests, the PCC
metric, and the check that an output matches the reference in shape and in scale."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import (
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from llm.model.checkpoint.fused import canonical_index
from llm.model.config import ModelConfig, RopeScaling

_BASE = dict(vocab_size=320, hidden_size=64, intermediate_size=160, num_layers=2, num_heads=4,
             num_kv_heads=2, head_dim=16, max_position_embeddings=512, rms_norm_eps=1e-5,
             rope_theta=10000.0, bos_token_id=1, eos_token_ids=(2,))

# name -> ModelConfig; together they cover GQA and MHA, tied and untied embeddings, Qwen2 q/k/v
# bias, Granite's four multipliers (of granite-3.x's kind, tied embeddings as there), Qwen3 q/k
# head norms (with head_dim 32 != hidden / heads = 16, as Qwen3 checkpoints have), Mistral with
# an explicit head_dim 32 != hidden / heads = 16 (as Mistral-Nemo: 5120 / 32 heads, head_dim 128),
# llama3 RoPE scaling, an explicit head_dim != hidden / heads, odd head counts (9 q / 3 kv), and
# Phi-3 (fused qkv_proj / gate_up_proj in the checkpoint) plain and with LongRoPE: original context
# 16, so that the 23-token prompt of the model tests rotates with the long factors, the 9-token
# one (14 tokens with its decode steps) with the short ones; and Phi-4-mini's kind: RoPE on 12 of
# each head's 16 dims (partial_rotary_factor 0.75) with LongRoPE, tied embeddings.
SMALL_CONFIGS = {
    "llama_gqa": ModelConfig(arch="llama", **_BASE),
    "llama_mha_tied": ModelConfig(arch="llama", **{**_BASE, "num_kv_heads": 4},
                                  tie_word_embeddings=True),
    "qwen2_bias": ModelConfig(arch="qwen2", **_BASE, qkv_bias=True),
    "qwen3_qk_norm": ModelConfig(arch="qwen3", **{**_BASE, "head_dim": 32}, qk_norm=True),
    "granite_scaled": ModelConfig(arch="granite", **_BASE, tie_word_embeddings=True,
                                  embedding_multiplier=12.0, residual_multiplier=0.22,
                                  attention_multiplier=0.015625, logits_scaling=8.0),
    "mistral_nemo_headdim": ModelConfig(arch="mistral", **{**_BASE, "head_dim": 32}),
    "llama3_rope": ModelConfig(
        arch="llama", **{**_BASE, "rope_theta": 500000.0},
        rope_scaling=RopeScaling(
            "llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=64)),
    "odd_heads_headdim": ModelConfig(arch="llama", **{**_BASE, "num_heads": 9, "num_kv_heads": 3,
                                                      "head_dim": 16, "hidden_size": 72}),
    "phi3_fused": ModelConfig(arch="phi3", **_BASE),
    "phi3_longrope": ModelConfig(arch="phi3", **_BASE, rope_scaling=RopeScaling(
        "longrope", original_max_position_embeddings=16,
        short_factor=(1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.1, 3.8),
        long_factor=(1.0, 1.4, 2.2, 3.5, 5.0, 8.0, 12.0, 20.0),
        attention_factor=1.1908)),
    "phi4_mini_partial": ModelConfig(arch="phi3", **_BASE, tie_word_embeddings=True,
                                     partial_rotary_dim=12, rope_scaling=RopeScaling(
        "longrope", original_max_position_embeddings=16,
        short_factor=(1.0, 1.2, 1.5, 2.0, 2.6, 3.3), long_factor=(1.0, 2.0, 4.0, 7.0, 11.0, 16.0),
        attention_factor=1.1908)),
}


def hf_model(config: ModelConfig, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A transformers model with random weights (norms and biases randomised too), eval mode."""
    torch.manual_seed(seed)
    d = config.to_hf_dict()
    d.pop("model_type")
    if config.arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**d, attn_implementation="eager"))
    elif config.arch == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**d, attn_implementation="eager"))
    elif config.arch == "mistral":
        model = MistralForCausalLM(MistralConfig(**d, attn_implementation="eager"))
    elif config.arch == "granite":
        model = GraniteForCausalLM(GraniteConfig(**d, attn_implementation="eager"))
    elif config.arch == "phi3":
        model = Phi3ForCausalLM(Phi3Config(**d, attn_implementation="eager"))
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
    """Canonical tensors (HF names) of a transformers model, tied lm_head dropped, a fused
    tensor's parts (Phi-3's qkv_proj, gate_up_proj) split as the loader splits them."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    config = ModelConfig.from_hf_dict(model.config.to_dict())
    if not config.spec.hf_fused:
        return sd
    parts, _, _ = canonical_index(config, {k: tuple(v.shape) for k, v in sd.items()},
                                  dict.fromkeys(sd, "the transformers model"))
    return {name: sd[p.name] if p.rows is None else sd[p.name][slice(*p.rows)].clone()
            for name, p in parts.items()}


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


# torch.testing.assert_close tolerances (rtol, atol) of fp32 outputs against fp32 transformers.
# Measured (SMALL_CONFIGS): max |ours - ref| 1.7e-6 on logits of magnitude ~3 (max relative error
# 1.1e-6) on the CPU, 2.0e-6 on CUDA (H200), under 5e-7 on module outputs; 2.2e-6 between
# tensor-parallel ranks and one process. A 1% scale error fails every element larger than
# atol / (0.01 - rtol) ~ 1e-3.
FP32_CLOSE = (1e-4, 1e-5)


@dataclass(frozen=True)
class Tolerance:
    """How closely an output has to match its transformers reference.

    PCC sees the shape of an output but is blind to its scale: a 1% gain error leaves it at
    1.0. So a Tolerance also bounds what PCC cannot see: in fp32, `close` = (rtol, atol) for
    torch.testing.assert_close; in low precision, where rounding noise is itself of the order of
    1% of the output, `max_rel` bounds max|ours - ref| / max|ref| (an error in one weight shows
    here) and `gain` bounds |g - 1|, g = <ours, ref> / <ref, ref> the least-squares scale of ours
    on ref (a scale error shows here: rounding noise barely moves g, a 1% scale error moves it by
    0.01).
    """

    pcc: float
    close: tuple[float, float] | None = None
    max_rel: float | None = None
    gain: float | None = None


def fp32(pcc_min: float) -> Tolerance:
    """The fp32 tolerance: PCC and torch.testing.assert_close with FP32_CLOSE."""
    return Tolerance(pcc_min, close=FP32_CLOSE)


def errors(ours: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max|ours - ref| / max|ref|, <ours, ref> / <ref, ref> - 1), in float64."""
    a = ours.detach().cpu().double().flatten()
    b = ref.detach().cpu().double().flatten()
    max_rel = float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))
    return max_rel, float((a @ b) / (b @ b).clamp_min(1e-300)) - 1


def assert_matches(ours: torch.Tensor, ref: torch.Tensor, tol: Tolerance,
                   what: object = None) -> None:
    """Assert that `ours` matches `ref` (same shape) within `tol`; `what` names the comparison
    in the failure message."""
    where = "" if what is None else f" ({what})"
    assert ours.shape == ref.shape, f"shape {tuple(ours.shape)} != {tuple(ref.shape)}{where}"
    p = pcc(ours, ref)
    assert p >= tol.pcc, f"PCC {p:.6f} < {tol.pcc}{where}"
    if tol.close is not None:
        rtol, atol = tol.close
        torch.testing.assert_close(ours.detach().cpu().double(), ref.detach().cpu().double(),
                                   rtol=rtol, atol=atol, msg=lambda m: m + where)
    max_rel, gain = errors(ours, ref)
    if tol.max_rel is not None:
        assert max_rel <= tol.max_rel, f"max relative error {max_rel:.3g} > {tol.max_rel}{where}"
    if tol.gain is not None:
        assert abs(gain) <= tol.gain, f"gain error {gain:+.3g} beyond {tol.gain}{where}"


def check_failures(outputs, tol: Tolerance) -> list[str]:
    """For planted-error tests: asserts that PCC alone passes every (what, ours, ref) of
    `outputs`, and returns assert_matches' message for each one that fails the full check."""
    failed = []
    for what, ours, ref in outputs:
        assert pcc(ours, ref) >= tol.pcc, f"PCC alone fails ({what})"
        try:
            assert_matches(ours, ref, tol, what)
        except AssertionError as e:
            failed.append(str(e))
    return failed
