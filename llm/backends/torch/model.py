"""The Llama decoder stack on torch: embedding, decoder layers, final norm, LM head."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import torch

from llm.backends.torch.attention import Attention, DecodeMeta, PrefillMeta
from llm.backends.torch.embedding import Embedding
from llm.backends.torch.kv_cache import PagedKVCache
from llm.backends.torch.lm_head import LMHead
from llm.backends.torch.mlp import MLP
from llm.backends.torch.norm import RMSNorm
from llm.backends.torch.parallel.mesh import Mesh
from llm.backends.torch.parallel.plan import TensorParallelPlan
from llm.backends.torch.parallel.slices import TensorDictSlices, WeightSlices
from llm.backends.torch.quant.cpu import CpuQuantLinear
from llm.backends.torch.quant.native import NativeKernels
from llm.backends.torch.rope import RotaryEmbedding
from llm.backends.torch.sampling import SamplingTensors, sample
from llm.backends.torch.weight import (
    QuantLinear,
    RowBlocks,
    blocks_of,
    is_dense,
    linear,
    nbytes,
    on_device,
)
from llm.model.config import ModelConfig, RuntimeConfig

# Decode batches that use the fused GEMVs (and the GEMV LM head) where the Triton decode kernels
# run. One row, on an H200 (bf16, 2026-12-01, docs/performance.md v8): 4.63 -> 4.24 ms per step
# (Llama-3.1-8B shapes) and 1.13 -> 0.98 ms (1B) against cuBLAS; from four rows up cuBLAS is as
# fast or faster (v7).
GEMV_MAX_BATCH = 1


class DecoderLayer:
    """r = x + attn(norm(x)), then r + mlp(norm(r)), written so that every residual add is fused
    into the norm that follows it: a layer takes the previous sublayer's output and the residual
    stream, and returns its MLP output and the updated residual stream.
    """

    def __init__(self, config: ModelConfig, w: dict[str, torch.Tensor], layer: int,
                 fused: bool = False, mesh: Mesh | None = None,
                 cpu_kernels: NativeKernels | None = None) -> None:
        p = f"model.layers.{layer}."
        eps = config.rms_norm_eps
        self.attn_norm = RMSNorm(w[p + "input_layernorm.weight"], eps, fused, cpu_kernels)
        self.attn = Attention(config, w, layer, fused, mesh)
        self.mlp_norm = RMSNorm(w[p + "post_attention_layernorm.weight"], eps, fused, cpu_kernels)
        self.mlp = MLP.from_weights(w, p + "mlp.", fused, mesh)
        self.res = config.residual_multiplier  # Granite's, of each sublayer's output
        self.mesh = mesh or Mesh.single()
        # the counters of the norms fused into o_proj and down (`decode_chained`)
        self.arrivals = torch.zeros(2, dtype=torch.int32, device=self.attn_norm.weight.device)

    def _scaled(self, out: torch.Tensor) -> torch.Tensor:
        """A sublayer's output as it enters the residual stream (Granite: times res)."""
        return out if self.res == 1.0 else out * self.res

    def prefill(self, x: torch.Tensor, residual: torch.Tensor | None, meta: PrefillMeta,
                cache: PagedKVCache) -> tuple[torch.Tensor, torch.Tensor]:
        """x, residual [S, H] -> (mlp output, residual stream), both [S, H]."""
        h, residual = self.attn_norm.add_norm(x, residual)
        h, residual = self.mlp_norm.add_norm(self._scaled(self.attn.prefill(h, meta, cache)),
                                             residual)
        return self._scaled(self.mlp(h)), residual

    def decode(self, x: torch.Tensor, residual: torch.Tensor | None, meta: DecodeMeta,
               cache: PagedKVCache, gemv: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """x, residual [B, H] -> (mlp output, residual stream), both [B, H].

        gemv (small batches on CUDA): 4 Triton GEMVs instead of 7 kernels: the residual add and
        norm in the prologue of QKV and of gate/up, SiLU*up in gate/up's epilogue, then o_proj
        and down.
        """
        if gemv:
            from llm.backends.torch.kernels.gemv import norm_gate_up_silu_gemv, norm_gemv

            an, mn, mlp = self.attn_norm, self.mlp_norm, self.mlp
            qkv, residual = norm_gemv(x, residual, an.weight, an.eps, self.attn.wqkv,
                                      self.attn.bqkv)  # [B, q + 2kv]
            o = self._scaled(self.attn.decode_qkv(qkv, meta, cache, gemv=True))
            act, residual = norm_gate_up_silu_gemv(o, residual, mn.weight, mn.eps, mlp.gate_up,
                                                   mlp.gate_up_bias)  # [B, I]
            return self._scaled(mlp.down_gemv(act)), residual
        h, residual = self.attn_norm.add_norm(x, residual)
        h, residual = self.mlp_norm.add_norm(self._scaled(self.attn.decode(h, meta, cache)),
                                             residual)
        return self._scaled(self.mlp(h)), residual

    def decode_chained(self, h: torch.Tensor, residual: torch.Tensor, meta: DecodeMeta,
                       cache: PagedKVCache, then: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """decode() with each norm moved into the projection before it: h [B, H] is this layer's
        input already normalised by its attn_norm, residual the stream it was normalised from;
        returns the layer's output normalised by `then` (the next layer's attn_norm, or the
        final norm) and the updated stream. The same values as decode() then `then.add_norm`;
        where the quantized one-row GEMV runs, o_proj and down carry the norm after them in
        their epilogue (RMSNorm.after): two launches a layer fewer."""
        out = self.attn.decode_heads(h, meta, cache)  # [B, nh*hd]
        h, residual = self._project_norm(out, self.attn.wo, self.attn.bo, residual,
                                         self.mlp_norm, 0)
        act = self.mlp.act(h)  # [B, I]
        return self._project_norm(act, self.mlp.down, self.mlp.down_bias, residual, then, 1)

    def _project_norm(self, x: torch.Tensor, w: torch.Tensor | QuantLinear | RowBlocks,
                      bias: torch.Tensor | None,
                      residual: torch.Tensor, norm: RMSNorm, site: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """norm.add_norm(sublayer output, residual) for a sublayer's last projection of x: in
        its launch where it can (one rank, no Granite multiplier), else apart."""
        if self.mesh.size == 1 and self.res == 1.0:
            return norm.after(x, w, bias, residual, self.arrivals[site:site + 1])
        return norm.add_norm(self._scaled(self.mesh.all_reduce(linear(x, w, bias))), residual)

    def decode_native(self, x: torch.Tensor, residual: torch.Tensor | None, meta: DecodeMeta,
                      cache: PagedKVCache, kernels: NativeKernels,
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """decode() in float32 on the CPU with the C kernels: each norm with its residual add,
        the attention after QKV and the SiLU*up are one call each (quant/cpu_kernels.c)."""
        h, residual = self.attn_norm.add_norm(x, residual)
        h, residual = self.mlp_norm.add_norm(
            self._scaled(self.attn.decode_native(h, meta, cache, kernels)), residual)
        return self._scaled(self.mlp.native(h, kernels)), residual


def _native(w: object) -> CpuQuantLinear | list[CpuQuantLinear] | None:
    """A projection as `NativeKernels.layer_plan` takes it (its C kernels' layer, or its row
    blocks' layers), or None where a block is not quantized for the C kernels."""
    blocks = blocks_of(w)
    if not all(isinstance(b, QuantLinear) and b.cpu().kind == "native" for b in blocks):
        return None
    layers = [b.cpu() for b in blocks]
    return layers if isinstance(w, RowBlocks) else layers[0]


class Transformer:
    """A whole Llama-family model whose weights live on one torch device in one dtype, or this
    rank's part of it on a tensor-parallel mesh (`llm.backends.torch.parallel.plan` says which
    part).
    """

    def __init__(self, config: ModelConfig,
                 tensors: Mapping[str, torch.Tensor] | WeightSlices, runtime: RuntimeConfig,
                 lm_head_chunk: int | None = None, decode_kernel: bool | None = None,
                 mesh: Mesh | None = None, gemv_max_batch: int | None = None,
                 cpu_kernels: NativeKernels | None = None) -> None:
        """tensors: the canonical tensors, or a WeightSlices reading only this rank's slices.
        decode_kernel: use the Triton paged-decode attention (default: on CUDA when Triton is
        installed and the head_dim / block_size suit it) with the fused Triton norm and RoPE
        kernels; otherwise the torch paths.
        gemv_max_batch: decode batches up to this size run the layers' projections as fused
        Triton GEMVs (DecoderLayer.decode, needs the decode kernels); default GEMV_MAX_BATCH
        with the decode kernels, else 0.
        cpu_kernels: the C kernels that apply quantized weights to float32 activations on the CPU
        (quant/native.py; None: torch ops only).
        """
        self.config = config
        self.mesh = mesh = mesh or Mesh.single()
        if not isinstance(tensors, WeightSlices):
            tensors = TensorDictSlices(config, tensors)
        plan = TensorParallelPlan.for_weights(tensors, mesh.size)  # quantized: group-aligned
        shard = plan.shard(mesh.rank)
        self.local = local = plan.local_config(mesh.rank)  # this rank's heads, widths, vocab
        self.device = torch.device(runtime.device)
        self.dtype = getattr(torch, runtime.dtype)
        self.block_size = runtime.block_size
        self.cpu_kernels = None  # the decode step and norms by the C kernels: CPU, float32
        if (cpu_kernels is not None and self.device.type == "cpu" and self.dtype == torch.float32
                and config.head_dim % 2 == 0):
            self.cpu_kernels = cpu_kernels
        w = {k: on_device(v, self.device, self.dtype, cpu_kernels)
             for k, v in plan.read_local(tensors, mesh.rank).items()}
        self.quantized = any(not is_dense(t) for t in w.values())
        if decode_kernel is None:
            decode_kernel = self.device.type == "cuda" and _triton_supports(config, runtime)
        self.embed = Embedding(w["model.embed_tokens.weight"], mesh, shard.vocab[0])
        self.layers = [DecoderLayer(local, w, i, decode_kernel, mesh, self.cpu_kernels)
                       for i in range(config.num_layers)]
        self.norm = RMSNorm(w["model.norm.weight"], config.rms_norm_eps, decode_kernel,
                            self.cpu_kernels)
        head = w["model.embed_tokens.weight"] if config.tie_word_embeddings else w["lm_head.weight"]
        if lm_head_chunk is None:  # one matmul on a GPU and by the C kernels, else bounded
            one = self.device.type == "cuda" or self.cpu_kernels is not None
            lm_head_chunk = head.shape[0] if one else 16384
        sizes = [plan.shard(r).vocab[1] - plan.shard(r).vocab[0] for r in range(mesh.size)]
        self.lm_head = LMHead(head, lm_head_chunk, mesh, shard.vocab[0], sizes,
                              fused_argmax=decode_kernel)
        self.weight_bytes = sum(nbytes(t) for t in self._held_weights())
        self.rope = RotaryEmbedding(config, runtime.max_seq_len, self.device, self.dtype)
        self.max_pages = runtime.blocks_per_seq
        self.n_sm = (torch.cuda.get_device_properties(self.device).multi_processor_count
                     if decode_kernel and self.device.type == "cuda" else 1)
        self.decode_kernel = decode_kernel
        if gemv_max_batch is None:  # the fused GEMVs read dense weights only
            gemv_max_batch = GEMV_MAX_BATCH if decode_kernel and not self.quantized else 0
        if gemv_max_batch and self.quantized:
            raise ValueError("gemv_max_batch > 0 needs dense weights; these are quantized")
        if gemv_max_batch and not decode_kernel:
            raise ValueError("gemv_max_batch > 0 needs the Triton decode kernels (decode_kernel)")
        self.gemv_max_batch = gemv_max_batch
        # decode beyond the fused GEMVs by DecoderLayer.decode_chained (each norm in the
        # projection before it where it can); False: DecoderLayer.decode (the A/B of
        # bench/quant_decode.py --unchained)
        self.chained_norms = True

    def _layer_plans(self, cache: PagedKVCache) -> list | None:
        """The layers as `NativeKernels.layer_plan`s (built on first use, rebuilt for another
        cache), or None where a layer cannot run as one C call: a projection that is not
        quantized for the C kernels (dense), a mesh (its all-reduces), q/k head norms
        (Qwen3), Granite's multipliers or another attention scale than 1/sqrt(head_dim) (LongRoPE)
        (cpu_kernels.c `layer_decode` has none of them: such layers decode op by op)."""
        plans = getattr(self, "_plans", None)
        if plans is not None and all(p.kpool is cache.k[i] for i, p in enumerate(plans)):
            return plans
        self._plans = None
        c = self.config
        if self.mesh.size > 1 or c.qk_norm or c.scaled or c.attention_scale != c.head_dim ** -0.5:
            return None
        built = []
        for i, layer in enumerate(self.layers):
            a, m = layer.attn, layer.mlp
            ws = [_native(w) for w in (a.wqkv, a.wo, m.gate_up, m.down)]
            if any(w is None for w in ws):
                return None
            built.append(self.cpu_kernels.layer_plan(
                *ws, (a.bqkv, a.bo, m.gate_up_bias, m.down_bias),
                layer.attn_norm.weight, layer.mlp_norm.weight, layer.attn_norm.eps,
                cache.k[i], cache.v[i], a.n_heads))
        self._plans = built
        return built

    def cpu_layer_kinds(self) -> dict[str, int]:
        """How many quantized matrices run by each CPU layer kind (`CpuQuantLinear.kind`:
        native, int4pack, int8pack, dense); empty on CUDA or for dense weights."""
        kinds: dict[str, int] = {}
        for t in self._held_weights():
            for b in t.blocks if isinstance(t, RowBlocks) else [t]:
                if isinstance(b, QuantLinear) and b.cpu_kind is not None:
                    kinds[b.cpu_kind] = kinds.get(b.cpu_kind, 0) + 1
        return kinds

    def _held_weights(self) -> list:
        """Every weight the modules hold, each once (fused ones as fused; a tied dense head is
        the embedding; a quantized head is its chunks), with the quantized linear layers
        prepared for the CPU here, at load, rather than in the first request."""
        head = self.lm_head
        linears = list(head.chunks) if isinstance(head.weight, QuantLinear) else [head.weight]
        norms = [self.norm.weight]
        for layer in self.layers:
            a, m = layer.attn, layer.mlp
            linears += [a.wqkv, a.bqkv, a.wo, a.bo, m.gate_up, m.gate_up_bias, m.down,
                        m.down_bias]
            norms += [layer.attn_norm.weight, layer.mlp_norm.weight]
            norms += [n.weight for n in (a.q_norm, a.k_norm) if n is not None]
        for t in linears:
            if isinstance(t, (QuantLinear, RowBlocks)):
                t.prepare()
        held = [self.embed.weight, *norms, *linears]
        return list({id(t): t for t in held if t is not None}.values())

    @torch.inference_mode()
    def prefill(self, tokens: torch.Tensor, start_pos: int | torch.Tensor, page_row: torch.Tensor,
                cache: PagedKVCache, all_logits: bool = False,
                last: torch.Tensor | None = None, logits: bool = True) -> torch.Tensor | None:
        """tokens [S] at positions start_pos.. for one user with pages page_row [max_blocks].
        start_pos: an int, or a [1] int64 tensor on the device: then the Triton paged prefill
        attention (needs decode_kernel) and nothing read on the host (a CUDA-graph continuation
        chunk, see prefill_graphs.py); start_pos + S must stay within max_seq_len.

        Returns logits [V] of the last position (or [S, V] with all_logits, for tests and scoring);
        on a mesh, this rank's vocabulary slice of them (`gather_logits` / `sample`). last: [1]
        index of the last real token on the device, when `tokens` is padded at its end (CUDA-graph
        prefill, see prefill_graphs.py); the logits are that token's. logits=False: only the K/V
        are written (a chunk before the prompt's last); returns None.
        """
        s = tokens.shape[0]
        if isinstance(start_pos, torch.Tensor):
            meta = PrefillMeta.paged(self.rope, start_pos, s, page_row, self.block_size, self.n_sm,
                                     cache.k[0].shape[1])
        else:
            meta = PrefillMeta.build(self.rope, start_pos, s, page_row, self.block_size)
        x, residual = self._embed(tokens), None  # [S, H]
        for layer in self.layers:
            x, residual = layer.prefill(x, residual, meta, cache)
        if not logits:
            return None
        if not all_logits:
            keep = slice(-1, None) if last is None else last
            x, residual = x[keep], residual[keep]  # [1, H]
        out = self._logits(self.norm.add_norm(x, residual)[0])  # [S or 1, V]
        return out if all_logits else out[0]

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, page_table: torch.Tensor,
               cache: PagedKVCache, max_pos: int | None = None) -> torch.Tensor:
        """tokens, positions [B]; page_table [B, max_blocks]; max_pos = max(positions) (host-known,
        needed by the gather path only). Returns logits [B, V] (on a mesh: [B, V_local]).
        """
        ppp = None
        if self.decode_kernel:
            from llm.backends.torch.kernels.paged_decode import pages_per_split

            ppp = pages_per_split(tokens.shape[0], self.local.num_kv_heads, self.max_pages,
                                  self.n_sm)
        meta = DecodeMeta.build(self.rope, positions, page_table, self.block_size, max_pos, ppp)
        x, residual = self._embed(tokens), None  # [B, H]
        k = self.cpu_kernels
        if k is not None:
            meta = replace(meta, page_table=meta.page_table.contiguous())
            plans = self._layer_plans(cache)
            if plans:  # one C call per layer (any batch: beyond the C matmuls' 16 rows the
                # per-op path's layers dequantize and use F.linear, faster for prompts, slower
                # here; the two then differ in the last bits)
                x, residual = k.decode_layers(plans, x.contiguous(), meta.cos, meta.sin,
                                              meta.page_table, meta.positions, meta.max_pos)
            else:
                for layer in self.layers:
                    x, residual = layer.decode_native(x, residual, meta, cache, k)
            return self._logits(self.norm.add_norm(x, residual)[0])
        gemv = tokens.shape[0] <= self.gemv_max_batch
        if gemv or not self.chained_norms:
            for layer in self.layers:
                x, residual = layer.decode(x, residual, meta, cache, gemv)
            return self._logits(self.norm.add_norm(x, residual)[0], gemv)  # [B, V]
        h, residual = self.layers[0].attn_norm.add_norm(x, None)
        thens = [layer.attn_norm for layer in self.layers[1:]] + [self.norm]
        for layer, then in zip(self.layers, thens, strict=True):
            h, residual = layer.decode_chained(h, residual, meta, cache, then)
        return self._logits(h)  # [B, V]

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [N] -> the first layer's input [N, H] (Granite: times embedding_multiplier)."""
        x = self.embed(tokens)
        m = self.config.embedding_multiplier
        return x if m == 1.0 else x * m

    def _logits(self, h: torch.Tensor, gemv: bool = False) -> torch.Tensor:
        """The final norm's output h [N, H] -> logits [N, V] (Granite: over logits_scaling)."""
        logits = self.lm_head(h, gemv)
        s = self.config.logits_scaling
        return logits if s == 1.0 else logits / s

    def gather_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits from prefill/decode -> the whole vocabulary's (identity on one rank)."""
        if logits.dim() == 1:
            return self.lm_head.gather(logits[None])[0]
        return self.lm_head.gather(logits)

    def sample(self, logits: torch.Tensor, st: SamplingTensors | None,
               positions: torch.Tensor | None, all_greedy: bool) -> torch.Tensor:
        """Next tokens [B] from decode logits [B, V(_local)]: greedy from a distributed argmax
        (st and positions unused: they may be None), otherwise
        `llm.backends.torch.sampling.sample` over the gathered vocabulary; the same on every rank.
        """
        if all_greedy:
            return self.lm_head.argmax(logits)
        if st is None or positions is None:
            raise ValueError("sampling needs its SamplingTensors and positions")
        return sample(self.lm_head.gather(logits), st, positions, all_greedy=False)


def _triton_supports(config: ModelConfig, runtime: RuntimeConfig) -> bool:
    try:
        from llm.backends.torch.kernels.paged_decode import supported
    except ImportError:  # triton is not installed
        return False
    return supported(config.head_dim, runtime.block_size)
