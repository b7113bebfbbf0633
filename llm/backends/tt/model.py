"""The Llama decoder stack in TT-NN: embedding, decoder layers, final norm, LM head, argmax or
sampling.

Prefill runs one user's padded prompt through every layer (filling its KV pages), keeps only the
32-row tile holding the last real token, and runs the norm and LM head on that tile. Decode runs
one token for each of the B user rows (idle rows have position -1), entirely on device tensors,
so it can be captured in a trace (see trace.py).
"""

from __future__ import annotations

import torch

from llm.backends.tt.attention import Attention
from llm.backends.tt.embedding import Embedding
from llm.backends.tt.inverse_cdf import InverseCdf
from llm.backends.tt.kv_cache import PagedKVCache
from llm.backends.tt.lm_head import LMHead
from llm.backends.tt.logprobs import LogprobsOps, Selected, select
from llm.backends.tt.mesh import TILE, Mesh
from llm.backends.tt.mlp import MLP
from llm.backends.tt.norm import DistributedNorm
from llm.backends.tt.op_configs import OpConfigs
from llm.backends.tt.penalties import SlotPenalties
from llm.backends.tt.rope import RotarySetup
from llm.backends.tt.sampling import Sampler
from llm.backends.tt.thresholds import Filters
from llm.backends.tt.weights import WeightStore
from llm.model.config import ModelConfig, RuntimeConfig


class DecoderLayer:
    """h = x + attn(norm(x)); out = h + mlp(norm(h))."""

    def __init__(self, mesh: Mesh, weights: WeightStore, cfg: OpConfigs, config: ModelConfig,
                 tensors: dict[str, torch.Tensor], layer: int, rope: RotarySetup) -> None:
        p = f"model.layers.{layer}."
        # Granite: each sublayer's output times residual_multiplier, folded into o_proj and down
        # (the products of linear maps; the SDPA scale is Attention's)
        res = config.residual_multiplier
        tensors = {**tensors, **{p + n: _scaled(tensors[p + n], res)
                                 for n in ("self_attn.o_proj.weight", "mlp.down_proj.weight")}}
        self.mesh = mesh
        self.layer = layer
        eps = config.rms_norm_eps
        self.attn_norm = DistributedNorm(mesh, weights, cfg, f"layer{layer}_attn_norm",
                                         tensors[p + "input_layernorm.weight"], eps)
        self.attn = Attention(mesh, weights, cfg, config, tensors, layer, rope)
        self.mlp_norm = DistributedNorm(mesh, weights, cfg, f"layer{layer}_mlp_norm",
                                        tensors[p + "post_attention_layernorm.weight"], eps)
        self.mlp = MLP(mesh, weights, cfg, tensors, layer, config.mlp_bias)
        self.residual_memcfg = cfg.residual_memcfg

    def decode(self, x, rot, cur_pos, page_table, cache: PagedKVCache):
        """x `[1, 1, B, dim]` (B rows of a 32-row tile) width-sharded L1 residual -> same."""
        return self.forward("decode", x, cache, rot=rot, cur_pos=cur_pos, page_table=page_table)

    def prefill(self, x, rot, page_row, cache: PagedKVCache, start: int = 0, fill_row=None):
        """x `[1, 1, S, dim_local]` DRAM residual (fractured over the mesh) of the tokens at
        positions start.. -> same (see Attention.prefill for start and fill_row)."""
        return self.forward("prefill", x, cache, rot=rot, page_row=page_row, start=start,
                            fill_row=fill_row)

    def forward(self, mode: str, x, cache: PagedKVCache, **attn_args):
        """The layer in `mode` ("prefill" | "decode"): every sublayer runs its method of that
        name, the residual adds write the mode's residual memory config (decode: width-sharded
        L1; prefill: DRAM). attn_args: the rest of `Attention.<mode>`'s arguments, by name."""
        if mode not in ("prefill", "decode"):
            raise ValueError(f"mode must be 'prefill' or 'decode', got {mode!r}")
        ttnn = self.mesh.ttnn
        mem = self.residual_memcfg if mode == "decode" else ttnn.DRAM_MEMORY_CONFIG
        attn_norm, attn, mlp_norm, mlp = (getattr(m, mode) for m in (
            self.attn_norm, self.attn, self.mlp_norm, self.mlp))
        h = attn_norm(x)  # decode [1, 1, B, dim]; prefill [1, 1, S, dim] (the full width)
        a = attn(h, cache_k=cache.k[self.layer], cache_v=cache.v[self.layer], **attn_args)
        ttnn.deallocate(h)
        h1 = ttnn.add(x, a, memory_config=mem)
        ttnn.deallocate(a)
        m = mlp_norm(h1)
        f = mlp(m)
        ttnn.deallocate(m)
        out = ttnn.add(h1, f, memory_config=mem)
        ttnn.deallocate(h1)
        ttnn.deallocate(f)
        return out


def _scaled(t: torch.Tensor, factor: float) -> torch.Tensor:
    """t times factor in float32 (t itself for 1)."""
    return t if factor == 1.0 else t.float() * factor


class Transformer:
    """The whole model on a mesh, with its paged KV cache."""

    def __init__(self, mesh: Mesh, config: ModelConfig, runtime: RuntimeConfig,
                 tensors: dict[str, torch.Tensor], cfg: OpConfigs, weights: WeightStore) -> None:
        self.mesh, self.config, self.cfg = mesh, config, cfg
        table = tensors["model.embed_tokens.weight"]
        # Granite: the embeddings times embedding_multiplier and the logits over logits_scaling,
        # folded into the embedding table and the LM head (a tied head is its own copy on tt)
        self.embed = Embedding(mesh, weights, _scaled(table, config.embedding_multiplier),
                               cfg.geo.fractured)
        self.rope = RotarySetup(mesh, config, cfg,
                                max(cfg.prefill_lengths[-1], runtime.max_seq_len))
        self.layers = [DecoderLayer(mesh, weights, cfg, config, tensors, i, self.rope)
                       for i in range(config.num_layers)]
        self.norm = DistributedNorm(mesh, weights, cfg, "final_norm", tensors["model.norm.weight"],
                                    config.rms_norm_eps)
        head = table if config.tie_word_embeddings else tensors["lm_head.weight"]
        self.lm_head = LMHead(mesh, weights, cfg, _scaled(head, 1.0 / config.logits_scaling))
        self.cache = PagedKVCache(mesh, cfg, runtime, config.num_layers)
        self.sampler = Sampler(mesh, cfg)
        # the full selection path (logprobs.select) and the whole-vocabulary draw
        self.penalties = self.logprob_ops = self.inverse_cdf = None
        if self.sampler.supported:
            width = cfg.geo.vocab_padded
            self.penalties = SlotPenalties(mesh, width)
            self.logprob_ops = LogprobsOps(mesh, cfg, width)
            self.inverse_cdf = InverseCdf(mesh, cfg, width, self.logprob_ops.ones)
        weights.save_manifest()

    # ------------------------------------------------------------------------------ prefill
    def prefill_hidden(self, tokens, page_row, start: int = 0, fill_row=None,
                       length: int | None = None):
        """tokens uint32 `[1, 1, 1, S]` (S a padded prefill length) at positions start..,
        page_row int32 `[1, max_blocks]` -> the final residual `[1, 1, S, dim_local]` (KV pages
        filled). A chunk at start > 0 also needs fill_row, its own pages (Attention.prefill).
        length: the chunk's real tokens (default S), which pick LongRoPE's factors."""
        s = tokens.shape[-1]
        rot = self.rope.prefill(s, start, start + (s if length is None else length))
        x = self.embed(tokens)  # [1, 1, S, dim_local]
        for layer in self.layers:
            x = layer.prefill(x, rot, page_row, self.cache, start, fill_row)
        return x

    def tile_logits(self, hidden, tile: int):
        """Logits `[1, 1, 32, V_local]` of rows [32 tile, 32 tile + 32) of a prefill residual."""
        ttnn = self.mesh.ttnn
        dl = hidden.shape[-1]
        last = ttnn.slice(hidden, (0, 0, TILE * tile, 0), (1, 1, TILE * (tile + 1), dl))
        x = self.norm.prefill(last)  # [1, 1, 32, dim]
        xs = ttnn.interleaved_to_sharded(x, self.cfg.residual_memcfg)
        logits = self.lm_head(xs)
        ttnn.deallocate(xs)
        return logits

    # ------------------------------------------------------------------------------ decode
    def decode(self, tokens, rot_idxs, cur_pos, page_table, next_tokens,
               sampling: dict | None = None, features: str | None = None,
               selected: Selected | None = None, exact: Filters | None = None):
        """One decode step for the B user rows, all on device tensors (trace-safe).

        tokens uint32 `[1, 1, 1, 32]` (users in the first B), rot_idxs uint32 `[1, 32]`,
        cur_pos int32 `[B]`,
        page_table int32 `[B, max_blocks]`. Writes the next tokens into next_tokens uint32
        `[1, 1, 32]` and feeds them back into tokens, then advances cur_pos (idle rows stay -1)
        and rot_idxs by one: the next step needs no host write when every user continues. The
        tokens are the argmax (greedy fast path) unless `sampling` gives the Sampler's device
        inputs (k, p, temp, rank_mask, seeds), whose seeds then advance by one too. With `features`
        ("logprobs", or "penalties" where some row penalizes) `sampling` also holds
        logprobs.FULL_INPUTS (and for "penalties" the penalty columns), the tokens come from
        logprobs.select (masks applied; for "penalties" the fed tokens counted and the penalties
        applied), copied into the persistent buffers `selected`, which are returned (else the
        logits). exact: the threshold searches of the rows drawn by inverse CDF (inverse_cdf.py,
        thresholds.py); None where no row is."""
        ttnn = self.mesh.ttnn
        dram = ttnn.DRAM_MEMORY_CONFIG
        b, dim = self.cfg.geo.batch, self.cfg.geo.dim
        emb = self.embed(tokens)  # [1, 1, 32, dim_local]
        full = self.mesh.all_gather(emb, 3, dram) if self.cfg.geo.fractured else emb
        # full: the replicated residual [1, 1, 32, dim]
        full = ttnn.reshape(full, (1, 1, b, dim), (1, 1, TILE, dim))  # B real rows of the tile
        x = ttnn.to_memory_config(full, self.cfg.residual_memcfg)
        rot = self.rope.decode(rot_idxs)
        for layer in self.layers:
            x = layer.decode(x, rot, cur_pos, page_table, self.cache)
        h = self.norm.decode(x)
        ttnn.deallocate(x)
        logits = self.lm_head(h)  # [1, 1, B, V_local]
        ttnn.deallocate(h)
        vl = logits.shape[-1]
        rows = ttnn.reshape(logits, (1, 1, TILE, vl), (1, 1, TILE, vl))  # the whole tile again
        out = logits
        if sampling is None:
            self.lm_head.argmax(rows, output_tensor=next_tokens)
        else:
            if features:
                sel = select(rows, self.sampler, self.penalties, self.logprob_ops, sampling,
                             fed=tokens, penalize=features == "penalties",
                             cdf=self.inverse_cdf if exact else None, filters=exact)
                out = sel.copy_into(ttnn, selected)
                drawn = out.tokens  # [1, 1, 1, 32], a persistent output
            else:
                drawn = self.sampler(rows, **sampling, cdf=self.inverse_cdf if exact else None,
                                     filters=exact)  # [1, 1, 1, 32]
            ttnn.to_memory_config(ttnn.reshape(drawn, (1, 1, TILE)), dram,
                                  output_tensor=next_tokens)
            if not features:
                ttnn.deallocate(drawn)
            ttnn.plus_one(sampling["seeds"])
        ttnn.to_memory_config(ttnn.reshape(next_tokens, (1, 1, 1, TILE)), dram,
                              output_tensor=tokens)  # fed back on device
        ttnn.plus_one(cur_pos, skip_negative_entries=True)
        ttnn.plus_one(rot_idxs)
        return out
