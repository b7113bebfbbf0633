"""Checkpoint loading: HF safetensors directories, GGUF files, the conversion cache, bad inputs.

Small random models from transformers are the reference for HF directories; GGUF files are written
here with `gguf.GGUFWriter` the way llama.cpp's converter writes them (Q/K permuted for llama). One
test compares the real default model against transformers' own GGUF loader (~30 s).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import gguf
import numpy as np
import pytest
import safetensors.torch
import torch
import transformers

from llm.model.checkpoint.common import Checkpoint, CheckpointError, expected_tensors
from llm.model.checkpoint.gguf_cache import cache_path
from llm.model.checkpoint.hf import save_hf_checkpoint
from llm.model.checkpoint.load import load_checkpoint
from llm.model.config import ConfigError, ModelConfig
from llm.model.files import file_sha256
from llm.model.paths import default_cache_dir, default_model_path
from llm.model.quant.tensor import QuantizedTensor

SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)

# llama.cpp tensor names, written independently of the loader's table.
GGUF_NAMES = {
    "model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up",  # Phi-3's fused ones
}
# Granite test models: multipliers of granite-3.x's kind.
GRANITE_MULTIPLIERS = dict(embedding_multiplier=12.0, residual_multiplier=0.22,
                           attention_multiplier=0.015625, logits_scaling=8.0)
# Qwen3 test models: head_dim 32 != hidden / heads = 16, as in the real Qwen3 checkpoints.
QWEN3_HEAD_DIM = 32
# Phi-3 test models: LongRoPE over an original context of 64 (8 factors for head_dim 16).
PHI3_ROPE = dict(original_max_position_embeddings=64, rope_scaling={
    "rope_type": "longrope", "short_factor": [round(1.0 + 0.1 * i, 2) for i in range(8)],
    "long_factor": [1.0 + 2.0 * i for i in range(8)]})


def hf_model(arch: str = "llama", tie: bool = False, seed: int = 0) -> transformers.PreTrainedModel:
    """A small random transformers model with every parameter (norms included) random."""
    torch.manual_seed(seed)
    if arch == "qwen2":
        model = transformers.Qwen2ForCausalLM(
            transformers.Qwen2Config(**SMALL, tie_word_embeddings=tie))
    elif arch == "qwen3":
        model = transformers.Qwen3ForCausalLM(
            transformers.Qwen3Config(**SMALL, head_dim=QWEN3_HEAD_DIM, tie_word_embeddings=tie))
    elif arch == "granite":
        model = transformers.GraniteForCausalLM(transformers.GraniteConfig(
            **SMALL, tie_word_embeddings=tie, **GRANITE_MULTIPLIERS))
    elif arch == "phi3":
        model = transformers.Phi3ForCausalLM(transformers.Phi3Config(
            **SMALL, tie_word_embeddings=tie, pad_token_id=None, **PHI3_ROPE))
    elif arch == "phi4_mini":  # Phi-3 with RoPE on 12 of 16 dims
        model = transformers.Phi3ForCausalLM(transformers.Phi3Config(
            **SMALL, tie_word_embeddings=tie, pad_token_id=None, partial_rotary_factor=0.75,
            original_max_position_embeddings=64, rope_scaling={
                "rope_type": "longrope", "short_factor": [1.0, 1.1, 1.2, 1.3, 1.4, 1.5],
                "long_factor": [1.0, 3.0, 5.0, 7.0, 9.0, 11.0]}))
    else:
        model = transformers.LlamaForCausalLM(
            transformers.LlamaConfig(**SMALL, tie_word_embeddings=tie))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return model


def hf_state(model: transformers.PreTrainedModel) -> dict[str, torch.Tensor]:
    """A transformers model's tensors as canonical ones: a tied lm_head dropped, Phi-3's fused
    qkv_proj / gate_up_proj split into q/k/v and gate/up (written here independently of the
    loader: q, k, v and gate, up are stacked in that order along the rows)."""
    state = {k: v for k, v in model.state_dict().items()
             if not (k == "lm_head.weight" and model.config.tie_word_embeddings)}
    c = model.config
    head_dim = c.hidden_size // c.num_attention_heads
    q, kv = c.num_attention_heads * head_dim, c.num_key_value_heads * head_dim
    for name in [n for n in state if n.endswith(("qkv_proj.weight", "gate_up_proj.weight"))]:
        w, prefix = state.pop(name), name.rsplit(".", 2)[0]
        if name.endswith("qkv_proj.weight"):
            parts = dict(zip(("q_proj", "k_proj", "v_proj"), w.split([q, kv, kv])))
        else:
            parts = dict(zip(("gate_proj", "up_proj"), w.chunk(2)))
        state |= {f"{prefix}.{p}.weight": t for p, t in parts.items()}
    return state


def assert_same(tensors: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    assert sorted(tensors) == sorted(reference)
    for name, ref in reference.items():
        assert tensors[name].dtype == ref.dtype, name
        assert torch.equal(tensors[name], ref), name


def gguf_name(hf: str) -> str:
    base, kind = hf.rsplit(".", 1)
    if base.startswith("model.layers."):
        layer, rest = base[len("model.layers."):].split(".", 1)
        return f"blk.{layer}.{GGUF_NAMES[rest]}.{kind}"
    return f"{GGUF_NAMES[base]}.{kind}"


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of Q/K rows (HF rotate-half -> interleaved)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def write_gguf(path: Path, config: ModelConfig, tensors: dict[str, torch.Tensor], *,
               qtype: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.F32,
               arch: str | None = None, extra: dict[str, np.ndarray] | None = None,
               blocks: dict[str, tuple[np.ndarray, gguf.GGMLQuantizationType]] | None = None
               ) -> Path:
    """Write a GGUF like llama.cpp would: llama and granite Q/K permuted, matrices in `qtype`,
    vectors F32. blocks: matrices given as raw ggml blocks of a type (uint8 [rows, bytes], e.g.
    K-quants, which gguf cannot quantize), written as they are, in place of `tensors`' ones."""
    arch = arch or config.arch
    if arch == "phi3":
        tensors = phi3_fused(config, tensors)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(config.num_layers)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_heads)
    w.add_head_count_kv(config.num_kv_heads)
    if config.head_dim != config.hidden_size // config.num_heads:
        w.add_key_length(config.head_dim)
        w.add_value_length(config.head_dim)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_rope_freq_base(config.rope_theta)
    w.add_vocab_size(config.vocab_size)
    if config.bos_token_id is not None:
        w.add_bos_token_id(config.bos_token_id)
    if config.eos_token_ids:
        w.add_eos_token_id(config.eos_token_ids[0])
    rs = config.rope_scaling
    if arch == "phi3":  # as llama.cpp's Phi3MiniModel writes it
        w.add_rope_dimension_count(config.rotary_dim)
        w.add_sliding_window(config.sliding_window or 0)
        w.add_rope_scaling_orig_ctx_len(rs.original_max_position_embeddings if rs else
                                        config.max_position_embeddings)
    if rs is not None and rs.rope_type == "longrope":
        w.add_rope_scaling_attn_factors(rs.attention_factor)
        extra = {**(extra or {}),
                 "rope_factors_long.weight": np.array(rs.long_factor, dtype=np.float32),
                 "rope_factors_short.weight": np.array(rs.short_factor, dtype=np.float32)}
    if config.scaled:  # Granite, as llama.cpp's converter writes its multipliers
        w.add_embedding_scale(config.embedding_multiplier)
        w.add_residual_scale(config.residual_multiplier)
        w.add_attention_scale(config.attention_scale)
        w.add_logit_scale(config.logits_scaling)
    for name, t in tensors.items():
        if name in (blocks or {}):
            continue
        a = t.float().numpy()
        if arch in ("llama", "granite") and ".q_proj." in name:
            a = llama_cpp_permute(a, config.num_heads)
        elif arch in ("llama", "granite") and ".k_proj." in name:
            a = llama_cpp_permute(a, config.num_kv_heads)
        if a.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(gguf_name(name), a)
        elif qtype == gguf.GGMLQuantizationType.F16:
            w.add_tensor(gguf_name(name), a.astype(np.float16))
        else:
            w.add_tensor(gguf_name(name), gguf.quants.quantize(a, qtype), raw_dtype=qtype)
    for name, (raw, raw_type) in (blocks or {}).items():
        w.add_tensor(gguf_name(name), raw, raw_dtype=raw_type)
    for name, a in (extra or {}).items():
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def phi3_fused(config: ModelConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Canonical tensors stacked as llama.cpp stores Phi-3: q, k, v rows in one qkv_proj, gate
    and up rows in one gate_up_proj, per layer, in the place of the first part."""
    out = {}
    for name, t in tensors.items():
        prefix, kind = name.rsplit(".", 2)[0], name.rsplit(".", 1)[1]
        if name.endswith(".q_proj.weight"):
            out[f"{prefix}.qkv_proj.{kind}"] = torch.cat(
                [t, tensors[f"{prefix}.k_proj.{kind}"], tensors[f"{prefix}.v_proj.{kind}"]])
        elif name.endswith(".gate_proj.weight"):
            up = tensors[f"{prefix}.up_proj.{kind}"]
            out[f"{prefix}.gate_up_proj.{kind}"] = torch.cat([t, up])
        elif not name.endswith((".k_proj.weight", ".v_proj.weight", ".up_proj.weight")):
            out[name] = t
    return out


def gguf_like_llama_cpp(tmp_path: Path, name: str, config: ModelConfig,
                        tensors: dict[str, torch.Tensor]) -> Checkpoint:
    """`tensors` written to a GGUF as llama.cpp writes `config`'s architecture (Mistral as
    `llama`), loaded back; its config must be the one it was written from."""
    from dataclasses import replace

    arch = "llama" if config.arch == "mistral" else config.arch
    path = write_gguf(tmp_path / f"{name}.gguf", config, tensors, arch=arch)
    ck = load_checkpoint(path, cache_dir=tmp_path / "cache", progress=False)
    assert ck.config == replace(config, arch=arch)
    return ck


def hf_dir(tmp_path: Path, model: transformers.PreTrainedModel, **save_kw) -> Path:
    d = tmp_path / "hf"
    model.save_pretrained(d, **save_kw)
    return d


def tiny_gguf(tmp_path: Path, arch: str = "llama", tie: bool = False, seed: int = 0,
              name: str = "tiny.gguf", **kw) -> tuple[Path, Checkpoint]:
    """A GGUF of a small random model, and the HF checkpoint it was made from."""
    ref = load_checkpoint(hf_dir(tmp_path / f"src{seed}", hf_model(arch, tie, seed)),
                          progress=False)
    return write_gguf(tmp_path / name, ref.config, ref.tensors, **kw), ref


def cache_files(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


# ---------------------------------------------------------------- HF safetensors directories
@pytest.mark.parametrize(("arch", "tie", "shard", "dtype"), [
    ("llama", False, None, torch.float32),
    ("llama", True, "100KB", torch.float32),
    ("llama", False, "60KB", torch.bfloat16),
    ("qwen2", False, "100KB", torch.float32),
    ("qwen3", True, "100KB", torch.bfloat16),
    ("granite", True, None, torch.float32),
    ("phi3", False, "100KB", torch.float32),
    ("phi3", True, None, torch.bfloat16),
    ("phi4_mini", True, None, torch.float32),
])
def test_hf_directory_matches_transformers_state_dict(tmp_path, arch, tie, shard, dtype):
    model = hf_model(arch, tie).to(dtype)
    d = hf_dir(tmp_path, model, **({"max_shard_size": shard} if shard else {}))
    assert (d / "model.safetensors.index.json").exists() == bool(shard)
    ck = load_checkpoint(d, progress=False)
    assert ck.source == d.resolve()
    assert_same(ck.tensors, hf_state(model))
    assert list(ck.tensors) == list(expected_tensors(ck.config))
    head_dim = QWEN3_HEAD_DIM if arch == "qwen3" else 16
    assert (ck.config.arch, ck.config.num_kv_heads, ck.config.head_dim) == (
        "phi3" if arch == "phi4_mini" else arch, 2, head_dim)
    assert ck.config.rotary_dim == (12 if arch == "phi4_mini" else head_dim)
    assert ck.config.tie_word_embeddings == tie
    assert ck.config.qkv_bias == (arch == "qwen2")
    assert ck.config.qk_norm == (arch == "qwen3")
    assert ck.config.scaled == (arch == "granite")
    if arch == "granite":
        assert (ck.config.embedding_multiplier, ck.config.residual_multiplier,
                ck.config.attention_multiplier, ck.config.logits_scaling) == tuple(
                    GRANITE_MULTIPLIERS.values())
    if arch == "phi3":
        rs = ck.config.rope_scaling
        assert rs.rope_type == "longrope" and rs.original_max_position_embeddings == 64
        assert list(rs.long_factor) == PHI3_ROPE["rope_scaling"]["long_factor"]


def test_tied_model_with_saved_lm_head_is_accepted(tmp_path):
    model = hf_model(tie=True)
    d = hf_dir(tmp_path, model)
    state = hf_state(model)
    safetensors.torch.save_file({**state, "lm_head.weight": state["model.embed_tokens.weight"]
                                 .clone()}, str(d / "model.safetensors"))
    assert_same(load_checkpoint(d, progress=False).tensors, state)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "granite", "phi3"])
def test_save_hf_checkpoint_round_trip_and_transformers_reads_it(tmp_path, arch):
    ref = load_checkpoint(hf_dir(tmp_path, hf_model(arch)), progress=False)
    out = tmp_path / "saved"
    save_hf_checkpoint(out, ref.config, ref.tensors, shard_size_bytes=50_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    ck = load_checkpoint(out, progress=False)
    assert ck.config == ref.config
    assert_same(ck.tensors, ref.tensors)
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.config.model_type == arch
    assert_same(hf_state(model), ref.tensors)


def test_expected_tensors_of_default_model_config():
    cfg = ModelConfig(arch="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                      num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
                      max_position_embeddings=8192, tie_word_embeddings=True)
    shapes = expected_tensors(cfg)
    assert len(shapes) == 272
    assert "lm_head.weight" not in shapes
    assert shapes["model.layers.29.self_attn.k_proj.weight"] == (192, 576)
    assert shapes["model.layers.0.mlp.down_proj.weight"] == (576, 1536)
    assert sum(int(np.prod(s)) for s in shapes.values()) == 134_515_008
    qwen = ModelConfig(arch="qwen2", vocab_size=10, hidden_size=8, intermediate_size=16,
                       num_layers=1, num_heads=2, num_kv_heads=1, head_dim=4,
                       max_position_embeddings=32, qkv_bias=True)
    assert expected_tensors(qwen)["model.layers.0.self_attn.k_proj.bias"] == (4,)
    assert expected_tensors(qwen)["lm_head.weight"] == (10, 8)


# ---------------------------------------------------------------- GGUF
@pytest.mark.parametrize(("arch", "tie"), [("llama", False), ("llama", True), ("qwen2", False),
                                         ("qwen3", False), ("qwen3", True), ("phi3", False),
                                         ("phi3", True), ("phi4_mini", True)])
def test_gguf_f32_gives_exact_hf_layout(tmp_path, arch, tie):
    path, ref = tiny_gguf(tmp_path, arch, tie)
    ck = load_checkpoint(path, cache_dir=tmp_path / "cache", progress=False)
    assert ck.source == path.resolve()
    assert ck.config == ref.config  # GGUF metadata decodes to the same config as config.json
    assert_same(ck.tensors, ref.tensors)


def test_phi3_gguf_stored_quantized_parts_are_the_rows_of_the_fused_tensors(tmp_path):
    """Q8_0 kept as stored: q/k/v and gate/up are row ranges of attn_qkv / ffn_up, equal to the
    dequantized load's tensors (which the F32 test ties to transformers)."""
    path, ref = tiny_gguf(tmp_path, "phi3", qtype=gguf.GGMLQuantizationType.Q8_0)
    dense = load_checkpoint(path, cache_dir=tmp_path / "cache", progress=False)
    stored = load_checkpoint(path, cache_dir=tmp_path / "cache", progress=False,
                             weights="stored")
    assert list(stored.tensors) == list(dense.tensors) == list(expected_tensors(ref.config))
    q = stored.tensors["model.layers.1.self_attn.k_proj.weight"]
    assert isinstance(q, QuantizedTensor) and q.shape == (32, 64)
    for name, t in stored.tensors.items():
        got = t.dequantize() if isinstance(t, QuantizedTensor) else t
        assert torch.equal(got.float(), dense.tensors[name]), name


def test_phi3_fused_tensor_of_wrong_rows_names_it(tmp_path):
    model = hf_model("phi3")
    d = hf_dir(tmp_path, model)
    state = dict(model.state_dict())
    name = "model.layers.1.self_attn.qkv_proj.weight"
    state[name] = state[name][:-16].clone()
    safetensors.torch.save_file(state, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=re.escape(
            f"tensor {name!r} in {d / 'model.safetensors'} has shape [112, 64], expected "
            "[128, 64] (model.layers.1.self_attn.q_proj.weight + ")):
        load_checkpoint(d, progress=False)


def test_phi3_tensor_stored_fused_and_alone_is_refused(tmp_path):
    model = hf_model("phi3")
    d = hf_dir(tmp_path, model)
    state = dict(model.state_dict())
    state["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(32, 64)
    safetensors.torch.save_file(state, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=re.escape(
            "tensor 'model.layers.0.self_attn.k_proj.weight' is stored twice: as ")) as e:
        load_checkpoint(d, progress=False)
    assert "'model.layers.0.self_attn.qkv_proj.weight' in " in str(e.value)


def test_gguf_f16_keeps_float16(tmp_path):
    path, ref = tiny_gguf(tmp_path, qtype=gguf.GGMLQuantizationType.F16)
    ck = load_checkpoint(path, cache_dir=tmp_path / "cache", progress=False)
    for name, t in ck.tensors.items():
        want = ref.tensors[name].half() if t.ndim == 2 else ref.tensors[name]
        assert t.dtype == want.dtype, name
        assert torch.equal(t, want), name


def test_gguf_q8_0_is_close_to_hf_layout(tmp_path):
    path, ref = tiny_gguf(tmp_path, qtype=gguf.GGMLQuantizationType.Q8_0)
    ck = load_checkpoint(path, cache_dir=tmp_path / "cache", progress=False)
    assert sorted(ck.tensors) == sorted(ref.tensors)
    for name, want in ref.tensors.items():
        got = ck.tensors[name]
        assert got.dtype == torch.float32
        if want.ndim == 1:
            assert torch.equal(got, want), name
        else:  # Q8_0: 127 levels per block of 32, fp16 scale -> error ~ half a step
            step = want.abs().reshape(want.shape[0], -1, 32).amax(-1, keepdim=True) / 127
            err = (got - want).abs().reshape(step.shape[0], -1, 32)
            assert (err <= step * 0.6).all(), name
            assert not torch.equal(got, want)


def test_gguf_rope_freqs_go_into_config_not_tensors(tmp_path):
    freqs = np.linspace(1.0, 8.0, 8, dtype=np.float32)  # head_dim 16 -> 8 frequencies
    path, ref = tiny_gguf(tmp_path, extra={"rope_freqs.weight": freqs})
    cache = tmp_path / "cache"
    ck = load_checkpoint(path, cache_dir=cache, progress=False)
    assert ck.config.rope_scaling.rope_type == "freq_factors"
    assert ck.config.rope_scaling.freq_factors == tuple(freqs.tolist())
    assert_same(ck.tensors, ref.tensors)
    assert load_checkpoint(path, cache_dir=cache, progress=False).config == ck.config


# ---------------------------------------------------------------- the GGUF cache
def test_second_load_hits_cache_without_reading_gguf(tmp_path, monkeypatch):
    path, ref = tiny_gguf(tmp_path)
    cache = tmp_path / "cache"
    first = load_checkpoint(path, cache_dir=cache, progress=False)
    assert cache_files(cache) == [cache_path(cache, file_sha256(path)).name]

    def forbidden(*args, **kwargs):
        raise AssertionError("GGUF parsed or dequantized on a cache hit")

    monkeypatch.setattr(gguf, "GGUFReader", forbidden)
    monkeypatch.setattr(gguf.quants, "dequantize", forbidden)
    second = load_checkpoint(path, cache_dir=cache, progress=False)
    assert second.config == first.config
    assert_same(second.tensors, ref.tensors)


def test_changed_gguf_gets_a_new_cache_key(tmp_path):
    cache = tmp_path / "cache"
    path, _ = tiny_gguf(tmp_path, seed=0)
    load_checkpoint(path, cache_dir=cache, progress=False)
    _, ref1 = tiny_gguf(tmp_path, seed=1)  # same path, other weights
    ck = load_checkpoint(path, cache_dir=cache, progress=False)
    assert_same(ck.tensors, ref1.tensors)
    assert len(cache_files(cache)) == 2


@pytest.mark.parametrize("exc", [KeyboardInterrupt, OSError])
def test_interrupted_cache_write_leaves_nothing(tmp_path, monkeypatch, exc):
    path, _ = tiny_gguf(tmp_path)
    cache = tmp_path / "cache"
    real_save = safetensors.torch.save_file

    def interrupted(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:  # half-written, then interrupted
            f.truncate(Path(filename).stat().st_size // 2)
        raise exc("interrupted")

    monkeypatch.setattr(safetensors.torch, "save_file", interrupted)
    if exc is KeyboardInterrupt:
        with pytest.raises(KeyboardInterrupt):
            load_checkpoint(path, cache_dir=cache, progress=False)
    else:  # a failing cache write (full disk) is not fatal: the weights are still returned
        assert load_checkpoint(path, cache_dir=cache, progress=False).tensors
    assert cache_files(cache) == []


@pytest.mark.parametrize("damage", ["truncate", "garbage", "wrong_tensors", "wrong_key", "nan"])
def test_corrupt_cache_entry_is_rebuilt(tmp_path, damage, caplog):
    path, ref = tiny_gguf(tmp_path)
    cache = tmp_path / "cache"
    load_checkpoint(path, cache_dir=cache, progress=False)
    entry = cache_path(cache, file_sha256(path))
    if damage == "truncate":
        entry.write_bytes(entry.read_bytes()[:-100])
    elif damage == "garbage":
        entry.write_bytes(b"not a safetensors file" * 10)
    else:
        with safetensors.safe_open(str(entry), "pt") as f:
            meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
        if damage == "wrong_tensors":
            del tensors["model.layers.1.mlp.up_proj.weight"]
        elif damage == "nan":  # flipped bits: the entry reads, its values do not
            tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
        else:
            meta["source_sha256"] = "0" * 64
        safetensors.torch.save_file(tensors, str(entry), metadata=meta)
    with caplog.at_level(logging.WARNING):
        ck = load_checkpoint(path, cache_dir=cache, progress=False)
    assert "rebuilding" in caplog.text
    assert entry.name in caplog.text
    assert_same(ck.tensors, ref.tensors)
    assert cache_files(cache) == [entry.name]
    assert_same(load_checkpoint(path, cache_dir=cache, progress=False).tensors, ref.tensors)


@pytest.mark.parametrize("weights", ["dequantize", "stored"])
@pytest.mark.parametrize("damage", ["flipped_bit", "no_checksums"])
def test_cache_entry_checksums(tmp_path, caplog, weights, damage):
    """A flipped bit in a tensor's bytes reads as a valid value (a quantized code, a finite float):
    the entry's crc32s catch it, and the warning names the tensor; an entry without them (an
    older version's) is rebuilt too."""
    path, ref = tiny_gguf(tmp_path, qtype=gguf.GGMLQuantizationType.Q4_0)
    cache = tmp_path / "cache"
    first = load_checkpoint(path, cache_dir=cache, progress=False, weights=weights)
    entry = cache_path(cache, file_sha256(path), stored=weights == "stored")
    with safetensors.safe_open(str(entry), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    name = next(k for k in tensors if "layers.1.mlp.up_proj" in k and "scale" not in k)
    if damage == "flipped_bit":
        raw = tensors[name].reshape(-1).view(torch.uint8)
        raw[7] ^= 1  # the lowest bit of one byte: a code, or a float's last mantissa bit
        assert torch.isfinite(tensors[name].float()).all()
    else:
        del meta["llm.crc32"]
    safetensors.torch.save_file(tensors, str(entry), metadata=meta)
    with caplog.at_level(logging.WARNING):
        ck = load_checkpoint(path, cache_dir=cache, progress=False, weights=weights)
    assert "rebuilding" in caplog.text and entry.name in caplog.text
    assert (f"tensor {name!r} fails its crc32 check" if damage == "flipped_bit"
            else "no tensor checksums") in caplog.text
    for key, want in first.tensors.items():
        got = ck.tensors[key]
        assert torch.equal(got.dequantize() if isinstance(got, QuantizedTensor) else got,
                           want.dequantize() if isinstance(want, QuantizedTensor) else want), key
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        load_checkpoint(path, cache_dir=cache, progress=False, weights=weights)
    assert "rebuilding" not in caplog.text


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("LLM_WEIGHTS_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("LLM_WEIGHTS_CACHE")
    repo_cache = Path(__file__).resolve().parent.parent / "weights_cache"
    assert default_cache_dir() == (repo_cache if repo_cache.is_dir()
                                   else Path.home() / ".cache" / "llm")


# ---------------------------------------------------------------- bad inputs
def bad_hf_dir(tmp_path: Path, edit) -> Path:
    """An HF directory whose model.safetensors holds `edit(state_dict)`."""
    model = hf_model()
    d = hf_dir(tmp_path, model)
    state = {k: v.clone() for k, v in hf_state(model).items()}
    edit(state)
    safetensors.torch.save_file(state, str(d / "model.safetensors"))
    return d


@pytest.mark.parametrize(("edit", "message"), [
    (lambda s: s.pop("model.layers.1.mlp.up_proj.weight"),
     "missing tensor 'model.layers.1.mlp.up_proj.weight' (expected shape [96, 64]) in {dir}"),
    (lambda s: s.update({"model.layers.0.self_attn.q_norm.weight": torch.ones(16)}),
     "unexpected tensor 'model.layers.0.self_attn.q_norm.weight' in {file}"),
    (lambda s: s.update({"model.layers.0.self_attn.o_proj.weight": torch.ones(64, 32)}),
     "tensor 'model.layers.0.self_attn.o_proj.weight' in {file} has shape [64, 32], "
     "expected [64, 64]"),
    (lambda s: s.update({"model.norm.weight": torch.ones(64, dtype=torch.int32)}),
     "tensor 'model.norm.weight' has dtype torch.int32"),
])
def test_hf_tensor_mismatch_names_tensor_and_file(tmp_path, edit, message):
    d = bad_hf_dir(tmp_path, edit).resolve()
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(d, progress=False)
    assert message.format(dir=d, file=d / "model.safetensors") in str(e.value)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_safetensors_is_a_checkpoint_error(tmp_path, damage):
    d = hf_dir(tmp_path, hf_model(), max_shard_size="100KB").resolve()
    shard = sorted(d.glob("model-*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes({"truncate": data[:-1000], "garbage": b"\x00\x01junk" * 100,
                       "empty": b""}[damage])
    with pytest.raises(CheckpointError, match="cannot read safetensors file") as e:
        load_checkpoint(d, progress=False)
    assert str(shard) in str(e.value)


def test_sharded_index_inconsistencies(tmp_path):
    d = hf_dir(tmp_path, hf_model(), max_shard_size="100KB").resolve()
    index_file = d / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    good = index["weight_map"]["model.norm.weight"]
    index["weight_map"]["model.norm.weight"] = "model-00009-of-00009.safetensors"
    index_file.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="shard files that do not exist"):
        load_checkpoint(d, progress=False)
    index["weight_map"]["model.norm.weight"] = good
    index["weight_map"]["model.layers.0.self_attn.q_norm.weight"] = good
    index_file.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=re.escape("lists tensor 'model.layers.0.self_attn")):
        load_checkpoint(d, progress=False)


@pytest.mark.parametrize("as_file", [False, True])
def test_pickle_checkpoints_are_refused(tmp_path, monkeypatch, as_file):
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    d = tmp_path / "old"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    (d / "consolidated.pth").write_bytes(b"\x80\x04")
    target = d / "consolidated.pth" if as_file else d
    with pytest.raises(CheckpointError, match="convert them to safetensors") as e:
        load_checkpoint(target, progress=False)
    assert "consolidated.pth" in str(e.value)
    assert as_file or "pytorch_model.bin" in str(e.value)


def test_unknown_architecture_is_a_config_error(tmp_path):
    d = hf_dir(tmp_path, hf_model())
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(ConfigError, match=re.escape("unknown architecture model_type='gpt2'")):
        load_checkpoint(d, progress=False)
    cache = tmp_path / "cache"
    src = load_checkpoint(hf_dir(tmp_path / "src", hf_model()), progress=False)
    path = write_gguf(tmp_path / "gpt2.gguf", src.config, src.tensors, arch="gpt2")
    with pytest.raises(ConfigError, match=re.escape("general.architecture='gpt2'")):
        load_checkpoint(path, cache_dir=cache, progress=False)
    assert cache_files(cache) == []


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no such file or directory"):
        load_checkpoint(tmp_path / "nope", progress=False)
    with pytest.raises(CheckpointError, match=re.escape("no model.safetensors or model.safe")):
        load_checkpoint(tmp_path, progress=False)
    (tmp_path / "w.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="pass its directory"):
        load_checkpoint(tmp_path / "w.safetensors", progress=False)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_gguf_is_a_checkpoint_error(tmp_path, damage):
    path, _ = tiny_gguf(tmp_path)
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) * 2 // 3], "garbage": b"GGUF" + b"\xff" * 999,
                      "empty": b""}[damage])
    cache = tmp_path / "cache"
    want = "truncated GGUF file: tensor '.*' needs bytes up to" if damage == "truncate" else (
        "cannot read GGUF file")
    with pytest.raises(CheckpointError, match=want) as e:
        load_checkpoint(path, cache_dir=cache, progress=False)
    assert str(path.resolve()) in str(e.value)
    assert cache_files(cache) == []


def test_gguf_tensor_of_an_unknown_type_is_named(tmp_path):
    """A tensor of a GGML type the gguf package does not know (31: the removed Q4_0_4_4) names
    the tensor and the type, not "corrupt or truncated?"."""
    path, _ = tiny_gguf(tmp_path)
    reader = gguf.GGUFReader(path)
    tensor = reader.tensors[-1]
    raw_type = tensor.field.parts[4]  # the tensor info's type, a view of the file's bytes
    at = raw_type.ctypes.data - reader.data.ctypes.data
    del reader, raw_type
    data = bytearray(path.read_bytes())
    data[at:at + 4] = np.uint32(31).tobytes()
    path.write_bytes(bytes(data))
    cache = tmp_path / "cache"
    with pytest.raises(CheckpointError, match=re.escape(
            f"tensor {tensor.name!r} has GGML type 31, which the gguf package")):
        load_checkpoint(path, cache_dir=cache, progress=False)
    assert cache_files(cache) == []


def test_gguf_tensor_mismatch_names_tensor_and_file(tmp_path):
    src = load_checkpoint(hf_dir(tmp_path, hf_model()), progress=False)
    cache = tmp_path / "cache"
    t = dict(src.tensors)
    del t["model.layers.1.mlp.up_proj.weight"]
    t["model.layers.0.post_attention_layernorm.weight"] = torch.ones(65)
    path = write_gguf(tmp_path / "bad.gguf", src.config, t,
                      extra={"blk.0.attn_q_norm.weight": np.ones(16, np.float32),
                             "blk.0.attn_foo.weight": np.ones(16, np.float32)}).resolve()
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path, cache_dir=cache, progress=False)
    msg = str(e.value)
    assert f"missing tensor 'model.layers.1.mlp.up_proj.weight' (expected shape [96, 64]) " \
           f"in {path}" in msg
    assert f"unexpected tensor 'blk.0.attn_foo.weight' in {path}" in msg
    assert (f"unexpected tensor 'model.layers.0.self_attn.q_norm.weight' in {path} "
            "(GGUF tensor 'blk.0.attn_q_norm.weight')") in msg  # a Qwen3 tensor in a llama file
    assert (f"tensor 'model.layers.0.post_attention_layernorm.weight' in {path} "
            "(GGUF tensor 'blk.0.ffn_norm.weight') has shape [65], expected [64]") in msg
    assert cache_files(cache) == []


def test_qwen3_gguf_without_k_norm_names_the_tensor(tmp_path):
    src = load_checkpoint(hf_dir(tmp_path, hf_model("qwen3")), progress=False)
    t = dict(src.tensors)
    del t["model.layers.1.self_attn.k_norm.weight"]
    path = write_gguf(tmp_path / "bad.gguf", src.config, t).resolve()
    with pytest.raises(CheckpointError, match=re.escape(
            f"missing tensor 'model.layers.1.self_attn.k_norm.weight' (expected shape "
            f"[{QWEN3_HEAD_DIM}]) in {path}")):
        load_checkpoint(path, cache_dir=tmp_path / "cache", progress=False)


# ---------------------------------------------------------------- the real default model
@pytest.fixture(scope="module")
def default_checkpoint(tmp_path_factory) -> Checkpoint:
    return load_checkpoint(default_model_path(), cache_dir=tmp_path_factory.mktemp("cache"),
                           progress=False)


def test_default_model_config_facts(default_checkpoint):
    c = default_checkpoint.config
    assert default_checkpoint.source.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert (c.arch, c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim) == \
        ("llama", 30, 576, 9, 3, 64)
    assert (c.intermediate_size, c.vocab_size, c.max_position_embeddings) == (1536, 49152, 8192)
    assert (c.rms_norm_eps, c.rope_theta, c.rope_scaling) == (1e-5, 1e5, None)
    assert c.tie_word_embeddings
    assert not (c.qkv_bias or c.o_bias or c.mlp_bias)
    assert (c.bos_token_id, c.eos_token_ids) == (1, (2,))
    assert sum(t.numel() for t in default_checkpoint.tensors.values()) == 134_515_008


def test_default_model_matches_transformers_gguf_loader(default_checkpoint, hf_default_model):
    """transformers dequantizes and un-permutes the GGUF itself: every tensor must be identical."""
    theirs = hf_default_model[0].state_dict()
    for name, tensor in default_checkpoint.tensors.items():
        assert torch.equal(tensor, theirs[name]), name


# ---------------------------------------------------------------- non-finite weights
def test_a_nan_or_inf_weight_is_a_checkpoint_error_naming_the_tensor(tmp_path):
    model = hf_model("llama", False)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[2, 7] = float("inf")
    d = hf_dir(tmp_path, model)
    with pytest.raises(CheckpointError, match=r"tensor 'model\.layers\.1\.mlp\.down_proj"
                                              r"\.weight' holds a non-finite value.*corrupt"):
        load_checkpoint(d, progress=False)
    ref = load_checkpoint(hf_dir(tmp_path / "ok", hf_model("llama", False)), progress=False)
    tensors = dict(ref.tensors)
    q = tensors["model.layers.0.self_attn.q_proj.weight"].clone()
    q[0, 0] = float("nan")
    tensors["model.layers.0.self_attn.q_proj.weight"] = q
    cache = tmp_path / "cache"
    path = write_gguf(tmp_path / "nan.gguf", ref.config, tensors)
    for weights in ("dequantize", "stored"):
        with pytest.raises(CheckpointError, match=r"nan\.gguf: tensor 'model\.layers\.0\."
                                                  r"self_attn\.q_proj\.weight'"):
            load_checkpoint(path, cache_dir=cache, progress=False, weights=weights)
    assert not [n for n in cache_files(cache) if "safetensors" in n]  # nothing cached


def test_a_nan_scale_of_a_quantized_tensor_is_named_with_its_plane(tmp_path):
    from llm.model.checkpoint.common import check_finite
    from llm.model.quant.quantize import quantize_int8

    q = quantize_int8(torch.randn(8, 64))
    planes = {k: v.clone() for k, v in q.planes.items()}
    scale = next(k for k, v in planes.items() if v.is_floating_point())
    planes[scale][3, 0] = float("nan")
    bad = type(q)(q.format, q.shape, planes)
    with pytest.raises(CheckpointError, match=f"tensor 'w' \\(plane '{scale}'\\) holds a "
                                              "non-finite value"):
        check_finite({"ok": q, "w": bad}, Path("x"))
