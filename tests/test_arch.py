"""The architecture registry (llm.model.arch): every name claimed once, lookups, llama.cpp name
tables, fused tensors; and that no code outside it tells architectures apart by name."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from llm.model.arch import ARCHITECTURES, architecture, for_gguf, for_hf

ROOT = Path(__file__).resolve().parent.parent


def test_every_name_finds_its_architecture() -> None:
    assert len({a.name for a in ARCHITECTURES}) == len(ARCHITECTURES)
    for a in ARCHITECTURES:
        assert architecture(a.name) is a
        assert all(for_hf(t) is a for t in a.hf_model_types), a.name
        assert all(for_gguf(g) is a for g in a.gguf_archs), a.name
        assert for_hf(a.hf_model_type_out) is not None, a.name  # to_hf_dict writes a known one
    assert architecture("gpt2") is None and for_hf("gpt2") is None and for_gguf("gpt2") is None


def test_hf_architectures_field_stands_in_for_a_missing_model_type() -> None:
    assert for_hf(None, ["Phi3ForCausalLM"]).name == "phi3"
    assert for_hf(None, ["Qwen3ForCausalLM"]).name == "qwen3"
    assert for_hf(None, ["GPT2LMHeadModel"]) is None
    assert for_hf(None, ["LlamaForCausalLM", "Qwen3ForCausalLM"]) is None  # ambiguous
    assert for_hf("llama", ["Qwen3ForCausalLM"]).name == "llama"  # model_type decides


@pytest.mark.parametrize(("arch", "gguf_name", "hf_name"), [
    ("llama", "token_embd.weight", "model.embed_tokens.weight"),
    ("llama", "output.weight", "lm_head.weight"),
    ("llama", "blk.3.attn_q.weight", "model.layers.3.self_attn.q_proj.weight"),
    ("qwen2", "blk.0.attn_k.bias", "model.layers.0.self_attn.k_proj.bias"),
    ("qwen3", "blk.1.attn_k_norm.weight", "model.layers.1.self_attn.k_norm.weight"),
    ("llama", "blk.0.ffn_up.weight", "model.layers.0.mlp.up_proj.weight"),
    ("phi3", "blk.0.ffn_up.weight", "model.layers.0.mlp.gate_up_proj.weight"),
    ("phi3", "blk.2.attn_qkv.weight", "model.layers.2.self_attn.qkv_proj.weight"),
    ("phi3", "blk.2.attn_q.weight", "model.layers.2.self_attn.q_proj.weight"),
    ("phi3", "blk.0.ffn_gate.weight", None),  # llama.cpp's phi3 has gate and up in ffn_up
    ("llama", "blk.0.attn_qkv.weight", None),
    ("llama", "rope_freqs.weight", None),
    ("llama", "not a name", None),
])
def test_llama_cpp_names(arch: str, gguf_name: str, hf_name: str | None) -> None:
    assert architecture(arch).hf_name(gguf_name) == hf_name


def test_fused_tensors_name_their_parts_in_row_order() -> None:
    phi3 = architecture("phi3")
    assert phi3.split_name("model.layers.4.self_attn.qkv_proj.weight") == tuple(
        f"model.layers.4.self_attn.{p}_proj.weight" for p in "qkv")
    assert phi3.split_name("model.layers.0.mlp.gate_up_proj.bias") == (
        "model.layers.0.mlp.gate_proj.bias", "model.layers.0.mlp.up_proj.bias")
    assert phi3.split_name("model.layers.0.self_attn.q_proj.weight") is None
    assert architecture("llama").split_name("model.layers.0.self_attn.qkv_proj.weight") is None


def _string_constants(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)
            and isinstance(n.value, str)}


def test_no_code_outside_the_registry_names_an_architecture() -> None:
    """Architectures differ through their `Architecture` and the ModelConfig switches it sets,
    never through comparisons with their names elsewhere (the tokenizer's vocabulary and
    pre-tokenizer names, some of which are model names too, are not architectures)."""
    names = {n for a in ARCHITECTURES
             for n in (a.name, *a.hf_model_types, *a.gguf_archs, a.hf_model_type_out)}
    skip = (ROOT / "llm/model/arch", ROOT / "llm/model/tokenizer")
    found = {}
    for path in (ROOT / "llm").rglob("*.py"):
        if any(path.is_relative_to(s) for s in skip):
            continue
        hits = _string_constants(path) & names
        if hits:
            found[str(path.relative_to(ROOT))] = sorted(hits)
    assert not found, found
