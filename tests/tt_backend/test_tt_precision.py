"""Precision policies and per-decoder overrides (tt_transformers' DecodersPrecision and its
decoder config files): the policies' formats, parsing and validation of overrides, and a model
built with overrides putting each decoder's weights, KV cache and compute kernels in that
decoder's formats."""

from __future__ import annotations

import json

import pytest
import torch
from hf_reference import assert_matches, hf_model, state_dict
from tt_helpers import RUNTIME, TOLERANCE, TT_CONFIGS, build_parts, ints

import llm.ttnn_emu as ttnn
from llm.backends.tt.model import Transformer
from llm.backends.tt.op_configs import OpConfigs, TTConfigError
from llm.backends.tt.precision import (
    PRESETS,
    SMALL_MODEL_PRESET,
    default_overrides,
    num_params,
    parse_overrides,
    precision,
)
from llm.backends.tt.runner import TTBackend, open_mesh
from llm.model.checkpoint.common import Checkpoint

BF16, BF8, BF4 = ttnn.bfloat16, ttnn.bfloat8_b, ttnn.bfloat4_b


def formats(d) -> tuple:
    return (d.wqkv, d.wo, d.w1, d.w3, d.w2, d.kv_cache, d.prefill_q, d.mlp_product)


def test_policies_without_overrides() -> None:
    perf = precision(ttnn, "performance", 4)
    assert len(perf.decoders) == 4 and perf.overridden == ()
    assert all(d == perf.decoder(0) for d in perf.decoders)
    d = perf.decoder(0)
    assert formats(d) == (BF8, BF8, BF4, BF4, BF8, BF8, BF8, BF8)
    assert (d.fidelity["w1"], d.fidelity["w3"], d.fidelity["w2"], d.fidelity["wqkv"],
            d.fidelity["sdpa_prefill"]) == ("lofi", "lofi", "hifi2", "hifi2", "hifi4")
    assert (perf.lm_head, perf.lm_head_fidelity) == (BF8, "hifi2")
    acc = precision(ttnn, "accuracy", 2)
    assert formats(acc.decoder(1)) == (BF16,) * 8 and acc.lm_head == BF16
    assert set(acc.decoder(0).fidelity.values()) == {"hifi4"}
    with pytest.raises(ValueError, match="unknown precision policy 'fast'"):
        precision(ttnn, "fast", 2)


def test_presets() -> None:
    last = precision(ttnn, "performance", 5, "bf8-mlp-last-decoder")
    assert last.overridden == (4,)
    assert [d.w1 for d in last.decoders] == [BF4] * 4 + [BF8]
    assert last.decoder(4).w3 == BF8 and last.decoder(4).fidelity["w1"] == "hifi2_fp16"
    assert last.decoder(4).w2 == BF8 and last.decoder(4).kv_cache == BF8
    sens = precision(ttnn, "performance", 3, "bf16-attention-bf8-mlp")
    assert sens.overridden == (0, 1, 2)
    for d in sens.decoders:
        assert formats(d) == (BF16, BF16, BF8, BF8, BF8, BF16, BF8, BF8)
        assert {d.fidelity[g] for g in ("wqkv", "wo", "sdpa_prefill", "sdpa_decode")} == {"hifi4"}
    assert sens.lm_head == BF8


def test_all_then_index_and_json_file(tmp_path) -> None:
    spec = {"decoders": {"1": {"precision": {"w1": "bf16"}, "fidelity": {"w1": "hifi4"}},
                         "all": {"precision": {"w1": "bf8", "w3": "bf8"}}}}
    p = precision(ttnn, "performance", 3, spec)
    assert [d.w1 for d in p.decoders] == [BF8, BF16, BF8]
    assert [d.w3 for d in p.decoders] == [BF8, BF8, BF8]
    assert [d.fidelity["w1"] for d in p.decoders] == ["lofi", "hifi4", "lofi"]
    file = tmp_path / "performance_decoder_config.json"
    file.write_text(json.dumps(spec))
    assert precision(ttnn, "performance", 3, file) == p
    assert precision(ttnn, "performance", 3, str(file)) == p
    assert parse_overrides(None, 3) == {}
    broken = tmp_path / "broken.json"
    broken.write_text("{bad")
    with pytest.raises(ValueError, match="decoder precision file '.*broken.json': Expecting"):
        parse_overrides(broken, 3)
    assert set(PRESETS) == {"bf8-mlp-last-decoder", "bf16-attention-bf8-mlp", "bf4-mlp"}


@pytest.mark.parametrize("spec,match", [
    ("fastest", "neither a preset"),
    ({"layers": {}}, "mapping {'decoders'"),
    ({"decoders": {"x": {}}}, "not an index or 'all'"),
    ({"decoders": {"3": {}}}, "decoder 3 is out of range for 3 layers"),
    ({"decoders": {"-4": {}}}, "out of range"),
    ({"decoders": {"0": {"dtype": {}}}}, "only 'precision' and 'fidelity'"),
    ({"decoders": {"0": {"precision": {"ff1_3": "bf8"}}}}, "unknown precision group 'ff1_3'"),
    ({"decoders": {"0": {"precision": {"w1": "bfp8"}}}}, "w1='bfp8' is not one of"),
    ({"decoders": {"0": {"fidelity": {"w1": "hifi3"}}}}, "fidelity w1='hifi3'"),
    ({"decoders": {"0": {"fidelity": {"kv_cache": "lofi"}}}}, "unknown fidelity group"),
])
def test_invalid_overrides(spec, match) -> None:
    with pytest.raises(ValueError, match=match):
        precision(ttnn, "performance", 3, spec)


def test_model_puts_each_decoder_in_its_formats() -> None:
    """Decoder 0 with bf16 attention, KV cache and HiFi4 w1 (fp32 accumulation), decoder 1 as
    the performance policy: weights, cache pools, kernels and prefill program configs follow,
    and the model still matches transformers."""
    config = TT_CONFIGS["llama_gqa"]
    spec = {"decoders": {"0": {"precision": {"wqkv": "bf16", "wo": "bf16", "kv_cache": "bf16"},
                               "fidelity": {"w1": "hifi4"}}}}
    prec = precision(ttnn, "performance", config.num_layers, spec)
    assert prec.overridden == (0,)
    parts = build_parts(config, policy=prec)
    model = Transformer(parts.mesh, config, RUNTIME, parts.tensors, parts.cfg, parts.weights)
    a0, a1 = model.layers[0].attn, model.layers[1].attn
    assert (a0.wqkv.dtype, a0.wo.dtype, a1.wqkv.dtype, a1.wo.dtype) == (BF16, BF16, BF8, BF8)
    assert [t.dtype for t in model.cache.k] == [BF16, BF8] == [t.dtype for t in model.cache.v]
    m0, m1 = model.layers[0].mlp, model.layers[1].mlp
    assert m0.w1.dtype == m1.w1.dtype == BF4 and m0.w2.dtype == BF8
    mf = ttnn.MathFidelity
    assert (m0.kernels["w1"].math_fidelity, m0.kernels["w1"].fp32_dest_acc_en) == (mf.HiFi4, True)
    assert (m1.kernels["w1"].math_fidelity, m1.kernels["w1"].fp32_dest_acc_en) == (mf.LoFi, False)
    assert m0.kernels["w3"].math_fidelity == mf.LoFi
    assert {k[2] for k in parts.cfg.prefill_matmuls if k[0] == "w1"} == {True, False}
    assert {k[2] for k in parts.cfg.prefill_matmuls if k[0] == "wqkv"} == {True}
    g = torch.Generator().manual_seed(7)
    n = 70  # two MLP chunks of 64 rows
    seq = torch.randint(0, config.vocab_size, (n,), generator=g)
    with torch.no_grad():
        ref = parts.hf(seq[None]).logits[0]
    s = parts.cfg.prefill_length(n)
    tok = torch.zeros(1, 1, 1, s, dtype=torch.int64)
    tok[0, 0, 0, :n] = seq
    pages = torch.arange(1, RUNTIME.blocks_per_seq + 1)[None]
    hidden = model.prefill_hidden(ints(parts, tok, ttnn.uint32), ints(parts, pages, ttnn.int32))
    logits = parts.mesh.read(model.lm_head.gather(model.tile_logits(hidden, (n - 1) // 32)))
    got = logits.float()[0, 0, :(n - 1) % 32 + 1]
    # measured: PCC 0.982, max relative error 0.23, gain error 1.9e-2
    assert_matches(got, ref[(n - 1) // 32 * 32:n], TOLERANCE["performance"])


def test_backend_option_and_layer_count() -> None:
    config = TT_CONFIGS["llama_gqa"]
    ck = Checkpoint(config, state_dict(hf_model(config)), source=None)
    backend = TTBackend(ck, RUNTIME, precision_policy="performance",
                        decoder_precision="bf8-mlp-last-decoder", implementation="emulator")
    assert "1 decoder(s) overridden" in backend.describe()
    assert backend.model.layers[1].mlp.w1.dtype == BF8
    assert backend.model.layers[0].mlp.w1.dtype == BF4
    backend.close()
    with pytest.raises(ValueError, match="neither a preset"):
        TTBackend(ck, RUNTIME, precision_policy="performance", decoder_precision="fastest",
                  implementation="emulator")
    m, _ = open_mesh((1, 1), "emulator")
    with pytest.raises(TTConfigError, match="precision policy has 3 decoders, the model 2"):
        OpConfigs.build(m, config, RUNTIME, precision(ttnn, "performance", 3))


def test_performance_is_per_model() -> None:
    """"performance" on a model under 1B parameters: the bf16-attention-bf8-mlp preset unless
    overrides are asked for; 1B and more: tt_transformers' mode as is; "bf4-mlp" names the plain
    mode on any model."""
    from llm.model.config import ModelConfig

    smollm = ModelConfig(arch="llama", vocab_size=49152, hidden_size=576,
                         intermediate_size=1536, num_layers=30, num_heads=9, num_kv_heads=3,
                         head_dim=64, max_position_embeddings=8192, tie_word_embeddings=True)
    assert num_params(smollm) == 134_515_008 - 61 * 576  # HF's count less the norm weights
    llama8b = ModelConfig(arch="llama", vocab_size=128256, hidden_size=4096,
                          intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
                          head_dim=128, max_position_embeddings=8192)
    assert 8.0e9 < num_params(llama8b) < 8.1e9
    assert default_overrides("performance", smollm) == SMALL_MODEL_PRESET
    assert default_overrides("performance", llama8b) is None
    assert default_overrides("accuracy", smollm) is None
    assert precision(ttnn, "performance", 3, "bf4-mlp") == precision(ttnn, "performance", 3)

    config = TT_CONFIGS["llama_gqa"]
    ck = Checkpoint(config, state_dict(hf_model(config)), source=None)
    small = TTBackend(ck, RUNTIME, precision_policy="performance", implementation="emulator")
    assert f"decoder preset {SMALL_MODEL_PRESET}" in small.describe()
    assert [layer.mlp.w1.dtype for layer in small.model.layers] == [BF8, BF8]
    assert small.model.layers[0].attn.wqkv.dtype == BF16
    small.close()
    plain = TTBackend(ck, RUNTIME, precision_policy="performance", decoder_precision="bf4-mlp",
                      implementation="emulator")
    assert [layer.mlp.w1.dtype for layer in plain.model.layers] == [BF4, BF4]
    plain.close()
