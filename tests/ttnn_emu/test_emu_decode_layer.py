"""A whole decode step of one Llama layer through the emulator, in the op/memory-config sequence
of reference section 9, against a plain torch layer using the same (quantized) weights."""

import torch
from emu_helpers import bf16, dram_sharded_weight_config, on, width_sharded_l1

import llm.ttnn_emu as ttnn

B, DIM, NH, NKV, DH, HID, BS, NBLK = 32, 256, 8, 2, 32, 512, 32, 4
EPS = 1e-5
RM = ttnn.ROW_MAJOR_LAYOUT
L1WS = ttnn.L1_WIDTH_SHARDED_MEMORY_CONFIG


def dram_pc(k, n, ncores):
    kt = k // 32 // ncores
    return ttnn.MatmulMultiCoreReuseMultiCastDRAMShardedProgramConfig(
        in0_block_w=max(d for d in range(1, 9) if kt % d == 0), per_core_M=1,
        per_core_N=-(-n // (32 * ncores)))


def rope_tables(max_seq):
    inv = 1.0 / 10000 ** (torch.arange(0, DH, 2).float() / DH)
    ang = torch.arange(max_seq).float()[:, None] * inv[None]
    return ang.cos().repeat_interleave(2, -1), ang.sin().repeat_interleave(2, -1)


def meta_rope(x, c, s):
    out = torch.empty_like(x)
    out[..., 0::2] = x[..., 0::2] * c[..., 0::2] - x[..., 1::2] * s[..., 0::2]
    out[..., 1::2] = x[..., 1::2] * c[..., 0::2] + x[..., 0::2] * s[..., 0::2]
    return out


def pcc(a, b):
    a, b = a.flatten().double(), b.flatten().double()
    return torch.corrcoef(torch.stack([a, b]))[0, 1].item()


def test_decode_layer_matches_torch(device):
    torch.manual_seed(1)
    w = {n: torch.randn(*s) * s[0] ** -0.5 for n, s in {
        "wqkv": (DIM, (NH + 2 * NKV) * DH), "wo": (NH * DH, DIM), "w1": (DIM, HID),
        "w3": (DIM, HID), "w2": (HID, DIM)}.items()}
    g_attn, g_mlp = 1 + 0.1 * torch.randn(DIM), 1 + 0.1 * torch.randn(DIM)
    dtypes = {"wqkv": ttnn.bfloat8_b, "wo": ttnn.bfloat8_b, "w1": ttnn.bfloat4_b,
              "w3": ttnn.bfloat4_b, "w2": ttnn.bfloat8_b}
    tw = {n: on(device, w[n][None, None], dtypes[n],
                mem=dram_sharded_weight_config(*w[n].shape)) for n in w}
    wq = {n: ttnn.to_torch(t)[0, 0] for n, t in tw.items()}  # stored weight values
    gamma = {n: on(device, g.reshape(1, 1, DIM // 32, 32), layout=RM)
             for n, g in (("attn", g_attn), ("mlp", g_mlp))}
    cos, sin = rope_tables(NBLK * BS)
    cos_m, sin_m = on(device, cos[None, None], layout=RM), on(device, sin[None, None], layout=RM)

    # persistent decode inputs: per-user positions, page table, paged caches
    pos = torch.randint(3, NBLK * BS - 1, (B,))
    pos[5] = 0
    pt = torch.randperm(B * NBLK).reshape(B, NBLK).to(torch.int32)
    k_hist = torch.randn(B * NBLK, NKV, BS, DH)
    v_hist = torch.randn(B * NBLK, NKV, BS, DH)
    kc, vc = on(device, k_hist, ttnn.bfloat8_b), on(device, v_hist, ttnn.bfloat8_b)
    tpt = on(device, pt, ttnn.int32, RM)
    cur = on(device, pos.to(torch.int32), ttnn.int32, RM)
    x = torch.randn(1, 1, B, DIM)
    resid_mem = width_sharded_l1(32, DIM, 8)
    tx = on(device, x, mem=resid_mem)
    norm_pc = ttnn.LayerNormShardedMultiCoreProgramConfig(
        compute_with_storage_grid_size=(8, 1), subblock_w=1, block_h=1, block_w=1, inplace=False)

    # --- attention (reference section 9, steps 1-11)
    h = ttnn.rms_norm(tx, epsilon=EPS, weight=gamma["attn"], program_config=norm_pc,
                      memory_config=resid_mem)
    xqkv = ttnn.linear(h, tw["wqkv"], program_config=dram_pc(DIM, 384, 8), memory_config=L1WS,
                       dtype=ttnn.bfloat16)
    xqkv = ttnn.sharded_to_interleaved(xqkv, ttnn.L1_MEMORY_CONFIG, ttnn.bfloat16)
    q, k, v = ttnn.experimental.nlp_create_qkv_heads_decode(
        xqkv, num_heads=NH, num_kv_heads=NKV, memory_config=ttnn.L1_HEIGHT_SHARDED_MEMORY_CONFIG)
    rot_idx = on(device, pos[None].to(torch.int64), ttnn.uint32, RM)  # [1, B]
    rot_mem = ttnn.create_sharded_memory_config(
        (32, DH), ttnn.num_cores_to_corerangeset(B, ttnn.CoreCoord(8, 8), row_wise=True),
        ttnn.ShardStrategy.HEIGHT, use_height_and_width_as_shard_shape=True)
    rots = []
    for table in (cos_m, sin_m):
        r = ttnn.unsqueeze_to_4D(ttnn.embedding(rot_idx, table, layout=ttnn.TILE_LAYOUT))
        rots.append(ttnn.interleaved_to_sharded(ttnn.transpose(r, 1, 2), rot_mem))  # [1,B,1,DH]
    tmat = torch.zeros(1, 1, 32, 32)
    for i in range(16):
        tmat[..., 2 * i, 2 * i + 1], tmat[..., 2 * i + 1, 2 * i] = 1, -1
    t_mem = ttnn.create_sharded_memory_config(
        (32, 32), ttnn.num_cores_to_corerangeset(B, ttnn.CoreCoord(8, 8), row_wise=True),
        ttnn.ShardStrategy.HEIGHT, use_height_and_width_as_shard_shape=True)
    ttm = on(device, tmat.repeat(1, 1, B, 1), mem=t_mem)
    q = ttnn.experimental.rotary_embedding_llama(q, *rots, ttm, is_decode_mode=True)
    k = ttnn.experimental.rotary_embedding_llama(k, *rots, ttm, is_decode_mode=True)
    ttnn.experimental.paged_update_cache(kc, k, update_idxs_tensor=cur, page_table=tpt)
    ttnn.experimental.paged_update_cache(vc, v, update_idxs_tensor=cur, page_table=tpt)
    o = ttnn.transformer.paged_scaled_dot_product_attention_decode(
        q, kc, vc, tpt, cur_pos_tensor=cur, scale=DH**-0.5,
        memory_config=ttnn.DRAM_MEMORY_CONFIG)
    o = ttnn.to_memory_config(o, ttnn.create_sharded_memory_config(
        (32, DH), ttnn.num_cores_to_corerangeset(B, ttnn.CoreCoord(8, 8), row_wise=True),
        ttnn.ShardStrategy.HEIGHT, use_height_and_width_as_shard_shape=True))
    o = ttnn.experimental.nlp_concat_heads_decode(o, num_heads=NH)  # [1,1,B,NH*DH]
    attn = ttnn.linear(o, tw["wo"], program_config=dram_pc(NH * DH, DIM, NH),
                       memory_config=o.memory_config())
    attn = ttnn.to_memory_config(attn, resid_mem)
    h1 = ttnn.add(tx, attn, memory_config=resid_mem)

    # --- MLP
    m = ttnn.rms_norm(h1, epsilon=EPS, weight=gamma["mlp"], program_config=norm_pc,
                      memory_config=resid_mem)
    a1 = ttnn.linear(m, tw["w1"], program_config=dram_pc(DIM, HID, 8), memory_config=L1WS)
    a3 = ttnn.linear(m, tw["w3"], program_config=dram_pc(DIM, HID, 8), memory_config=L1WS)
    gated = ttnn.mul(a1, a3, input_tensor_a_activations=[ttnn.UnaryOpType.SILU],
                     dtype=ttnn.bfloat8_b, memory_config=a1.memory_config())
    gated = ttnn.to_memory_config(gated, width_sharded_l1(32, HID, 8))
    mlp = ttnn.linear(gated, tw["w2"], program_config=dram_pc(HID, DIM, 8), memory_config=L1WS)
    out = ttnn.add(h1, ttnn.to_memory_config(mlp, resid_mem), memory_config=resid_mem)
    got = ttnn.to_torch(out).float()[0, 0]

    # --- torch reference with the same weights
    def rms(t, g):
        return bf16(t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + EPS)) * bf16(g)

    xr = bf16(x)[0, 0]
    qkv = rms(xr, g_attn) @ wq["wqkv"]
    qr = qkv[:, : NH * DH].reshape(B, NH, DH)
    kr = qkv[:, NH * DH: (NH + NKV) * DH].reshape(B, NKV, DH)
    vr = qkv[:, (NH + NKV) * DH:].reshape(B, NKV, DH)
    c, s = cos[pos][:, None], sin[pos][:, None]
    qr, kr = meta_rope(qr, c, s), meta_rope(kr, c, s)
    kq, vq = ttnn.to_torch(on(device, k_hist, ttnn.bfloat8_b)), ttnn.to_torch(
        on(device, v_hist, ttnn.bfloat8_b))
    attn_r = torch.zeros(B, NH, DH)
    for b in range(B):
        kb = kq[pt[b].long()].transpose(0, 1).reshape(NKV, NBLK * BS, DH).clone()
        vb = vq[pt[b].long()].transpose(0, 1).reshape(NKV, NBLK * BS, DH).clone()
        p = int(pos[b])
        kb[:, p], vb[:, p] = kr[b], vr[b]
        kb, vb = kb.repeat_interleave(NH // NKV, 0)[:, : p + 1], vb.repeat_interleave(
            NH // NKV, 0)[:, : p + 1]
        probs = torch.softmax((qr[b][:, None] @ kb.transpose(-1, -2))[:, 0] * DH**-0.5, -1)
        attn_r[b] = (probs[:, None] @ vb)[:, 0]
    h1r = xr + attn_r.reshape(B, NH * DH) @ wq["wo"]
    mr = rms(h1r, g_mlp)
    ref = h1r + (torch.nn.functional.silu(mr @ wq["w1"]) * (mr @ wq["w3"])) @ wq["w2"]
    assert pcc(got, ref) > 0.999, pcc(got, ref)
    assert tuple(out.shape) == (1, 1, B, DIM) and out.memory_config() == resid_mem
