"""Token embedding on the device: a row-major bf16 table, gathered with `ttnn.embedding`."""

from __future__ import annotations

import torch

from llm.backends.tt.mesh import Mesh
from llm.backends.tt.weights import WeightStore


class Embedding:
    """The `[vocab, dim]` table as `[1, 1, vocab, dim]` ROW_MAJOR bf16; on a mesh with a
    `fractured` residual each device holds `dim / ndev` columns, so a lookup yields the
    width-fractured activation; otherwise every device holds the whole table."""

    def __init__(self, mesh: Mesh, weights: WeightStore, table: torch.Tensor,
                 fractured: bool) -> None:
        ttnn = mesh.ttnn
        self.mesh = mesh
        vocab, dim = table.shape
        self.weight = weights.tensor(
            f"embedding_{vocab}x{dim}", table, lambda t: t.reshape(1, 1, vocab, dim).float(),
            dtype=ttnn.bfloat16, layout=ttnn.ROW_MAJOR_LAYOUT,
            memory_config=ttnn.DRAM_MEMORY_CONFIG,
            mapper=mesh.shard(3) if fractured else mesh.replicate())

    def __call__(self, tokens, memory_config=None):
        """tokens uint32 ROW_MAJOR `[1, 1, 1, S]` (S a multiple of 32) -> `[1, 1, S, dim_local]`
        TILE bf16."""
        ttnn = self.mesh.ttnn
        x = ttnn.embedding(tokens, self.weight, layout=ttnn.TILE_LAYOUT,
                           memory_config=memory_config or ttnn.DRAM_MEMORY_CONFIG)  # [1, S, d]
        return ttnn.unsqueeze_to_4D(x)  # [1, 1, S, d]
