"""ModelConfig from Hugging Face config.json dicts and GGUF metadata; clear errors."""

from __future__ import annotations

import json
import math

import pytest

from llm.model.config import ConfigError, ModelConfig, RopeScaling, RuntimeConfig

LLAMA3 = {
    "model_type": "llama", "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
    "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "tie_word_embeddings": True, "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
    "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
}


def test_llama3_config() -> None:
    c = ModelConfig.from_hf_dict(LLAMA3)
    assert (c.num_heads, c.num_kv_heads, c.head_dim, c.group_size) == (32, 8, 64, 4)
    assert c.rope_scaling == RopeScaling("llama3", 32.0, 1.0, 4.0, 8192)
    assert c.tie_word_embeddings and not c.qkv_bias
    assert c.eos_token_ids == (128001, 128008, 128009)


def test_qwen2_has_qkv_bias_and_mistral_window_caps_context() -> None:
    qwen = {**LLAMA3, "model_type": "qwen2", "rope_scaling": None, "use_sliding_window": False,
            "sliding_window": 4096}
    c = ModelConfig.from_hf_dict(qwen)
    assert c.qkv_bias and not c.o_bias and c.sliding_window is None
    mistral = {**LLAMA3, "model_type": "mistral", "rope_scaling": None, "sliding_window": 4096,
               "max_position_embeddings": 32768, "head_dim": 128}
    m = ModelConfig.from_hf_dict(mistral)
    assert m.max_context == 4096 and m.head_dim == 128


def test_explicit_head_dim_and_default_kv_heads() -> None:
    d = {**LLAMA3, "head_dim": 128}
    d.pop("num_key_value_heads")
    c = ModelConfig.from_hf_dict(d)
    assert c.head_dim == 128 and c.num_kv_heads == 32 and c.q_size == 4096


@pytest.mark.parametrize("change, message", [
    ({"model_type": "gpt2"}, "unknown architecture model_type='gpt2'"),
    ({"hidden_size": None}, "missing field 'hidden_size'"),
    ({"num_key_value_heads": 5}, "must be a multiple of num_kv_heads"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling type 'yarn'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "missing field 'low_freq_factor'"),
])
def test_bad_hf_configs(change, message) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ModelConfig.from_hf_dict({**LLAMA3, **change}, source="x/config.json")


def test_from_hf_dir_errors_name_the_file(tmp_path) -> None:
    with pytest.raises(ConfigError, match="no config.json"):
        ModelConfig.from_hf_dir(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        ModelConfig.from_hf_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(LLAMA3))
    assert ModelConfig.from_hf_dir(tmp_path).num_layers == 16


GGUF_META = {
    "general.architecture": "llama", "llama.block_count": 30, "llama.context_length": 8192,
    "llama.embedding_length": 576, "llama.feed_forward_length": 1536,
    "llama.attention.head_count": 9, "llama.attention.head_count_kv": 3,
    "llama.rope.freq_base": 100000.0, "llama.attention.layer_norm_rms_epsilon": 1e-5,
    "llama.vocab_size": 49152, "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
}


def test_gguf_metadata() -> None:
    c = ModelConfig.from_gguf(GGUF_META, {"token_embd.weight"})
    assert c.tie_word_embeddings and c.head_dim == 64 and c.eos_token_ids == (2,)
    c2 = ModelConfig.from_gguf(GGUF_META, {"output.weight", "blk.0.attn_q.bias"},
                               rope_freq_factors=(1.0,) * 32)
    assert not c2.tie_word_embeddings and c2.qkv_bias
    llama3 = ModelConfig.from_gguf({**GGUF_META, "tokenizer.ggml.eot_token_id": 128009}, set())
    assert llama3.eos_token_ids == (2, 128009)
    assert c2.rope_scaling.rope_type == "freq_factors"
    with pytest.raises(ConfigError, match="missing metadata key 'llama.block_count'"):
        ModelConfig.from_gguf({k: v for k, v in GGUF_META.items() if k != "llama.block_count"},
                              set(), source="m.gguf")
    with pytest.raises(ConfigError, match="unknown architecture general.architecture='falcon'"):
        ModelConfig.from_gguf({**GGUF_META, "general.architecture": "falcon"}, set())


def test_to_hf_dict_round_trips() -> None:
    c = ModelConfig.from_hf_dict(LLAMA3)
    assert ModelConfig.from_hf_dict(c.to_hf_dict()) == c
    m = ModelConfig.from_hf_dict({**LLAMA3, "model_type": "mistral", "rope_scaling": None,
                                  "sliding_window": 4096})
    assert ModelConfig.from_hf_dict(m.to_hf_dict()) == m


def test_transformers5_rope_parameters(tmp_path) -> None:
    """transformers >= 5 saves theta and scaling under rope_parameters only."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                      rope_theta=500000.0, rope_scaling=LLAMA3["rope_scaling"])
    cfg.save_pretrained(tmp_path)
    c = ModelConfig.from_hf_dir(tmp_path)
    assert c.rope_theta == 500000.0
    assert c.rope_scaling == RopeScaling("llama3", 32.0, 1.0, 4.0, 8192)


def test_runtime_config_validation() -> None:
    rt = RuntimeConfig(max_batch=4, max_seq_len=100, block_size=32)
    assert rt.blocks_per_seq == 4 and rt.total_blocks == 17  # + the padding page
    with pytest.raises(ConfigError, match="dtype must be"):
        RuntimeConfig(dtype="int8")
    with pytest.raises(ConfigError, match="max_batch must be a positive integer"):
        RuntimeConfig(max_batch=0)


QWEN3 = {  # Qwen3-0.6B's config.json (transformers 5 layout), head_dim 128 != 1024 / 16
    "model_type": "qwen3", "vocab_size": 151936, "hidden_size": 1024, "intermediate_size": 3072,
    "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8,
    "head_dim": 128, "max_position_embeddings": 40960, "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
    "attention_bias": False, "use_sliding_window": False, "sliding_window": None,
    "tie_word_embeddings": True, "bos_token_id": 151643, "eos_token_id": 151645,
}


def test_qwen3_has_qk_norm_from_hf_and_gguf() -> None:
    c = ModelConfig.from_hf_dict(QWEN3)
    assert c.qk_norm and not c.qkv_bias and not c.o_bias
    assert (c.head_dim, c.q_size, c.rope_theta) == (128, 2048, 1000000.0)
    assert ModelConfig.from_hf_dict(c.to_hf_dict()) == c
    biased = ModelConfig.from_hf_dict({**QWEN3, "attention_bias": True})
    assert biased.qkv_bias and biased.o_bias and biased.qk_norm
    assert not ModelConfig.from_hf_dict({**QWEN3, "model_type": "qwen2"}).qk_norm
    meta = {k.replace("llama.", "qwen3."): v for k, v in GGUF_META.items()}
    meta |= {"general.architecture": "qwen3", "qwen3.attention.key_length": 128}
    g = ModelConfig.from_gguf(meta, {"token_embd.weight", "blk.0.attn_q_norm.weight"})
    assert g.qk_norm and g.head_dim == 128 and not g.qkv_bias
    assert not ModelConfig.from_gguf(GGUF_META, {"token_embd.weight"}).qk_norm


def test_qk_norm_of_another_architecture_is_refused_in_config_json() -> None:
    c = ModelConfig.from_hf_dict(QWEN3)
    with pytest.raises(ConfigError, match="a qwen3 config.json cannot express qk_norm=False"):
        ModelConfig(**{**c.__dict__, "qk_norm": False}).to_hf_dict()
    with pytest.raises(ConfigError, match="a llama config.json cannot express qk_norm=True"):
        ModelConfig(**{**c.__dict__, "arch": "llama"}).to_hf_dict()


GRANITE = {  # granite-3.1-2b-instruct's config.json, the fields this engine reads
    "model_type": "granite", "vocab_size": 49155, "hidden_size": 2048, "intermediate_size": 8192,
    "num_hidden_layers": 40, "num_attention_heads": 32, "num_key_value_heads": 8,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 5000000.0,
    "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": True,
    "embedding_multiplier": 12.0, "residual_multiplier": 0.22, "attention_multiplier": 0.015625,
    "logits_scaling": 8.0, "bos_token_id": 0, "eos_token_id": 0,
}


def test_granite_multipliers_from_hf_and_gguf() -> None:
    c = ModelConfig.from_hf_dict(GRANITE)
    assert (c.embedding_multiplier, c.residual_multiplier, c.attention_multiplier,
            c.logits_scaling) == (12.0, 0.22, 0.015625, 8.0)
    assert c.scaled and c.attention_scale == 0.015625 and c.head_dim == 64
    assert ModelConfig.from_hf_dict(c.to_hf_dict()) == c
    llama = ModelConfig.from_hf_dict({**GRANITE, "model_type": "llama"})  # reads no multiplier
    assert not llama.scaled and llama.attention_scale == 64 ** -0.5
    meta = {k.replace("llama.", "granite."): v for k, v in GGUF_META.items()}
    meta |= {"general.architecture": "granite", "granite.embedding_scale": 12.0,
             "granite.residual_scale": 0.22, "granite.attention.scale": 0.015625,
             "granite.logit_scale": 8.0}
    g = ModelConfig.from_gguf(meta, {"token_embd.weight"})
    assert (g.embedding_multiplier, g.residual_multiplier, g.attention_scale,
            g.logits_scaling) == (12.0, 0.22, 0.015625, 8.0)
    plain = ModelConfig.from_gguf({**meta, "granite.attention.scale": 0.0}, {"token_embd.weight"})
    assert plain.attention_multiplier is None and plain.attention_scale == g.head_dim ** -0.5
    assert not ModelConfig.from_gguf(GGUF_META, {"token_embd.weight"}).scaled


def test_multipliers_of_another_architecture_are_refused() -> None:
    c = ModelConfig.from_hf_dict(GRANITE)
    with pytest.raises(ConfigError, match="llama has no embedding / residual / attention / logits"):
        ModelConfig(**{**c.__dict__, "arch": "llama"})
    with pytest.raises(ConfigError, match="logits_scaling must not be 0"):
        ModelConfig(**{**c.__dict__, "logits_scaling": 0.0})


# Phi-3-mini-128k-instruct's config.json, the fields this engine reads (its 48 LongRoPE factors
# replaced by made-up ones of the same count and kind).
PHI3_128K = {
    "model_type": "phi3", "architectures": ["Phi3ForCausalLM"], "vocab_size": 32064,
    "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 131072,
    "original_max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "rope_scaling": {"type": "longrope", "short_factor": [1.0 + i / 100 for i in range(48)],
                     "long_factor": [1.0 + i for i in range(48)]},
    "sliding_window": 262144, "tie_word_embeddings": False, "hidden_act": "silu",
    "bos_token_id": 1, "eos_token_id": 32000, "pad_token_id": 32000,
}


def test_phi3_longrope_from_hf() -> None:
    c = ModelConfig.from_hf_dict(PHI3_128K)
    assert c.arch == "phi3" and (c.head_dim, c.num_kv_heads) == (96, 32)
    rs = c.rope_scaling
    assert rs.rope_type == "longrope" and rs.original_max_position_embeddings == 4096
    assert rs.short_factor[1] == 1.01 and rs.long_factor[47] == 48.0 and len(rs.long_factor) == 48
    assert rs.attention_factor == pytest.approx(math.sqrt(1 + math.log(32) / math.log(4096)))
    assert c.attention_scale == pytest.approx(96 ** -0.5 * rs.attention_factor ** 2)
    assert not rs.uses_long(4096) and rs.uses_long(4097)
    assert c.sliding_window == 262144 and c.max_context == 131072
    assert not (c.qkv_bias or c.o_bias or c.mlp_bias or c.qk_norm or c.scaled)
    assert ModelConfig.from_hf_dict(c.to_hf_dict()) == c
    su = ModelConfig.from_hf_dict({**PHI3_128K, "rope_scaling": {**PHI3_128K["rope_scaling"],
                                                                 "type": "su"}})
    assert su == c
    explicit = {**PHI3_128K["rope_scaling"], "attention_factor": 1.5}
    assert ModelConfig.from_hf_dict({**PHI3_128K, "rope_scaling": explicit}) \
        .rope_scaling.attention_factor == 1.5
    no_model_type = {k: v for k, v in PHI3_128K.items() if k != "model_type"}
    assert ModelConfig.from_hf_dict(no_model_type) == c  # by its architectures class


def test_phi3_written_by_transformers_5_reads_the_same() -> None:
    """transformers 5 moves rope_theta and the scaling into rope_parameters (and keeps
    original_max_position_embeddings at the top level too)."""
    from transformers import Phi3Config

    d = {k: v for k, v in PHI3_128K.items() if k not in ("model_type", "architectures")}
    written = Phi3Config(**d).to_dict()
    assert "rope_parameters" in written
    assert ModelConfig.from_hf_dict(written) == ModelConfig.from_hf_dict(PHI3_128K)


def test_phi3_4k_without_scaling_keeps_its_window() -> None:
    c = ModelConfig.from_hf_dict({**PHI3_128K, "max_position_embeddings": 4096,
                                  "rope_scaling": None, "sliding_window": 2047})
    assert c.rope_scaling is None and c.max_context == 2047


def test_phi4_mini_partial_rotary() -> None:
    """Phi-4-mini: head_dim 128, RoPE on 96 of its dims (48 LongRoPE factors); the GGUF says it
    as rope.dimension_count."""
    phi4_mini = {**PHI3_128K, "num_attention_heads": 24, "num_key_value_heads": 8,
                 "partial_rotary_factor": 0.75, "tie_word_embeddings": True}
    c = ModelConfig.from_hf_dict(phi4_mini)
    assert (c.head_dim, c.rotary_dim, c.partial_rotary_dim) == (128, 96, 96)
    assert c.attention_scale == 128 ** -0.5  # the factor stays on the rotary dims' cos/sin
    assert ModelConfig.from_hf_dict(c.to_hf_dict()) == c
    meta = {**PHI3_GGUF_META, "phi3.attention.head_count": 24, "phi3.attention.head_count_kv": 8}
    factors = (c.rope_scaling.long_factor, c.rope_scaling.short_factor)
    assert ModelConfig.from_gguf(meta, {"blk.0.attn_qkv.weight"}, rope_long_short=factors) == c
    with pytest.raises(ConfigError, match="partial rotation of Q/K rows llama.cpp permuted"):
        ModelConfig.from_gguf({**GGUF_META, "llama.rope.dimension_count": 32}, set())
    whole = ModelConfig.from_hf_dict({**phi4_mini, "partial_rotary_factor": 1.0,
                                      "rope_scaling": None})
    assert whole.partial_rotary_dim is None and whole.rotary_dim == 128
    with pytest.raises(ConfigError, match="partial_rotary_dim must be even and in"):
        ModelConfig.from_hf_dict({**phi4_mini, "partial_rotary_factor": 0.7, "rope_scaling": None})


def test_bad_longrope_is_refused() -> None:
    short = {**PHI3_128K["rope_scaling"], "short_factor": [1.0] * 47, "long_factor": [1.0] * 47}
    with pytest.raises(ConfigError, match="47 values, expected rotary dims / 2 = 48"):
        ModelConfig.from_hf_dict({**PHI3_128K, "rope_scaling": short})
    no_long = {k: v for k, v in PHI3_128K["rope_scaling"].items() if k != "long_factor"}
    with pytest.raises(ConfigError, match="'longrope' is missing field 'long_factor'"):
        ModelConfig.from_hf_dict({**PHI3_128K, "rope_scaling": no_long})
    with pytest.raises(ConfigError, match="a phi3 config.json cannot express qkv_bias=True"):
        ModelConfig(**{**ModelConfig.from_hf_dict(PHI3_128K).__dict__, "qkv_bias": True}) \
            .to_hf_dict()


PHI3_GGUF_META = {  # as llama.cpp's converter writes Phi-3-mini-128k
    "general.architecture": "phi3", "phi3.block_count": 32, "phi3.context_length": 131072,
    "phi3.rope.scaling.original_context_length": 4096, "phi3.embedding_length": 3072,
    "phi3.feed_forward_length": 8192, "phi3.attention.head_count": 32,
    "phi3.attention.head_count_kv": 32, "phi3.attention.layer_norm_rms_epsilon": 1e-5,
    "phi3.rope.dimension_count": 96, "phi3.rope.freq_base": 10000.0,
    "phi3.attention.sliding_window": 262144, "phi3.rope.scaling.attn_factor": 1.1902380,
    "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 32000,
    "phi3.vocab_size": 32064,
}


def test_phi3_longrope_from_gguf() -> None:
    hf = ModelConfig.from_hf_dict(PHI3_128K)
    factors = (hf.rope_scaling.long_factor, hf.rope_scaling.short_factor)
    g = ModelConfig.from_gguf(PHI3_GGUF_META, {"output.weight", "blk.0.attn_qkv.weight"},
                              rope_long_short=factors)
    assert g == hf  # the file's float32 attn_factor is the default: exactly the default
    other = ModelConfig.from_gguf({**PHI3_GGUF_META, "phi3.rope.scaling.attn_factor": 1.5},
                                  {"output.weight"}, rope_long_short=factors)
    assert other.rope_scaling.attention_factor == 1.5
    meta = {k: v for k, v in PHI3_GGUF_META.items()
            if k != "phi3.rope.scaling.original_context_length"}
    with pytest.raises(ConfigError, match="no 'phi3.rope.scaling.original_context_length'"):
        ModelConfig.from_gguf(meta, {"output.weight"}, rope_long_short=factors)
