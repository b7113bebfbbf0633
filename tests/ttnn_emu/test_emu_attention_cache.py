"""SDPA (prefill, decode, paged decode) and KV-cache writes (reference 5.6 - 5.8)."""

import math

import pytest
import torch
from emu_helpers import bf16, crs, on

import llm.ttnn_emu as ttnn


def ref_attention(q, k, v, scale, allowed):
    """Explicit softmax attention: q [nh, Sq, dh], k/v [nkv, Sk, dh], allowed [Sq, Sk] bool."""
    nh, nkv = q.shape[0], k.shape[0]
    out = torch.zeros_like(q)
    for h in range(nh):
        kh, vh = k[h // (nh // nkv)], v[h // (nh // nkv)]
        s = (q[h] @ kh.T) * scale
        s = s.masked_fill(~allowed, float("-inf"))
        w = torch.exp(s - s.max(-1, keepdim=True).values)
        w = torch.where(allowed, w, torch.zeros_like(w))
        out[h] = (w / w.sum(-1, keepdim=True)) @ vh
    return out


def to_f(t):
    return ttnn.to_torch(t).float()


def test_sdpa_prefill_causal_gqa(device):
    nh, nkv, s, dh = 4, 2, 64, 32
    q, k, v = (torch.randn(1, n, s, dh) for n in (nh, nkv, nkv))
    tq, tk, tv = on(device, q, ttnn.bfloat8_b), on(device, k, ttnn.bfloat8_b), on(
        device, v, ttnn.bfloat8_b)
    out = ttnn.transformer.scaled_dot_product_attention(tq, tk, tv, is_causal=True)
    allowed = torch.tril(torch.ones(s, s, dtype=torch.bool))
    ref = ref_attention(to_f(tq)[0], to_f(tk)[0], to_f(tv)[0], dh**-0.5, allowed)
    assert out.dtype == ttnn.bfloat8_b
    torch.testing.assert_close(to_f(out)[0], ref, rtol=0.05, atol=0.05)
    cat = ttnn.transformer.scaled_dot_product_attention(tq, tk, tv, output_concat_heads=True)
    assert tuple(cat.shape) == (1, 1, s, nh * dh)


def test_sdpa_prefill_mask_and_window(device):
    s, dh = 64, 32
    q, k, v = (torch.randn(1, 2, s, dh) for _ in range(3))
    tq, tk, tv = on(device, q), on(device, k), on(device, v)
    mask = torch.zeros(1, 1, s, s)
    mask[..., 40:] = float("-inf")
    out = ttnn.transformer.scaled_dot_product_attention(tq, tk, tv, attn_mask=on(device, mask),
                                                        is_causal=False, scale=0.3)
    allowed = torch.ones(s, s, dtype=torch.bool)
    allowed[:, 40:] = False
    ref = ref_attention(bf16(q)[0], bf16(k)[0], bf16(v)[0], 0.3, allowed)
    torch.testing.assert_close(to_f(out)[0], ref, rtol=0.02, atol=0.02)
    win = ttnn.transformer.scaled_dot_product_attention(tq, tk, tv, sliding_window_size=8)
    i = torch.arange(s)
    allowed_w = (i[None] <= i[:, None]) & (i[None] > i[:, None] - 8)
    ref_w = ref_attention(bf16(q)[0], bf16(k)[0], bf16(v)[0], dh**-0.5, allowed_w)
    torch.testing.assert_close(to_f(win)[0], ref_w, rtol=0.02, atol=0.02)


def test_sdpa_prefill_validation(device):
    q = on(device, torch.randn(1, 3, 64, 32))
    k = on(device, torch.randn(1, 2, 64, 32))
    mask = on(device, torch.zeros(1, 1, 64, 64))
    with pytest.raises(RuntimeError, match="mutually exclusive"):
        ttnn.transformer.scaled_dot_product_attention(k, k, k, attn_mask=mask, is_causal=True)
    with pytest.raises(RuntimeError, match="divisible by nkv"):
        ttnn.transformer.scaled_dot_product_attention(q, k, k)
    k32 = on(device, torch.randn(1, 2, 32, 32))
    with pytest.raises(RuntimeError, match="Sq == Sk"):
        ttnn.transformer.scaled_dot_product_attention(k, k32, k32)
    with pytest.raises(RuntimeError, match="dtype"):
        f = on(device, torch.randn(1, 2, 64, 32), ttnn.float32)
        ttnn.transformer.scaled_dot_product_attention(f, f, f)
    pc = ttnn.SDPAProgramConfig(compute_with_storage_grid_size=(8, 8), q_chunk_size=48,
                                k_chunk_size=32)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        ttnn.transformer.scaled_dot_product_attention(k, k, k, program_config=pc)
    with pytest.raises(RuntimeError, match="head_dim must not be padded"):
        p = on(device, torch.randn(1, 2, 64, 40))
        ttnn.transformer.scaled_dot_product_attention(p, p, p)


def _decode_inputs(device, users=3, nh=4, nkv=2, smax=128, dh=32, kv_dtype=ttnn.bfloat8_b):
    q = torch.randn(1, users, nh, dh)
    kc, vc = torch.randn(users, nkv, smax, dh), torch.randn(users, nkv, smax, dh)
    return q, on(device, q), on(device, kc, kv_dtype), on(device, vc, kv_dtype)


def _ref_decode(tq, tk, tv, pos, scale=None):
    q, k, v = to_f(tq), to_f(tk), to_f(tv)
    dh = q.shape[-1]
    out = torch.zeros_like(q)
    for b, p in enumerate(pos):
        if p < 0:
            continue
        allowed = torch.ones(1, p + 1, dtype=torch.bool)
        out[0, b] = ref_attention(q[0, b][:, None], k[b, :, : p + 1], v[b, :, : p + 1],
                                  scale or dh**-0.5, allowed)[:, 0]
    return out


def test_sdpa_decode(device):
    _, tq, tk, tv = _decode_inputs(device)
    pos = [0, 70, -1]
    out = ttnn.transformer.scaled_dot_product_attention_decode(tq, tk, tv, cur_pos=pos)
    assert tuple(out.shape) == (1, 3, 4, 32) and tuple(out.padded_shape) == (1, 3, 32, 32)
    ref = _ref_decode(tq, tk, tv, pos)
    torch.testing.assert_close(to_f(out), ref, rtol=0.02, atol=0.02)
    assert (to_f(out)[0, 2] == 0).all()
    cur = on(device, torch.tensor(pos), ttnn.int32, ttnn.ROW_MAJOR_LAYOUT)
    out2 = ttnn.transformer.scaled_dot_product_attention_decode(tq, tk, tv, cur_pos_tensor=cur,
                                                                scale=0.5)
    torch.testing.assert_close(to_f(out2), _ref_decode(tq, tk, tv, pos, 0.5), rtol=0.02,
                               atol=0.02)


def test_sdpa_decode_validation(device):
    _, tq, tk, tv = _decode_inputs(device)
    with pytest.raises(RuntimeError, match="< S_max"):
        ttnn.transformer.scaled_dot_product_attention_decode(tq, tk, tv, cur_pos=[0, 128, 1])
    with pytest.raises(RuntimeError, match="needs cur_pos"):
        ttnn.transformer.scaled_dot_product_attention_decode(tq, tk, tv)
    q8 = on(device, torch.randn(1, 3, 4, 32), ttnn.bfloat8_b)
    with pytest.raises(RuntimeError, match="GQA"):
        ttnn.transformer.scaled_dot_product_attention_decode(q8, tk, tv, cur_pos=[1, 1, 1])
    l1k = on(device, torch.randn(3, 2, 128, 32), mem=ttnn.L1_MEMORY_CONFIG)
    with pytest.raises(RuntimeError, match="must be in DRAM"):
        ttnn.transformer.scaled_dot_product_attention_decode(tq, l1k, tv, cur_pos=[1, 1, 1])
    pc = ttnn.SDPAProgramConfig(compute_with_storage_grid_size=(8, 8), q_chunk_size=32,
                                k_chunk_size=96)
    with pytest.raises(RuntimeError, match="divisible by k_chunk"):
        ttnn.transformer.scaled_dot_product_attention_decode(tq, tk, tv, cur_pos=[1, 1, 1],
                                                             program_config=pc)
    mask = on(device, torch.zeros(3, 1, 4, 128))
    with pytest.raises(RuntimeError, match="mutually exclusive"):
        ttnn.transformer.scaled_dot_product_attention_decode(tq, tk, tv, cur_pos=[1, 1, 1],
                                                             attn_mask=mask)


def test_sdpa_decode_non_causal_mask(device):
    _, tq, tk, tv = _decode_inputs(device, nkv=1)
    m = torch.zeros(3, 1, 4, 128)
    m[..., 10:] = float("-inf")
    out = ttnn.transformer.scaled_dot_product_attention_decode(
        tq, tk, tv, is_causal=False, attn_mask=on(device, m))
    torch.testing.assert_close(to_f(out), _ref_decode(tq, tk, tv, [9, 9, 9]), rtol=0.02,
                               atol=0.02)


def _paged(kc, page_table, bs):
    """Contiguous [B, nkv, nblk*bs, dh] -> paged [max_blocks, nkv, bs, dh] via the page table."""
    users, nkv, s, dh = kc.shape
    nblk = s // bs
    paged = torch.zeros(page_table.max() + 1, nkv, bs, dh)
    for b in range(users):
        for j in range(nblk):
            paged[page_table[b, j]] = kc[b, :, j * bs:(j + 1) * bs]
    return paged


def test_paged_sdpa_decode(device):
    users, nkv, nh, dh, bs, nblk = 2, 2, 4, 32, 32, 4
    kc, vc = torch.randn(users, nkv, nblk * bs, dh), torch.randn(users, nkv, nblk * bs, dh)
    pt = torch.randperm(users * nblk).reshape(users, nblk).to(torch.int32)
    q = torch.randn(1, users, nh, dh)
    tk, tv = on(device, _paged(kc, pt, bs)), on(device, _paged(vc, pt, bs))
    tpt = on(device, pt, ttnn.int32, ttnn.ROW_MAJOR_LAYOUT)
    pos = [33, 127]
    cur = on(device, torch.tensor(pos), ttnn.int32, ttnn.ROW_MAJOR_LAYOUT)
    out = ttnn.transformer.paged_scaled_dot_product_attention_decode(
        on(device, q), tk, tv, tpt, cur_pos_tensor=cur)
    ref = _ref_decode(on(device, q), on(device, kc), on(device, vc), pos)
    torch.testing.assert_close(to_f(out), ref, rtol=0.02, atol=0.02)
    with pytest.raises(RuntimeError, match="cur_pos_tensor is required"):
        ttnn.transformer.paged_scaled_dot_product_attention_decode(on(device, q), tk, tv, tpt)
    with pytest.raises(RuntimeError, match="int32 ROW_MAJOR"):
        ttnn.transformer.paged_scaled_dot_product_attention_decode(
            on(device, q), tk, tv, on(device, pt, ttnn.uint32, ttnn.ROW_MAJOR_LAYOUT),
            cur_pos_tensor=cur)


def test_fill_cache(device):
    cache = on(device, torch.zeros(2, 2, 128, 32), ttnn.bfloat8_b)
    x = torch.randn(1, 2, 64, 32)
    ttnn.fill_cache(cache, on(device, x), 1, update_idx=32)
    got = to_f(cache)
    ref_q = to_f(on(device, bf16(x), ttnn.bfloat8_b))
    assert torch.equal(got[1, :, 32:96], ref_q[0])
    assert (got[0] == 0).all() and (got[1, :, :32] == 0).all()
    with pytest.raises(RuntimeError, match="multiple of 32"):
        ttnn.fill_cache(cache, on(device, x), 0, update_idx=8)


def _decode_kv(device, users, nkv, dh, dtype=ttnn.bfloat16):
    x = torch.randn(1, users, nkv, dh)
    mem = ttnn.MemoryConfig(ttnn.TensorMemoryLayout.HEIGHT_SHARDED, ttnn.BufferType.L1,
                            ttnn.ShardSpec(crs(0, 0, users - 1, 0), (32, dh),
                                           ttnn.ShardOrientation.ROW_MAJOR))
    return x, on(device, x, dtype, mem=mem)


def test_paged_update_cache_unpaged_bf8(device):
    users, nkv, dh, smax = 3, 2, 32, 64
    init = torch.randn(users, nkv, smax, dh)
    cache = on(device, init, ttnn.bfloat8_b)
    before = to_f(cache)
    x, tx = _decode_kv(device, users, nkv, dh)
    pos = on(device, torch.tensor([4, -1, 63]), ttnn.int32, ttnn.ROW_MAJOR_LAYOUT)
    ttnn.experimental.paged_update_cache(cache, tx, update_idxs_tensor=pos)
    after = to_f(cache)
    expect = before.clone()
    row = lambda v: to_f(on(device, v, ttnn.bfloat8_b))  # noqa: E731
    expect[0, :, 4] = row(bf16(x[0, 0]))
    expect[2, :, 63] = row(bf16(x[0, 2]))
    assert torch.equal(after, expect)


def test_paged_update_cache_paged_and_validation(device):
    users, nkv, dh, bs = 2, 1, 32, 32
    cache = on(device, torch.zeros(6, nkv, bs, dh))
    pt = torch.tensor([[5, 2, 0], [1, 3, 4]], dtype=torch.int32)
    tpt = on(device, pt, ttnn.int32, ttnn.ROW_MAJOR_LAYOUT)
    x, tx = _decode_kv(device, users, nkv, dh)
    ttnn.experimental.paged_update_cache(cache, tx, update_idxs=[40, 70], page_table=tpt)
    got = to_f(cache)
    assert torch.equal(got[2, :, 8], bf16(x[0, 0]))
    assert torch.equal(got[4, :, 6], bf16(x[0, 1]))
    assert got.abs().sum() == bf16(x).abs().sum()
    with pytest.raises(RuntimeError, match="HEIGHT_SHARDED"):
        ttnn.experimental.paged_update_cache(cache, on(device, x), update_idxs=[0, 0],
                                             page_table=tpt)
    _, tx8 = _decode_kv(device, users, nkv, dh, ttnn.bfloat8_b)
    with pytest.raises(RuntimeError, match="dtype"):
        ttnn.experimental.paged_update_cache(cache, tx8, update_idxs=[0, 0], page_table=tpt)
    with pytest.raises(RuntimeError, match="beyond the page table"):
        ttnn.experimental.paged_update_cache(cache, tx, update_idxs=[96, 0], page_table=tpt)


def test_paged_fill_cache(device):
    nkv, dh, bs, s = 2, 32, 64, 160
    cache = on(device, torch.zeros(5, nkv, bs, dh), ttnn.bfloat8_b)
    pt = torch.tensor([[0, 0, 0], [3, -1, 1]], dtype=torch.int32)
    x = torch.randn(1, nkv, s, dh)
    tx = on(device, x, ttnn.bfloat8_b)
    ttnn.experimental.paged_fill_cache(cache, tx, on(device, pt, ttnn.int32,
                                                     ttnn.ROW_MAJOR_LAYOUT), batch_idx=1)
    xq = to_f(tx)
    expect = torch.zeros(5, nkv, bs, dh)
    padded = torch.zeros(1, nkv, 192, dh)
    padded[:, :, :s] = xq
    for t in range(192 // 32):
        blk = int(pt[1, (32 * t) // bs])
        if blk < 0:
            continue
        off = (32 * t) % bs
        expect[blk, :, off:off + 32] = padded[0, :, 32 * t:32 * t + 32]
    assert torch.equal(to_f(cache), expect)
    with pytest.raises(RuntimeError, match="must equal the cache dtype"):
        ttnn.experimental.paged_fill_cache(cache, on(device, x), on(device, pt, ttnn.int32,
                                                                    ttnn.ROW_MAJOR_LAYOUT))


def test_decode_accounting_reads_only_live_positions(device):
    _, tq, tk, tv = _decode_inputs(device, users=2, smax=256)
    device.op_log.reset()
    ttnn.transformer.scaled_dot_product_attention_decode(tq, tk, tv, cur_pos=[0, 40])
    rec = device.op_log.recent[-1]
    rows = 32 + 64  # tile-rounded rows read per user
    kv = 2 * rows * 2 * 32 * 1088 // 1024
    assert rec.dram_bytes == kv + 2 * tq.shard_nbytes()
    assert rec.flops == 4 * 4 * 32 * rows
    assert math.isfinite(rec.flops)


def test_chunked_sdpa(device):
    nh, nkv, dh, bs, nblk, sq, start = 4, 2, 32, 32, 4, 64, 32
    kc, vc = torch.randn(1, nkv, nblk * bs, dh), torch.randn(1, nkv, nblk * bs, dh)
    pt = torch.randperm(nblk).reshape(1, nblk).to(torch.int32)
    q = torch.randn(1, nh, sq, dh)
    tpt = on(device, pt, ttnn.int32, ttnn.ROW_MAJOR_LAYOUT)
    tk, tv = on(device, _paged(kc, pt, bs)), on(device, _paged(vc, pt, bs))
    out = ttnn.transformer.chunked_scaled_dot_product_attention(on(device, q), tk, tv, tpt, start)
    total = start + sq
    allowed = torch.arange(total)[None] <= (torch.arange(sq)[:, None] + start)
    ref = ref_attention(bf16(q)[0], bf16(kc)[0, :, :total], bf16(vc)[0, :, :total], dh**-0.5,
                        allowed)
    torch.testing.assert_close(to_f(out)[0], ref, rtol=0.02, atol=0.02)
    pc = ttnn.SDPAProgramConfig(compute_with_storage_grid_size=(8, 8), q_chunk_size=64,
                                k_chunk_size=64)
    with pytest.raises(RuntimeError, match="multiple of"):
        ttnn.transformer.chunked_scaled_dot_product_attention(on(device, q), tk, tv, tpt, start,
                                                              program_config=pc)
    with pytest.raises(RuntimeError, match="exceeds the paged cache"):
        ttnn.transformer.chunked_scaled_dot_product_attention(on(device, q), tk, tv, tpt, 96)
