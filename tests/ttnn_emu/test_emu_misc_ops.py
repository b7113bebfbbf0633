"""Smaller op variants: update_cache, subtract, share_cache, input_kv / kv_tied, namespaces."""

import torch
from emu_helpers import bf16, on

import llm.ttnn_emu as ttnn


def test_update_cache_legacy(device):
    cache = on(device, torch.zeros(4, 2, 64, 32))
    x = torch.randn(1, 2, 32, 32)
    ttnn.update_cache(cache, on(device, x), 10, batch_offset=3)
    got = ttnn.to_torch(cache).float()
    for u in range(4):
        assert torch.equal(got[u, :, 10], bf16(x)[0, :, 3 + u])
    assert got[:, :, :10].abs().sum() == 0 and got[:, :, 11:].abs().sum() == 0


def test_subtract(device):
    a, b = torch.randn(1, 1, 32, 32), torch.randn(1, 1, 32, 32)
    out = ttnn.subtract(on(device, a, ttnn.float32), on(device, b, ttnn.float32))
    assert torch.equal(ttnn.to_torch(out), a - b)


def test_sdpa_decode_share_cache(device):
    q = torch.randn(1, 2, 2, 32)
    k, v = torch.randn(1, 1, 64, 32), torch.randn(1, 1, 64, 32)
    out = ttnn.transformer.scaled_dot_product_attention_decode(
        on(device, q), on(device, k), on(device, v), cur_pos=[3, 9], share_cache=True)
    got = ttnn.to_torch(out).float()
    for b, p in enumerate([3, 9]):
        s = bf16(q)[0, b] @ bf16(k)[0, 0, : p + 1].T * 32**-0.5
        ref = torch.softmax(s, -1) @ bf16(v)[0, 0, : p + 1]
        torch.testing.assert_close(got[0, b], ref, rtol=0.02, atol=0.02)


def test_create_qkv_heads_input_kv_and_tied(device):
    q_in, kv_in = torch.randn(1, 1, 32, 64), torch.randn(1, 1, 32, 64)
    q, k, v = ttnn.experimental.nlp_create_qkv_heads(
        on(device, q_in), on(device, kv_in), num_heads=2, num_kv_heads=1,
        transpose_k_heads=False)
    assert torch.equal(ttnn.to_torch(q).float()[0, 1], bf16(q_in)[0, 0, :, 32:])
    assert torch.equal(ttnn.to_torch(k).float()[0, 0], bf16(kv_in)[0, 0, :, :32])
    assert torch.equal(ttnn.to_torch(v).float()[0, 0], bf16(kv_in)[0, 0, :, 32:])
    x = torch.randn(1, 1, 32, 96)
    _, kt, vt = ttnn.experimental.nlp_create_qkv_heads(
        on(device, x), num_heads=2, num_kv_heads=1, kv_tied=True, transpose_k_heads=False)
    assert torch.equal(ttnn.to_torch(kt), ttnn.to_torch(vt))


def test_namespaces_match_ttnn():
    assert not hasattr(ttnn, "rotary_embedding_llama")
    assert not hasattr(ttnn, "paged_update_cache")
    assert callable(ttnn.experimental.paged_update_cache)
    assert callable(ttnn.transformer.scaled_dot_product_attention_decode)
    assert ttnn.TILE_SIZE == 32 and ttnn.DEFAULT_TRACE_REGION_SIZE == 0
    assert set(ttnn.__all__) <= set(dir(ttnn))
