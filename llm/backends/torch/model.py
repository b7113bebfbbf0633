"""The Llama decoder stack on torch: embedding, decoder layers, final norm, LM head."""

from __future__ import annotations

import torch

from llm.backends.torch.attention import Attention, DecodeMeta, PrefillMeta
from llm.backends.torch.embedding import Embedding
from llm.backends.torch.kv_cache import PagedKVCache
from llm.backends.torch.lm_head import LMHead
from llm.backends.torch.mlp import MLP
from llm.backends.torch.norm import RMSNorm
from llm.backends.torch.rope import RotaryEmbedding
from llm.config import ModelConfig, RuntimeConfig


class DecoderLayer:
    """x + attn(norm(x)), then h + mlp(norm(h))."""

    def __init__(self, config: ModelConfig, w: dict[str, torch.Tensor], layer: int) -> None:
        p = f"model.layers.{layer}."
        self.attn_norm = RMSNorm(w[p + "input_layernorm.weight"], config.rms_norm_eps)
        self.attn = Attention(config, w, layer)
        self.mlp_norm = RMSNorm(w[p + "post_attention_layernorm.weight"], config.rms_norm_eps)
        self.mlp = MLP.from_weights(w, p + "mlp.")

    def prefill(self, x: torch.Tensor, meta: PrefillMeta, cache: PagedKVCache) -> torch.Tensor:
        """x [S, H] -> [S, H]."""
        h = x + self.attn.prefill(self.attn_norm(x), meta, cache)
        return h + self.mlp(self.mlp_norm(h))

    def decode(self, x: torch.Tensor, meta: DecodeMeta, cache: PagedKVCache) -> torch.Tensor:
        """x [B, H] -> [B, H]."""
        h = x + self.attn.decode(self.attn_norm(x), meta, cache)
        return h + self.mlp(self.mlp_norm(h))


class Transformer:
    """A whole Llama-family model whose weights live on one torch device in one dtype."""

    def __init__(self, config: ModelConfig, tensors: dict[str, torch.Tensor],
                 runtime: RuntimeConfig, lm_head_chunk: int = 16384) -> None:
        self.config = config
        self.device = torch.device(runtime.device)
        self.dtype = getattr(torch, runtime.dtype)
        self.block_size = runtime.block_size
        w = {k: v.to(device=self.device, dtype=self.dtype) for k, v in tensors.items()}
        self.embed = Embedding(w["model.embed_tokens.weight"])
        self.layers = [DecoderLayer(config, w, i) for i in range(config.num_layers)]
        self.norm = RMSNorm(w["model.norm.weight"], config.rms_norm_eps)
        head = w["model.embed_tokens.weight"] if config.tie_word_embeddings else w["lm_head.weight"]
        self.lm_head = LMHead(head, lm_head_chunk)
        self.rope = RotaryEmbedding(config, runtime.max_seq_len, self.device, self.dtype)

    @torch.inference_mode()
    def prefill(self, tokens: torch.Tensor, start_pos: int, page_row: torch.Tensor,
                cache: PagedKVCache, all_logits: bool = False) -> torch.Tensor:
        """tokens [S] at positions start_pos.. for one user with pages page_row [max_blocks].

        Returns logits [V] of the last position (or [S, V] with all_logits, for tests and scoring).
        """
        meta = PrefillMeta.build(self.rope, start_pos, tokens.shape[0], page_row, self.block_size)
        x = self.embed(tokens)  # [S, H]
        for layer in self.layers:
            x = layer.prefill(x, meta, cache)
        x = x if all_logits else x[-1:]
        logits = self.lm_head(self.norm(x))  # [S or 1, V]
        return logits if all_logits else logits[0]

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, page_table: torch.Tensor,
               cache: PagedKVCache, max_pos: int) -> torch.Tensor:
        """tokens, positions [B]; page_table [B, max_blocks]; max_pos = max(positions) (host-known).

        Returns logits [B, V].
        """
        meta = DecodeMeta.build(self.rope, positions, page_table, self.block_size, max_pos)
        x = self.embed(tokens)  # [B, H]
        for layer in self.layers:
            x = layer.decode(x, meta, cache)
        return self.lm_head(self.norm(x))  # [B, V]
