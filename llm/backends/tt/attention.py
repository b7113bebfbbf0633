"""Grouped-query attention in TT-NN: prefill (flash SDPA, paged fill) and decode (paged update,
paged flash-decode), following reference section 9.

Weights: wqkv `[1, 1, dim, (nh + 2 nkv) dh]` with Q/K rows permuted to Meta's interleaved RoPE
order, per device the columns [Q_i | K_i | V_i] of its heads (column-parallel; which heads, with
padding heads and replicated KV heads where the counts do not divide the mesh: heads.py); wo
`[1, 1, nh dh, dim]` split by rows over the devices (row-parallel), its partial sums reduced by
an all-reduce (decode, replicated residual) or a reduce-scatter (prefill, fractured residual),
the o_proj bias (if any) added once, on device 0, before the reduction.
With `config.qk_norm` (Qwen3), q and k heads are RMS-normalised over head_dim before RoPE, their
gains `[dh]` permuted to the interleaved order like the Q/K rows and replicated on every device.
"""

from __future__ import annotations

import torch

from llm.backends.tt.chunking import prefill_linear
from llm.backends.tt.mesh import Mesh
from llm.backends.tt.norm import gain_sticks
from llm.backends.tt.op_configs import OpConfigs
from llm.backends.tt.rope import RotarySetup
from llm.backends.tt.weights import WeightStore, once_bias, reverse_permute
from llm.model.config import ModelConfig
from llm.model.rope import head_row_index, rotary_row_order


class Attention:
    """One layer's attention: fused QKV, RoPE, paged KV cache, SDPA, output projection."""

    def __init__(self, mesh: Mesh, weights: WeightStore, cfg: OpConfigs, config: ModelConfig,
                 tensors: dict[str, torch.Tensor], layer: int, rope: RotarySetup) -> None:
        ttnn = mesh.ttnn
        self.mesh, self.cfg, self.rope = mesh, cfg, rope
        geo, prec, nd = cfg.geo, cfg.precision.decoder(layer), mesh.ndev
        self.prec = prec  # this decoder's dtypes; its compute-kernel configs:
        self.kernels = {g: cfg.kernel(g, layer) for g in ("wqkv", "wo", "sdpa_prefill",
                                                          "sdpa_decode")}
        self.scale = config.attention_scale  # 1/sqrt(head_dim), or Granite's multiplier
        p = f"model.layers.{layer}.self_attn."
        wq, wk, wv = (tensors[p + f"{n}_proj.weight"] for n in ("q", "k", "v"))
        dim, qkv_all, dh, heads = geo.dim, geo.qkv * nd, geo.head_dim, geo.heads

        order = rotary_row_order(config)  # partial rotation: rotary dims first in each head

        def rows(t: torch.Tensor, heads: int) -> torch.Tensor:
            """Q/K rows (or a q/k norm gain, heads 1): rotary order, then interleaved."""
            if order is not None:
                t = t[head_row_index(heads, order)]
            return reverse_permute(t.float(), heads)

        def fuse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            """Per device [Q_i | K_i | V_i] of its head slots along the output dim (zero rows
            for padding heads, replicated KV heads repeated), devices concatenated."""
            q = heads.q_rows(rows(q, config.num_heads), dh)
            k = heads.kv_rows(rows(k, config.num_kv_heads), dh)
            parts = zip(q.chunk(nd, 0), k.chunk(nd, 0), heads.kv_rows(v.float(), dh).chunk(nd, 0))
            return torch.cat([torch.cat(qkv, 0) for qkv in parts], 0)  # [qkv_all, ...]

        self.wqkv = weights.tensor(
            f"layer{layer}_wqkv_{dim}x{qkv_all}", wq,
            lambda _: fuse(wq, wk, wv).T.reshape(1, 1, dim, qkv_all),
            dtype=prec.wqkv, layout=ttnn.TILE_LAYOUT,
            memory_config=cfg.qkv.weight_memcfg, mapper=mesh.shard(3))
        self.bqkv = None
        if config.qkv_bias:
            bq, bk, bv = (tensors[p + f"{n}_proj.bias"] for n in ("q", "k", "v"))
            self.bqkv = weights.tensor(
                f"layer{layer}_bqkv_{qkv_all}", bq,
                lambda _: fuse(bq, bk, bv).reshape(1, 1, 1, qkv_all),
                dtype=ttnn.bfloat16, layout=ttnn.TILE_LAYOUT,
                memory_config=ttnn.DRAM_MEMORY_CONFIG, mapper=mesh.shard(3))
        self.q_norm = self.k_norm = None
        self.eps = config.rms_norm_eps
        if config.qk_norm:
            self.q_norm, self.k_norm = (
                gain_sticks(mesh, weights, f"layer{layer}_{n}_norm_interleaved_{geo.head_dim}",
                            rows(tensors[p + f"{n}_norm.weight"], 1),
                            mesh.replicate())
                for n in ("q", "k"))
        wo = tensors[p + "o_proj.weight"]  # [dim, nh dh]
        rows = nd * geo.n_heads * dh  # the input rows of every device's head slots
        self.wo = weights.tensor(
            f"layer{layer}_wo_{rows}x{dim}", wo,
            lambda t: heads.q_rows(t.float().T, dh).reshape(1, 1, rows, dim),
            dtype=prec.wo, layout=ttnn.TILE_LAYOUT,
            memory_config=cfg.wo.weight_memcfg, mapper=mesh.shard(2))
        self.bo = None  # o_proj bias, added once before the mesh's reduction
        if config.o_bias:
            self.bo = once_bias(mesh, weights, f"layer{layer}_bo", tensors[p + "o_proj.bias"])

    def _norm_heads(self, q, k, decode: bool):
        """q, k heads -> the same heads RMS-normalised over dh with the q_norm / k_norm gains
        (Qwen3), q and k deallocated; (q, k) themselves without qk_norm. rms_norm does not take
        the height-sharded decode heads: they are normalised interleaved in L1 and resharded."""
        if self.q_norm is None:
            return q, k
        ttnn = self.mesh.ttnn
        kernel = self.cfg.kernels["hifi4"]
        out = []
        for t, gain in ((q, self.q_norm), (k, self.k_norm)):
            if decode:  # [1, B, nh|nkv, dh] height-sharded
                mem = t.memory_config()
                flat = ttnn.sharded_to_interleaved(t, ttnn.L1_MEMORY_CONFIG)
                normed = ttnn.rms_norm(flat, epsilon=self.eps, weight=gain,
                                       memory_config=ttnn.L1_MEMORY_CONFIG,
                                       compute_kernel_config=kernel)
                ttnn.deallocate(flat)
                out.append(ttnn.interleaved_to_sharded(normed, mem))
                ttnn.deallocate(normed)
            else:  # [1, nh|nkv, S, dh] DRAM
                out.append(ttnn.rms_norm(t, epsilon=self.eps, weight=gain,
                                         memory_config=ttnn.DRAM_MEMORY_CONFIG,
                                         compute_kernel_config=kernel))
            ttnn.deallocate(t)
        return tuple(out)

    # ------------------------------------------------------------------------------ decode
    def decode(self, x, rot, cur_pos, page_table, cache_k, cache_v):
        """x `[1, 1, B, dim]` (one row per user, padded to 32; normalised, width-sharded L1) ->
        the attention output `[1, 1, B, dim]` in the residual memory config, summed over the mesh.

        rot: (cos, sin) `[1, B, 1, dh]` height-sharded; cur_pos int32 `[B]` (-1 = idle user);
        page_table int32 `[B, max_blocks]`."""
        ttnn, cfg, geo = self.mesh.ttnn, self.cfg, self.cfg.geo
        xin = ttnn.to_memory_config(x, cfg.qkv.input_memcfg)  # reshard onto the QKV grid
        xqkv = ttnn.linear(xin, self.wqkv, program_config=cfg.qkv.program_config,
                           memory_config=ttnn.L1_WIDTH_SHARDED_MEMORY_CONFIG,
                           dtype=ttnn.bfloat16, compute_kernel_config=self.kernels["wqkv"])
        ttnn.deallocate(xin)
        xqkv_i = ttnn.sharded_to_interleaved(xqkv, ttnn.L1_MEMORY_CONFIG, ttnn.bfloat16)
        ttnn.deallocate(xqkv)
        if self.bqkv is not None:
            biased = ttnn.add(xqkv_i, self.bqkv, memory_config=ttnn.L1_MEMORY_CONFIG)
            ttnn.deallocate(xqkv_i)
            xqkv_i = biased
        q, k, v = ttnn.experimental.nlp_create_qkv_heads_decode(
            xqkv_i, num_heads=geo.n_heads, num_kv_heads=geo.n_kv,
            memory_config=ttnn.L1_HEIGHT_SHARDED_MEMORY_CONFIG)  # [1, B, nh|nkv, dh]
        ttnn.deallocate(xqkv_i)
        q, k = self._norm_heads(q, k, decode=True)
        q_rot, k_rot = self.rope.rotate(q, k, rot, decode=True)
        ttnn.deallocate(q)
        ttnn.deallocate(k)
        ttnn.experimental.paged_update_cache(cache_k, k_rot, update_idxs_tensor=cur_pos,
                                             page_table=page_table)
        ttnn.experimental.paged_update_cache(cache_v, v, update_idxs_tensor=cur_pos,
                                             page_table=page_table)
        ttnn.deallocate(k_rot)
        ttnn.deallocate(v)
        o = ttnn.transformer.paged_scaled_dot_product_attention_decode(
            q_rot, cache_k, cache_v, page_table, cur_pos_tensor=cur_pos, scale=self.scale,
            program_config=cfg.sdpa_decode_program_config,
            compute_kernel_config=self.kernels["sdpa_decode"],
            memory_config=ttnn.DRAM_MEMORY_CONFIG)  # [1, B, nh, dh]
        ttnn.deallocate(q_rot)
        o_sh = ttnn.to_memory_config(o, cfg.sdpa_out_memcfg)
        ttnn.deallocate(o)
        o_cat = ttnn.experimental.nlp_concat_heads_decode(
            o_sh, num_heads=geo.n_heads)  # [1, 1, 32, nh dh] width-sharded, a head per core
        ttnn.deallocate(o_sh)
        out = ttnn.linear(o_cat, self.wo, program_config=cfg.wo.program_config,
                          memory_config=ttnn.L1_WIDTH_SHARDED_MEMORY_CONFIG,
                          dtype=ttnn.bfloat16, compute_kernel_config=self.kernels["wo"])
        ttnn.deallocate(o_cat)
        return self.mesh.all_reduce_sharded(out, cfg.residual_memcfg,
                                            bias=self.bo)  # [1, 1, B, dim]

    # ------------------------------------------------------------------------------ prefill
    def prefill(self, x, rot, page_row, cache_k, cache_v, start: int = 0, fill_row=None):
        """x `[1, 1, S, dim]` (one user's tokens at positions start.., normalised, DRAM) ->
        `[1, 1, S, dim_local]`, the attention output summed over the mesh (reduce-scattered when the
        residual is fractured; the full width otherwise).

        rot: (cos, sin) `[1, 1, S, dh]` of those positions; page_row int32 `[1, max_blocks]` the
        user's pages. A chunk at start > 0 (a multiple of the block size) writes its K/V through
        fill_row (the pages from block start / block_size on) and attends to the whole cached
        context with chunked flash attention."""
        ttnn, cfg, geo, prec, kern = self.mesh.ttnn, self.cfg, self.cfg.geo, self.prec, \
            self.kernels
        dram = ttnn.DRAM_MEMORY_CONFIG
        s = x.shape[-2]
        xqkv = prefill_linear(ttnn, cfg, x, self.wqkv, "wqkv", cfg.qkv_chunk,
                              kern["wqkv"])  # [1, 1, S, qkv]
        if self.bqkv is not None:
            xqkv = ttnn.add(xqkv, self.bqkv, memory_config=dram)
        q, k, v = ttnn.experimental.nlp_create_qkv_heads(
            xqkv, num_heads=geo.n_heads, num_kv_heads=geo.n_kv, transpose_k_heads=False,
            memory_config=dram)  # q [1, nh, S, dh], k and v [1, nkv, S, dh]
        ttnn.deallocate(xqkv)
        q, k = self._norm_heads(q, k, decode=False)
        q, k = self.rope.rotate(q, k, rot, decode=False)
        fill_row = page_row if fill_row is None else fill_row
        capacity = fill_row.shape[-1] * cache_k.shape[2]  # tokens the page row can hold
        # K and V in the KV-cache dtype, for the cache and for flash attention; Q in the
        # policy's prefill_q dtype (tt_transformers' forward_prefill)
        k, v = (t if t.dtype == prec.kv_cache else ttnn.typecast(t, prec.kv_cache)
                for t in (k, v))
        for cache, t in ((cache_k, k), (cache_v, v)):
            fill = t
            if s > capacity:
                fill = ttnn.slice(t, (0, 0, 0, 0), (1, geo.n_kv, capacity, geo.head_dim))
            ttnn.experimental.paged_fill_cache(cache, fill, fill_row, batch_idx=0)
        q = q if q.dtype == prec.prefill_q else ttnn.typecast(q, prec.prefill_q)
        if start == 0:
            o = ttnn.transformer.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=self.scale, program_config=cfg.sdpa_prefill[s],
                compute_kernel_config=kern["sdpa_prefill"], memory_config=dram)  # [1, nh, S, dh]
        else:  # queries at start.. attend causally to keys [0, start + S) in the paged cache
            o = ttnn.transformer.chunked_scaled_dot_product_attention(
                q, cache_k, cache_v, page_row, start, scale=self.scale,
                program_config=cfg.sdpa_chunked_config(start, s),
                compute_kernel_config=kern["sdpa_prefill"], memory_config=dram)
        o = ttnn.experimental.nlp_concat_heads(o, memory_config=dram)  # [1, 1, S, nh dh]
        out = prefill_linear(ttnn, cfg, o, self.wo, "wo", cfg.mlp_chunk,
                             kern["wo"])  # [1, 1, S, dim]
        return self.mesh.reduce_prefill(out, dram, geo.fractured, bias=self.bo)
