"""rotary_embedding_llama and the nlp head ops (reference 5.1 - 5.5)."""

import pytest
import torch
from emu_helpers import bf16, crs, on

import llm.ttnn_emu as ttnn


def trans_mat():
    """T[2k, 2k+1] = 1, T[2k+1, 2k] = -1 (get_rot_transformation_mat)."""
    t = torch.zeros(1, 1, 32, 32)
    for k in range(16):
        t[..., 2 * k, 2 * k + 1] = 1
        t[..., 2 * k + 1, 2 * k] = -1
    return t


def cos_sin(positions, dh, theta=10000.0):
    """Meta-interleaved cos/sin rows [len(positions), dh]: [c0, c0, c1, c1, ...]."""
    inv = 1.0 / theta ** (torch.arange(0, dh, 2).float() / dh)
    ang = torch.tensor(positions, dtype=torch.float32)[:, None] * inv[None]
    return ang.cos().repeat_interleave(2, -1), ang.sin().repeat_interleave(2, -1)


def ref_rope(x, c, s):
    """out[2k] = x[2k] c_k - x[2k+1] s_k; out[2k+1] = x[2k+1] c_k + x[2k] s_k."""
    out = torch.empty_like(x)
    ck, sk = c[..., 0::2], s[..., 0::2]
    out[..., 0::2] = x[..., 0::2] * ck - x[..., 1::2] * sk
    out[..., 1::2] = x[..., 1::2] * ck + x[..., 0::2] * sk
    return out


def height_mem(ncores, shard):
    return ttnn.MemoryConfig(ttnn.TensorMemoryLayout.HEIGHT_SHARDED, ttnn.BufferType.L1,
                             ttnn.ShardSpec(crs(0, 0, ncores - 1, 0), shard,
                                            ttnn.ShardOrientation.ROW_MAJOR))


def test_rope_prefill(device):
    b, nh, s, dh = 1, 2, 64, 64
    x = torch.randn(b, nh, s, dh)
    c, sn = cos_sin(list(range(s)), dh)
    out = ttnn.experimental.rotary_embedding_llama(
        on(device, x), on(device, c[None, None]), on(device, sn[None, None]),
        on(device, trans_mat()), is_decode_mode=False)
    ref = bf16(ref_rope(bf16(x), bf16(c), bf16(sn)))
    torch.testing.assert_close(ttnn.to_torch(out).float(), ref, rtol=0.01, atol=0.02)
    assert out.memory_config() == ttnn.DRAM_MEMORY_CONFIG


def test_rope_decode(device):
    users, nh, dh = 3, 4, 64
    x = torch.randn(1, users, nh, dh)
    pos = [5, 17, 2]
    c, sn = cos_sin(pos, dh)  # [users, dh]
    xm = height_mem(users, (32, dh))
    out = ttnn.experimental.rotary_embedding_llama(
        on(device, x, mem=xm), on(device, c[None, :, None], mem=xm),
        on(device, sn[None, :, None], mem=xm),
        on(device, trans_mat().repeat(1, 1, users, 1), mem=height_mem(users, (32, 32))),
        is_decode_mode=True)
    ref = bf16(ref_rope(bf16(x), bf16(c)[None, :, None], bf16(sn)[None, :, None]))
    torch.testing.assert_close(ttnn.to_torch(out).float(), ref, rtol=0.01, atol=0.02)
    assert out.memory_config() == xm


def test_rope_validation(device):
    x, c = torch.randn(1, 2, 32, 64), torch.randn(1, 1, 32, 64)
    t = on(device, trans_mat())
    with pytest.raises(RuntimeError, match="must be BFLOAT16"):
        ttnn.experimental.rotary_embedding_llama(on(device, x, ttnn.bfloat8_b), on(device, c),
                                                 on(device, c), t)
    with pytest.raises(RuntimeError, match="must be BFLOAT16"):
        ttnn.experimental.rotary_embedding_llama(on(device, x, ttnn.float32), on(device, c),
                                                 on(device, c), t)
    with pytest.raises(RuntimeError, match="HEIGHT_SHARDED"):
        ttnn.experimental.rotary_embedding_llama(on(device, x), on(device, c), on(device, c), t,
                                                 is_decode_mode=True)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        x48 = torch.randn(1, 2, 32, 48)
        ttnn.experimental.rotary_embedding_llama(on(device, x48), on(device, c[..., :48]),
                                                 on(device, c[..., :48]), t)
    with pytest.raises(RuntimeError, match=r"\[1, nh\|1, S, dh\]"):
        ttnn.experimental.rotary_embedding_llama(on(device, x), on(device, c[:, :, :16]),
                                                 on(device, c[:, :, :16]), t)


def test_create_qkv_heads_prefill(device):
    b, s, nh, nkv, dh = 1, 64, 4, 2, 32
    x = torch.randn(b, 1, s, (nh + 2 * nkv) * dh)
    q, k, v = ttnn.experimental.nlp_create_qkv_heads(on(device, x), num_heads=nh,
                                                     num_kv_heads=nkv, transpose_k_heads=False)
    xb = bf16(x)[:, 0]
    ref_q = xb[..., : nh * dh].reshape(b, s, nh, dh).transpose(1, 2)
    ref_k = xb[..., nh * dh: (nh + nkv) * dh].reshape(b, s, nkv, dh).transpose(1, 2)
    ref_v = xb[..., (nh + nkv) * dh:].reshape(b, s, nkv, dh).transpose(1, 2)
    for got, ref in ((q, ref_q), (k, ref_k), (v, ref_v)):
        assert torch.equal(ttnn.to_torch(got).float(), ref)
    _, kt, _ = ttnn.experimental.nlp_create_qkv_heads(on(device, x), num_heads=nh,
                                                      num_kv_heads=nkv)
    assert tuple(kt.shape) == (b, nkv, dh, s)
    with pytest.raises(RuntimeError, match="does not split"):
        ttnn.experimental.nlp_create_qkv_heads(on(device, x), num_heads=3, num_kv_heads=2)


def test_create_qkv_heads_decode_and_concat(device):
    users, nh, nkv, dh = 5, 4, 2, 32
    x = torch.randn(1, 1, users, (nh + 2 * nkv) * dh)
    q, k, v = ttnn.experimental.nlp_create_qkv_heads_decode(
        on(device, x), num_heads=nh, num_kv_heads=nkv,
        memory_config=ttnn.L1_HEIGHT_SHARDED_MEMORY_CONFIG)
    xb = bf16(x)[0, 0]
    assert tuple(q.shape) == (1, users, nh, dh) and tuple(q.padded_shape) == (1, users, 32, dh)
    assert q.memory_config().shard_spec.shape == (32, dh)
    assert q.memory_config().shard_spec.num_cores() == users
    assert torch.equal(ttnn.to_torch(q).float()[0], xb[:, : nh * dh].reshape(users, nh, dh))
    assert torch.equal(ttnn.to_torch(k).float()[0],
                       xb[:, nh * dh: (nh + nkv) * dh].reshape(users, nkv, dh))
    assert torch.equal(ttnn.to_torch(v).float()[0], xb[:, (nh + nkv) * dh:].reshape(users, nkv, dh))
    _, k2, _ = ttnn.experimental.nlp_create_qkv_heads_decode(
        on(device, x), num_heads=nh, num_kv_heads=nkv, overlap_qk_coregrid=False)
    assert not set(k2.memory_config().shard_spec.grid.cores()) & set(
        q.memory_config().shard_spec.grid.cores())
    cat = ttnn.experimental.nlp_concat_heads_decode(q, num_heads=nh)
    assert tuple(cat.shape) == (1, 1, users, nh * dh)
    mem = cat.memory_config()
    assert mem.memory_layout == ttnn.TensorMemoryLayout.WIDTH_SHARDED
    assert mem.shard_spec.shape == (32, dh) and mem.shard_spec.num_cores() == nh
    assert torch.equal(ttnn.to_torch(cat).float()[0, 0], xb[:, : nh * dh])
    with pytest.raises(RuntimeError, match="must be BFLOAT16"):
        ttnn.experimental.nlp_create_qkv_heads_decode(on(device, x, ttnn.bfloat8_b),
                                                      num_heads=nh, num_kv_heads=nkv)
    with pytest.raises(RuntimeError, match="HEIGHT_SHARDED"):
        ttnn.experimental.nlp_concat_heads_decode(on(device, torch.randn(1, users, nh, dh)),
                                                  num_heads=nh)


def test_create_qkv_heads_decode_batch_offset(device):
    x = torch.randn(1, 1, 8, 3 * 32)
    off = on(device, torch.tensor([2]), ttnn.int32, ttnn.ROW_MAJOR_LAYOUT)
    q, _, _ = ttnn.experimental.nlp_create_qkv_heads_decode(
        on(device, x), num_heads=1, num_kv_heads=1, batch_offset=off, slice_size=4)
    assert torch.equal(ttnn.to_torch(q).float()[0, :, 0], bf16(x)[0, 0, 2:6, :32])


def test_nlp_concat_heads(device):
    x = torch.randn(1, 4, 64, 32)
    out = ttnn.experimental.nlp_concat_heads(on(device, x))
    assert torch.equal(ttnn.to_torch(out).float(),
                       bf16(x).permute(0, 2, 1, 3).reshape(1, 1, 64, 128))


def test_rope_fused_qk(device):
    users, nh, nkv, dh = 3, 4, 2, 32
    x = torch.randn(1, 1, users, (nh + 2 * nkv) * dh)
    q, k, _ = ttnn.experimental.nlp_create_qkv_heads_decode(
        on(device, x), num_heads=nh, num_kv_heads=nkv, overlap_qk_coregrid=False)
    pos = [4, 9, 1]
    c, sn = cos_sin(pos + pos, dh)  # the batch is doubled: q users, then k users
    mem = height_mem(2 * users, (32, dh))
    tm = on(device, trans_mat().repeat(1, 1, 2 * users, 1), mem=height_mem(2 * users, (32, 32)))
    qo, ko = ttnn.experimental.rotary_embedding_llama_fused_qk(
        q, k, on(device, c[None, :, None], mem=mem), on(device, sn[None, :, None], mem=mem), tm)
    cq, sq = bf16(c[:users])[None, :, None], bf16(sn[:users])[None, :, None]
    for got, src in ((qo, q), (ko, k)):
        ref = bf16(ref_rope(ttnn.to_torch(src).float(), cq, sq))
        torch.testing.assert_close(ttnn.to_torch(got).float(), ref, rtol=0.01, atol=0.02)
    q2, k2, _ = ttnn.experimental.nlp_create_qkv_heads_decode(
        on(device, x), num_heads=nh, num_kv_heads=nkv)
    with pytest.raises(RuntimeError, match="disjoint"):
        ttnn.experimental.rotary_embedding_llama_fused_qk(
            q2, k2, on(device, c[None, :, None], mem=mem), on(device, sn[None, :, None], mem=mem),
            tm)
    with pytest.raises(RuntimeError, match="Bq \\+ Bk"):
        small = height_mem(users, (32, dh))
        ttnn.experimental.rotary_embedding_llama_fused_qk(
            q, k, on(device, c[None, :users, None], mem=small),
            on(device, sn[None, :users, None], mem=small), tm)
