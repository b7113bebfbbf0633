"""The paged KV cache on the device: per layer, K and V pools `[num_blocks, n_kv, block_size,
head_dim]`.
"""

from __future__ import annotations

import torch

from llm.model.config import ModelConfig, RuntimeConfig


class PagedKVCache:
    """K/V page pools for every layer; page ids come from the Generator's `llm.engine.paged_kv`."""

    def __init__(self, config: ModelConfig, runtime: RuntimeConfig, device: torch.device | str,
                 dtype: torch.dtype) -> None:
        shape = (runtime.total_blocks, config.num_kv_heads, runtime.block_size, config.head_dim)
        self.block_size = runtime.block_size
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]

    @torch.inference_mode()
    def copy_pages(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy pages src [P] into pages dst [P] in every layer."""
        for pool in (*self.k, *self.v):
            pool[dst] = pool[src]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, blocks: torch.Tensor,
              offsets: torch.Tensor) -> None:
        """Store k, v [N, n_kv, hd] at (blocks[i], :, offsets[i]) for each of the N tokens."""
        self.k[layer][blocks, :, offsets] = k
        self.v[layer][blocks, :, offsets] = v

    def gather(self, layer: int, page_table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """page_table [B, nb] -> K, V [B, n_kv, nb * block_size, hd] in sequence order."""
        b, nb = page_table.shape

        def pages(pool: torch.Tensor) -> torch.Tensor:
            x = pool[page_table]  # [B, nb, n_kv, bs, hd]
            x = x.permute(0, 2, 1, 3, 4)  # [B, n_kv, nb, bs, hd]
            return x.reshape(b, x.shape[1], nb * self.block_size, x.shape[-1])

        return pages(self.k[layer]), pages(self.v[layer])
