"""Grouped-query attention over a paged KV cache: causal prefill and one-token-per-user decode."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llm.backends.torch.kv_cache import PagedKVCache
from llm.backends.torch.norm import RMSNorm
from llm.backends.torch.parallel.mesh import Mesh
from llm.backends.torch.quant.native import NativeKernels
from llm.backends.torch.rope import RotaryEmbedding, apply_rotary
from llm.backends.torch.weight import (
    QuantLinear,
    RowBlocks,
    blocks_of,
    head_rows,
    linear,
    stack_rows,
)
from llm.model.config import ModelConfig
from llm.model.rope import rotary_row_order


@dataclass(frozen=True)
class PrefillMeta:
    """Shared by every layer for one prefill (one user, S tokens starting at start_pos).

    cos/sin/sin_rot [S, hd] (`RotaryEmbedding`); blocks/offsets [S] where each token's K/V goes;
    page_row [nb] the user's pages covering positions [0, start_pos + S) (used only when
    start_pos > 0); mask [S, start_pos + S] bool or None for a plain causal prompt.
    `paged` (start [1] on the device, start_pos None): the Triton paged prefill attention reads
    the keys through the whole page_row [max_blocks] (n_sm: the GPU's SMs, for its tiling;
    counters: its split arrival counters, int32 zeros that every layer's launch leaves zero, so
    one zeroing serves the whole forward).
    """

    start_pos: int | None
    cos: torch.Tensor
    sin: torch.Tensor
    sin_rot: torch.Tensor
    blocks: torch.Tensor
    offsets: torch.Tensor
    page_row: torch.Tensor
    mask: torch.Tensor | None
    start: torch.Tensor | None = None
    n_sm: int = 1
    counters: torch.Tensor | None = None

    @classmethod
    def build(cls, rope: RotaryEmbedding, start_pos: int, s: int, page_row: torch.Tensor,
              block_size: int) -> PrefillMeta:
        """Metadata for S tokens at start_pos.. of a user whose pages are page_row [max_blocks]."""
        device = page_row.device
        pos = torch.arange(start_pos, start_pos + s, device=device)  # [S]
        cos_table, sin_table, rot_table = rope.tables(start_pos + s)  # LongRoPE: by the end
        cos, sin = cos_table[pos], sin_table[pos]
        mask = None
        if start_pos > 0:
            keys = torch.arange(start_pos + s, device=device)
            mask = keys[None, :] <= pos[:, None]  # [S, start_pos + S]
        nb = -(-(start_pos + s) // block_size)
        return cls(start_pos, cos, sin, rot_table[pos], page_row[pos // block_size],
                   pos % block_size, page_row[:nb], mask)

    @classmethod
    def paged(cls, rope: RotaryEmbedding, start: torch.Tensor, s: int, page_row: torch.Tensor,
              block_size: int, n_sm: int, n_kv: int) -> PrefillMeta:
        """Metadata for S tokens at start.. where start [1] is on the device: every index is
        computed there (one CUDA graph serves any start). The caller keeps start + S within the
        RoPE table and the page row (max_seq_len); LongRoPE (tables chosen by the end position,
        on the host) is refused. n_kv: the cache's KV heads (counters: one per token and KV
        head bounds the kernel's (tile, KV head) pairs)."""
        if rope.by_end:
            raise ValueError("a device-side start needs RoPE tables that do not depend on the "
                             "end position (LongRoPE: prefill with a host start_pos)")
        pos = start + torch.arange(s, device=start.device)  # [S]
        return cls(None, rope.cos[pos], rope.sin[pos], rope.sin_rot[pos],
                   page_row[pos // block_size], pos % block_size, page_row, None, start, n_sm,
                   torch.zeros(s * n_kv, dtype=torch.int32, device=start.device))


@dataclass(frozen=True)
class DecodeMeta:
    """Shared by every layer for one decode step of B users.

    cos/sin/sin_rot [B, hd]; blocks/offsets [B] where each new K/V goes; positions [B]. Two
    attention paths:
    - kernel (pages_per_program set): the Triton paged flash-decode reads each user's pages up to
    its
      position on the device; page_table is the full [B, max_blocks] table and mask is None. Nothing
      depends on host values, so the step can be captured in a CUDA graph.
    - gather (CPU, or shapes the kernel does not take): page_table [B, nb] covers the longest user;
      mask [B, 1, 1, nb * block_size] is True where key position <= the user's position; with
      one user, mask is None and `length` = max_pos + 1 keys are attended.
    """

    cos: torch.Tensor
    sin: torch.Tensor
    sin_rot: torch.Tensor
    blocks: torch.Tensor
    offsets: torch.Tensor
    positions: torch.Tensor
    page_table: torch.Tensor
    mask: torch.Tensor | None
    pages_per_program: int | None = None
    length: int = 0
    max_pos: int = 0

    @classmethod
    def build(cls, rope: RotaryEmbedding, positions: torch.Tensor, page_table: torch.Tensor,
              block_size: int, max_pos: int | None = None,
              pages_per_program: int | None = None) -> DecodeMeta:
        """positions [B], page_table [B, max_blocks]. The gather path needs max_pos =
        max(positions), known on the host; the kernel path needs pages_per_program instead.
        """
        device = positions.device
        b = positions.shape[0]
        cos, sin = rope.gather(positions)
        rows = torch.arange(b, device=device)
        blocks = page_table[rows, positions // block_size]
        offsets = positions % block_size
        if pages_per_program is not None:
            return cls(cos, sin, sin, blocks, offsets, positions, page_table, None,
                       pages_per_program)
        if max_pos is None:
            raise ValueError("the gather attention path needs max_pos")
        nb = max_pos // block_size + 1
        sin_rot = rope.gather_rot(positions)
        if b == 1:  # one user: its keys up to its position, no mask
            return cls(cos, sin, sin_rot, blocks, offsets, positions, page_table[:, :nb], None,
                       length=max_pos + 1, max_pos=max_pos)
        keys = torch.arange(nb * block_size, device=device)
        mask = (keys[None, :] <= positions[:, None]).view(b, 1, 1, -1)  # [B, 1, 1, nb*bs]
        return cls(cos, sin, sin_rot, blocks, offsets, positions, page_table[:, :nb], mask,
                   max_pos=max_pos)


class Attention:
    """Fused QKV projection, RoPE, paged K/V write, SDPA with GQA, output projection.

    With `config.qk_norm` (Qwen3), every head of q and k is RMS-normalised over head_dim right
    after the projection, before RoPE, on every path (torch, Triton, the C kernels).

    On a mesh, `config` is the rank's local config (its heads and KV heads) and `w` its slices:
    QKV is column-parallel, o_proj row-parallel, followed by the all-reduce of the partial sums.
    """

    def __init__(self, config: ModelConfig, w: dict[str, torch.Tensor], layer: int,
                 fused_rope: bool = False, mesh: Mesh | None = None) -> None:
        """fused_rope: prefill rotates Q/K and writes the cache with the Triton kernel."""
        p = f"model.layers.{layer}.self_attn."
        self.layer = layer
        self.mesh = mesh or Mesh.single()
        self.fused_rope = fused_rope
        self.n_heads, self.n_kv, self.hd = config.num_heads, config.num_kv_heads, config.head_dim
        self.scale = config.attention_scale  # of q.k: 1/sqrt(head_dim), Granite's multiplier
        order = rotary_row_order(config)  # partial rotation: rotary dims first in each head

        def qk(kind: str) -> list:
            """q, k (rows in `order`) and v projections' `kind` tensors."""
            return [head_rows(w[p + f"q_proj.{kind}"], config.num_heads, order),
                    head_rows(w[p + f"k_proj.{kind}"], config.num_kv_heads, order),
                    w[p + f"v_proj.{kind}"]]

        self.wqkv = stack_rows(qk("weight"))  # [q + 2kv, H]
        self.bqkv = None
        if config.qkv_bias:
            self.bqkv = torch.cat(qk("bias"))
        self.wo = w[p + "o_proj.weight"]  # [H, q]
        self.bo = w.get(p + "o_proj.bias")
        self.splits = (config.q_size, config.kv_size, config.kv_size)
        self.q_norm = self.k_norm = None
        if config.qk_norm:
            self.q_norm = RMSNorm(head_rows(w[p + "q_norm.weight"], 1, order),
                                  config.rms_norm_eps)  # [hd]
            self.k_norm = RMSNorm(head_rows(w[p + "k_norm.weight"], 1, order),
                                  config.rms_norm_eps)

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, H] -> qkv [N, q + 2kv]: the QKV projection, then the q/k head norms."""
        return self._norm_qk(linear(x, self.wqkv, self.bqkv))

    def _norm_qk(self, qkv: torch.Tensor) -> torch.Tensor:
        """qkv [N, q + 2kv] -> the same with each q and k head RMS-normalised over head_dim
        (Qwen3); qkv itself without qk_norm."""
        if self.q_norm is None:
            return qkv
        n = qkv.shape[0]
        q, k, v = qkv.split(self.splits, dim=1)
        q = self.q_norm(q.reshape(n, self.n_heads, self.hd)).reshape(n, -1)  # [N, q]
        k = self.k_norm(k.reshape(n, self.n_kv, self.hd)).reshape(n, -1)  # [N, kv]
        return torch.cat([q, k, v], dim=1)

    def _split_rotate(self, qkv: torch.Tensor, cos: torch.Tensor, sin_rot: torch.Tensor):
        """qkv [N, q + 2kv] -> q [N, nh, hd], k and v [N, n_kv, hd], RoPE applied to q and k
        (in one pass over their heads)."""
        n, nh = qkv.shape[0], self.n_heads
        qk = qkv[:, : self.splits[0] + self.splits[1]].view(n, nh + self.n_kv, self.hd)
        qk = apply_rotary(qk, cos, sin_rot)  # [N, nh + n_kv, hd]
        v = qkv[:, self.splits[0] + self.splits[1]:].view(n, self.n_kv, self.hd)
        return qk[:, :nh], qk[:, nh:], v

    def prefill(self, x: torch.Tensor, meta: PrefillMeta, cache: PagedKVCache) -> torch.Tensor:
        """x [S, H] (one user) -> [S, H]; writes the S tokens' K/V into the user's pages."""
        s = x.shape[0]
        if meta.start is not None:
            return self._prefill_paged(x, meta, cache)
        if self.fused_rope:
            from llm.backends.torch.kernels.rope_kv import rope_and_cache

            qkv = self._project(x)  # [S, q + 2kv]
            q, k = rope_and_cache(qkv, meta.cos, meta.sin, meta.blocks, meta.offsets,
                                  cache.k[self.layer], cache.v[self.layer], self.n_heads,
                                  return_k=True)
            v = qkv[:, self.splits[0] + self.splits[1]:].view(s, self.n_kv, self.hd)
        else:
            q, k, v = self._split_rotate(self._project(x), meta.cos, meta.sin_rot)
            cache.write(self.layer, k, v, meta.blocks, meta.offsets)
        q = q.transpose(0, 1).unsqueeze(0)  # [1, nh, S, hd]
        if meta.mask is None:
            k = k.transpose(0, 1).unsqueeze(0)  # [1, n_kv, S, hd]
            v = v.transpose(0, 1).unsqueeze(0)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True,
                                                 scale=self.scale)
        else:
            total = meta.start_pos + s
            k, v = cache.gather(self.layer, meta.page_row[None])  # [1, n_kv, nb*bs, hd]
            k, v = k[:, :, :total], v[:, :, :total]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=meta.mask, enable_gqa=True,
                                                 scale=self.scale)
        out = out[0].transpose(0, 1).reshape(s, self.n_heads * self.hd)  # [S, nh*hd]
        return self.mesh.all_reduce(linear(out, self.wo, self.bo))

    def _prefill_paged(self, x: torch.Tensor, meta: PrefillMeta,
                       cache: PagedKVCache) -> torch.Tensor:
        """prefill() with the start on the device (`PrefillMeta.paged`): the fused RoPE + K/V
        write, then the Triton paged prefill attention over the user's pages."""
        if not self.fused_rope:
            raise ValueError("a device-side prefill start needs the Triton kernels (fused_rope)")
        from llm.backends.torch.kernels.paged_prefill import paged_prefill_attention
        from llm.backends.torch.kernels.rope_kv import rope_and_cache

        s = x.shape[0]
        kp, vp = cache.k[self.layer], cache.v[self.layer]
        q = rope_and_cache(self._project(x), meta.cos, meta.sin, meta.blocks, meta.offsets, kp,
                           vp, self.n_heads)  # [S, nh, hd]
        out = paged_prefill_attention(q, kp, vp, meta.page_row, meta.start, self.scale,
                                      n_sm=meta.n_sm, counters=meta.counters)  # [S, nh, hd]
        return self.mesh.all_reduce(linear(out.reshape(s, -1), self.wo, self.bo))

    def decode(self, x: torch.Tensor, meta: DecodeMeta, cache: PagedKVCache) -> torch.Tensor:
        """x [B, H] (one token per user) -> [B, H]; writes each user's new K/V at its position."""
        return self.project_out(self.decode_heads(x, meta, cache))

    def decode_heads(self, x: torch.Tensor, meta: DecodeMeta, cache: PagedKVCache
                     ) -> torch.Tensor:
        """decode() before the output projection: x [B, H] -> the heads' outputs [B, nh*hd]."""
        q = self._qkv_rope(x, meta, cache)
        if q is not None:
            return self._attend(q, meta, cache)
        return self._heads_from_qkv(linear(x, self.wqkv, self.bqkv), meta, cache)

    def _qkv_rope(self, x: torch.Tensor, meta: DecodeMeta, cache: PagedKVCache
                  ) -> torch.Tensor | None:
        """One token's rotated q [1, nh, hd] by the quantized QKV GEMV with RoPE and the K/V write
        in its epilogue (kernels/qgemv_words.py, bit-equal to the GEMV then `rope_and_cache`; one
        launch a row block where q/k and v are stored in different formats, `RowBlocks`), or
        None where it does not run: batches, dense weights, q/k head norms, the gather path."""
        w = self.wqkv
        blocks = blocks_of(w)
        if (meta.pages_per_program is None or x.shape[0] != 1 or not x.is_cuda
                or not all(isinstance(b, QuantLinear) for b in blocks)
                or self.q_norm is not None):
            return None
        from llm.backends.torch.kernels.qgemv_words import (
            RopeTarget,
            qgemv_words,
            words_kernel_runs,
        )

        if not all(words_kernel_runs(x, b.weight) for b in blocks):
            return None
        starts = w.starts if isinstance(w, RowBlocks) else [0, w.shape[0]]
        if any(lo % self.hd for lo in starts):
            return None  # a block boundary inside a head: the unfused path
        q = torch.empty(1, self.n_heads * self.hd, dtype=x.dtype, device=x.device)
        for b, lo, hi in zip(blocks, starts[:-1], starts[1:], strict=True):
            target = RopeTarget(meta.cos, meta.sin, meta.blocks, meta.offsets,
                                cache.k[self.layer], cache.v[self.layer], self.n_heads, lo, q)
            bias = None if self.bqkv is None else self.bqkv[lo:hi]
            qgemv_words(x, b.weight, bias, rope=target)  # q's columns of this block into q
        return q.view(1, self.n_heads, self.hd)

    def decode_native(self, x: torch.Tensor, meta: DecodeMeta, cache: PagedKVCache,
                      kernels: NativeKernels) -> torch.Tensor:
        """decode() in float32 on the CPU with the C kernels: QKV projection, then RoPE, K/V write
        and attention in one call (cpu_kernels.c `attention_decode`), then o_proj."""
        qkv = self._project(x).contiguous()  # [B, q + 2kv]
        out = kernels.attention_decode(qkv, meta.cos, meta.sin, cache.k[self.layer],
                                       cache.v[self.layer], meta.page_table, meta.positions,
                                       self.n_heads, meta.max_pos, self.scale)  # [B, q]
        return self.mesh.all_reduce(linear(out, self.wo, self.bo))

    def decode_qkv(self, qkv: torch.Tensor, meta: DecodeMeta, cache: PagedKVCache,
                   gemv: bool = False) -> torch.Tensor:
        """Decode from the QKV projection qkv [B, q + 2kv] (before the q/k head norms) -> [B, H].
        gemv: the output projection by the small-batch Triton GEMV instead of cuBLAS.
        """
        return self.project_out(self._heads_from_qkv(qkv, meta, cache), gemv)

    def _heads_from_qkv(self, qkv: torch.Tensor, meta: DecodeMeta, cache: PagedKVCache
                        ) -> torch.Tensor:
        """The QKV projection qkv [B, q + 2kv] -> the heads' outputs [B, nh*hd] (RoPE, the K/V
        write, the attention)."""
        b = qkv.shape[0]
        qkv = self._norm_qk(qkv)
        if meta.pages_per_program is not None:  # Triton: fused RoPE + K/V write, paged attention
            from llm.backends.torch.kernels.rope_kv import rope_and_cache

            q = rope_and_cache(qkv, meta.cos, meta.sin, meta.blocks, meta.offsets,
                               cache.k[self.layer], cache.v[self.layer],
                               self.n_heads)  # [B, nh, hd]
            return self._attend(q, meta, cache)
        q, k, v = self._split_rotate(qkv, meta.cos, meta.sin_rot)
        cache.write(self.layer, k, v, meta.blocks, meta.offsets)
        keys, values = cache.gather(self.layer, meta.page_table)  # [B, n_kv, L, hd]
        if meta.mask is None:  # one user: its first `length` keys
            keys, values = keys[:, :, : meta.length], values[:, :, : meta.length]
        out = F.scaled_dot_product_attention(q.unsqueeze(2), keys, values, attn_mask=meta.mask,
                                             enable_gqa=True, scale=self.scale)
        return out.reshape(b, self.n_heads * self.hd)  # [B, nh*hd]

    def _attend(self, q: torch.Tensor, meta: DecodeMeta, cache: PagedKVCache) -> torch.Tensor:
        """Rotated q [B, nh, hd] (its K/V written) -> [B, nh*hd] by the Triton paged
        attention."""
        from llm.backends.torch.kernels.paged_decode import paged_decode_attention

        out = paged_decode_attention(q, cache.k[self.layer], cache.v[self.layer],
                                     meta.page_table, meta.positions, self.scale,
                                     meta.pages_per_program)  # [B, nh, hd]
        return out.reshape(q.shape[0], self.n_heads * self.hd)

    def project_out(self, out: torch.Tensor, gemv: bool = False) -> torch.Tensor:
        """The attention's output [B, nh*hd] -> o_proj [B, H] (all-reduced on a mesh)."""
        if gemv:
            from llm.backends.torch.kernels.gemv import gemv as small_gemv

            return self.mesh.all_reduce(small_gemv(out, self.wo, self.bo))
        return self.mesh.all_reduce(linear(out, self.wo, self.bo))
