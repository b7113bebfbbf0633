"""The paged KV cache on the device: per layer, K and V page pools
`[num_blocks, n_kv_local, block_size, head_dim]` in DRAM.

Page ids are the Generator's (`llm.engine.paged_kv`): page 0 is the padding page of page-table
rows and is never handed to a user, so writes of padded prompt rows that land there are harmless.
On a mesh each device holds the pools of its own KV heads.
"""

from __future__ import annotations

import torch

from llm.backends.tt.mesh import Mesh
from llm.backends.tt.op_configs import OpConfigs
from llm.model.config import RuntimeConfig


class PagedKVCache:
    """K/V page pools for every layer, each in its decoder's KV dtype."""

    def __init__(self, mesh: Mesh, cfg: OpConfigs, runtime: RuntimeConfig,
                 num_layers: int) -> None:
        ttnn = mesh.ttnn
        geo = cfg.geo
        self.mesh = mesh
        self.block_size = runtime.block_size
        self.num_blocks = runtime.total_blocks
        self.blocks_per_seq = runtime.blocks_per_seq
        shape = (self.num_blocks, geo.n_kv, self.block_size, geo.head_dim)
        zeros = torch.zeros(shape)

        def pool(layer: int):
            return ttnn.from_torch(zeros, dtype=cfg.precision.decoder(layer).kv_cache,
                                   layout=ttnn.TILE_LAYOUT, device=mesh.device,
                                   memory_config=ttnn.DRAM_MEMORY_CONFIG,
                                   mesh_mapper=mesh.replicate())

        self.k = [pool(i) for i in range(num_layers)]
        self.v = [pool(i) for i in range(num_layers)]

    def copy_pages(self, pairs: list[tuple[int, int]]) -> None:
        """For each (src, dst): copy page src into page dst in every layer's K and V pool (a
        page sliced out in the pool's dtype, filled back through a one-page page table)."""
        ttnn, mesh = self.mesh.ttnn, self.mesh
        for src, dst in pairs:
            row = ttnn.from_torch(torch.tensor([[dst]], dtype=torch.int32), dtype=ttnn.int32,
                                  layout=ttnn.ROW_MAJOR_LAYOUT, device=mesh.device,
                                  memory_config=ttnn.DRAM_MEMORY_CONFIG,
                                  mesh_mapper=mesh.replicate())  # [1, 1] page table
            for pool in (*self.k, *self.v):
                _, n_kv, bs, hd = pool.shape
                page = ttnn.slice(pool, (src, 0, 0, 0), (src + 1, n_kv, bs, hd))  # [1, kv, bs, hd]
                ttnn.experimental.paged_fill_cache(pool, page, row, batch_idx=0)
                ttnn.deallocate(page)
            ttnn.deallocate(row)
