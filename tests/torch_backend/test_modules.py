"""Every torch-backend module against the matching transformers module (small random configs):
PCC, and closeness in fp32 / error and gain bounds in bf16 (hf_reference.Tolerance).
"""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch
from hf_reference import (
    SMALL_CONFIGS,
    Tolerance,
    assert_matches,
    causal_mask,
    check_failures,
    fp32,
    hf_model,
    state_dict,
)
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from llm.backends.torch.attention import Attention, DecodeMeta, PrefillMeta
from llm.backends.torch.embedding import Embedding
from llm.backends.torch.kv_cache import PagedKVCache
from llm.backends.torch.lm_head import LMHead
from llm.backends.torch.mlp import MLP
from llm.backends.torch.model import DecoderLayer
from llm.backends.torch.norm import RMSNorm
from llm.backends.torch.rope import RotaryEmbedding, apply_rotary, rot_sin
from llm.model.config import RuntimeConfig
from llm.model.rope import has_long_table

# bf16 against bf16 transformers, measured (max over SMALL_CONFIGS and comparisons): max relative
# error 5.3e-3 attention prefill, 7.2e-3 paged decode (one row), 7.6e-3 decoder layer; gain error
# 2.8e-3 (decode rows), 1.8e-4 (prefill); embedding, norm, MLP, LM head and RoPE are bit-equal.
# Rounding noise near 1% of the output means the max relative error cannot see a 1% scale error;
# the gain bound does (a 1% scale moves it by 0.01, see test_planted_scale_error_fails).
BF16 = Tolerance(0.999, max_rel=0.012, gain=0.005)
DTYPES = {"fp32": (torch.float32, fp32(0.9999)), "bf16": (torch.bfloat16, BF16)}
CONFIGS = list(SMALL_CONFIGS)
SEQ = 40  # prompt length used by the prefill tests (spans several 8-token pages)
BLOCK = 8


def _setup(name: str, dtype: torch.dtype):
    config = SMALL_CONFIGS[name]
    model = hf_model(config, dtype=dtype)
    w = state_dict(model)
    return config, model, w


def _hidden(config, n: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, n, config.hidden_size, generator=g).to(dtype)


def _hf_rope(model, x: torch.Tensor, positions: torch.Tensor):
    return model.model.rotary_emb(x, positions[None])


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("name", CONFIGS)
def test_embedding_norm_mlp_lmhead(name: str, dt: str) -> None:
    dtype, tol = DTYPES[dt]
    config, model, w = _setup(name, dtype)
    tokens = torch.randint(0, config.vocab_size, (1, SEQ))
    with torch.no_grad():
        ref = model.model.embed_tokens(tokens)
        assert torch.equal(Embedding(w["model.embed_tokens.weight"])(tokens), ref)
        x = _hidden(config, SEQ, dtype)
        layer = model.model.layers[0]
        norm = RMSNorm(w["model.layers.0.input_layernorm.weight"], config.rms_norm_eps)
        assert_matches(norm(x), layer.input_layernorm(x), tol, "norm")
        mlp = MLP.from_weights(w, "model.layers.0.mlp.")
        assert_matches(mlp(x), layer.mlp(x), tol, "mlp")
        head_w = w.get("lm_head.weight", w["model.embed_tokens.weight"])
        head = LMHead(head_w, chunk_size=100)  # 320-token vocab -> 4 chunks, the last one short
        assert len(head.chunks) == 4
        assert_matches(head(x[0]), model.lm_head(x)[0], tol, "lm head")


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("name", CONFIGS)
def test_rope(name: str, dt: str) -> None:
    dtype, tol = DTYPES[dt]
    config, model, _ = _setup(name, dtype)
    if config.partial_rotary_dim is not None:
        pytest.skip("partial rotation reorders q/k rows (its tables are not transformers'): "
                    "tested through attention, decoder layer and model")
    positions = torch.tensor([0, 1, 5, 63, 64, 100, 300, 511])
    x = _hidden(config, len(positions), dtype)
    rope = RotaryEmbedding(config, config.max_position_embeddings, "cpu", dtype)
    atol = 1e-6 if dt == "fp32" else 1e-2
    # transformers multiplies LongRoPE's cos and sin by its attention factor; ours is in the
    # attention scale instead (squared: q and k).
    af = config.rope_scaling.attention_factor if has_long_table(config) else 1.0
    # One forward pass over all positions (LongRoPE: the long set, as they reach past the
    # original context), ...
    cos_table, sin_table, _ = rope.tables(int(positions.max()) + 1)
    cos, sin = cos_table[positions], sin_table[positions]
    ref_cos, ref_sin = _hf_rope(model, x, positions)
    assert torch.allclose(cos.float() * af, ref_cos[0].float(), atol=atol)
    assert torch.allclose(sin.float() * af, ref_sin[0].float(), atol=atol)
    # ... and one position per forward pass, as decode gathers them (LongRoPE: short factors up
    # to the original context, long beyond).
    for i in range(len(positions)):
        step_cos, step_sin = _hf_rope(model, x[:, i:i + 1], positions[i:i + 1])
        one_cos, one_sin = rope.gather(positions[i:i + 1])
        assert torch.allclose(one_cos.float() * af, step_cos[0].float(), atol=atol), i
        assert torch.allclose(one_sin.float() * af, step_sin[0].float(), atol=atol), i
    q = torch.randn(1, config.num_heads, len(positions), config.head_dim).to(dtype)
    ref_q, _ = apply_rotary_pos_emb(q, q, ref_cos, ref_sin)
    ours = apply_rotary(q[0].transpose(0, 1), cos, rot_sin(sin))  # [N, nh, hd] layout
    ours = ours.transpose(0, 1) * af
    assert_matches(ours, ref_q[0], tol)


def _cache(config, dtype, num_blocks: int = 64) -> PagedKVCache:
    rt = RuntimeConfig(max_batch=4, max_seq_len=config.max_position_embeddings, block_size=BLOCK,
                       num_blocks=num_blocks)
    return PagedKVCache(config, rt, "cpu", dtype)


def _shuffled_pages(n: int, seed: int, num_blocks: int = 64) -> torch.Tensor:
    """A non-contiguous page table row of n pages (page 0 is padding, never used)."""
    pages = list(range(1, num_blocks))
    random.Random(seed).shuffle(pages)
    return torch.tensor(pages[:n])


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("name", CONFIGS)
def test_attention_prefill_and_chunked_prefill(name: str, dt: str) -> None:
    dtype, tol = DTYPES[dt]
    config, model, w = _setup(name, dtype)
    attn = Attention(config, w, 0)
    x = _hidden(config, SEQ, dtype)
    rope = RotaryEmbedding(config, config.max_position_embeddings, "cpu", dtype)
    positions = torch.arange(SEQ)
    with torch.no_grad():
        ref, _ = model.model.layers[0].self_attn(x, _hf_rope(model, x, positions),
                                                 causal_mask(SEQ, dtype))
    row = _shuffled_pages(16, seed=3)
    cache = _cache(config, dtype)
    out = attn.prefill(x[0], PrefillMeta.build(rope, 0, SEQ, row, BLOCK), cache)
    assert_matches(out, ref[0], tol, "prefill")
    # The same prompt in two chunks (13 + 27 tokens) through a fresh cache: the second chunk attends
    # to the first chunk's K/V read back from the pages. With LongRoPE the first chunk reaches
    # past the original context (20 + 20), so that both rotate with the long factors as the single
    # forward pass of the reference does (a chunk below it rotates with the short ones, as
    # transformers does in a forward pass of it: test_model's LongRoPE test).
    cache = _cache(config, dtype)
    cut = 13
    if has_long_table(config):
        cut = config.rope_scaling.original_max_position_embeddings + 4
    a = attn.prefill(x[0, :cut], PrefillMeta.build(rope, 0, cut, row, BLOCK), cache)
    b = attn.prefill(x[0, cut:], PrefillMeta.build(rope, cut, SEQ - cut, row, BLOCK), cache)
    assert_matches(torch.cat([a, b]), ref[0], tol, "chunked prefill")


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("name", CONFIGS)
def test_attention_decode_paged(name: str, dt: str) -> None:
    """Three users of different lengths decode together through shuffled, interleaved pages."""
    dtype, tol = DTYPES[dt]
    config, model, w = _setup(name, dtype)
    attn = Attention(config, w, 0)
    rope = RotaryEmbedding(config, config.max_position_embeddings, "cpu", dtype)
    prompt_lens, steps = [5, 17, 30], 6
    cache = _cache(config, dtype)
    pages = _shuffled_pages(3 * 6, seed=7).view(6, 3).T.contiguous()  # users interleave pages
    xs = [_hidden(config, n + steps, dtype, seed=10 + i) for i, n in enumerate(prompt_lens)]
    refs = []
    with torch.no_grad():
        for x in xs:
            n = x.shape[1]
            out, _ = model.model.layers[0].self_attn(x, _hf_rope(model, x, torch.arange(n)),
                                                     causal_mask(n, dtype))
            refs.append(out[0])
    for u, n in enumerate(prompt_lens):
        attn.prefill(xs[u][0, :n], PrefillMeta.build(rope, 0, n, pages[u], BLOCK), cache)
    for t in range(steps):
        positions = torch.tensor([n + t for n in prompt_lens])
        x = torch.stack([xs[u][0, positions[u]] for u in range(3)])  # [B, H]
        meta = DecodeMeta.build(rope, positions, pages, BLOCK, int(positions.max()))
        out = attn.decode(x, meta, cache)
        for u in range(3):
            assert_matches(out[u], refs[u][positions[u]], tol, (u, t))


def _decoder_layer(name: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(our decoder layer 1's output, transformers'), prefill of SEQ tokens."""
    config, model, w = _setup(name, dtype)
    x = _hidden(config, SEQ, dtype)
    rope = RotaryEmbedding(config, config.max_position_embeddings, "cpu", dtype)
    with torch.no_grad():
        ref = model.model.layers[1](x, attention_mask=causal_mask(SEQ, dtype),
                                    position_embeddings=_hf_rope(model, x, torch.arange(SEQ)))
    ref = ref[0] if isinstance(ref, tuple) else ref
    layer = DecoderLayer(config, w, 1)
    mlp_out, residual = layer.prefill(
        x[0], None, PrefillMeta.build(rope, 0, SEQ, _shuffled_pages(8, 1), BLOCK),
        _cache(config, dtype))
    return mlp_out + residual, ref[0]


LAYER = {"fp32": fp32(0.9999), "bf16": replace(BF16, pcc=0.998)}


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("name", CONFIGS)
def test_decoder_layer(name: str, dt: str) -> None:
    assert_matches(*_decoder_layer(name, DTYPES[dt][0]), LAYER[dt])


@pytest.mark.parametrize("dt,fails", [("fp32", "not close"), ("bf16", "gain error")])
def test_planted_scale_error_fails(dt: str, fails: str) -> None:
    """The decoder layer's output made 1% too large: PCC passes, the check fails (fp32:
    assert_close; bf16: the gain bound, which a 1% scale moves by 0.01); the true output
    passes."""
    ours, ref = _decoder_layer("llama_gqa", DTYPES[dt][0])
    assert_matches(ours, ref, LAYER[dt])
    failed = check_failures([("output x 1.01", ours * 1.01, ref)], LAYER[dt])
    assert len(failed) == 1 and fails in failed[0], failed
