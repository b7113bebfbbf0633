"""The LM head: the vocabulary split into column chunks of at most `max_columns_per_device`,
each a DRAM-sharded matmul, the chunk logits concatenated; argmax on the device.

On a mesh the (padded) vocabulary is split over the devices first (column-parallel); the logits
are all-gathered before the argmax.
"""

from __future__ import annotations

import torch

from llm.backends.tt.mesh import Mesh
from llm.backends.tt.op_configs import OpConfigs
from llm.backends.tt.weights import WeightStore


class LMHead:
    """logits = norm(x) @ W^T over chunks of the vocabulary."""

    def __init__(self, mesh: Mesh, weights: WeightStore, cfg: OpConfigs,
                 weight: torch.Tensor) -> None:
        ttnn = mesh.ttnn
        self.mesh, self.cfg = mesh, cfg
        geo, nd = cfg.geo, mesh.ndev
        vocab, dim = weight.shape

        def chunk_of(start: int, width: int):
            def prepare(w: torch.Tensor) -> torch.Tensor:
                wt = torch.zeros(dim, geo.vocab_padded)
                wt[:, :vocab] = w.float().T  # [dim, V_pad], padded columns zero
                cols = [wt[:, d * geo.vocab_local + start:d * geo.vocab_local + start + width]
                        for d in range(nd)]
                return torch.cat(cols, -1).reshape(1, 1, dim, nd * width)
            return prepare

        self.chunks = []
        start = 0
        for i, mm in enumerate(cfg.lm_head):
            self.chunks.append(weights.tensor(
                f"lm_head{i}_{dim}x{vocab}_cols{start}+{mm.n}", weight, chunk_of(start, mm.n),
                dtype=cfg.precision.lm_head, layout=ttnn.TILE_LAYOUT,
                memory_config=mm.weight_memcfg, mapper=mesh.shard(3)))
            start += mm.n

    def __call__(self, x):
        """x `[1, 1, B, dim]` normalised, width-sharded L1 -> logits `[1, 1, B, V_local]` TILE
        bf16 in DRAM (this device's slice of the padded vocabulary)."""
        ttnn, cfg = self.mesh.ttnn, self.cfg
        outs = []
        for w, mm in zip(self.chunks, cfg.lm_head):
            xin = ttnn.to_memory_config(x, mm.input_memcfg)
            o = ttnn.linear(xin, w, program_config=mm.program_config,
                            memory_config=ttnn.L1_WIDTH_SHARDED_MEMORY_CONFIG,
                            dtype=ttnn.bfloat16, compute_kernel_config=cfg.lm_head_kernel())
            ttnn.deallocate(xin)
            outs.append(ttnn.sharded_to_interleaved(o, ttnn.DRAM_MEMORY_CONFIG))
            ttnn.deallocate(o)
        if len(outs) == 1:
            return outs[0]
        logits = ttnn.concat(outs, dim=-1, memory_config=ttnn.DRAM_MEMORY_CONFIG)
        for o in outs:
            ttnn.deallocate(o)
        return logits

    def gather(self, logits):
        """Per-device logits `[1, 1, 32, V_local]` -> `[1, 1, 32, vocab]` ROW_MAJOR on every
        device (padded columns dropped)."""
        ttnn, geo = self.mesh.ttnn, self.cfg.geo
        dram = ttnn.DRAM_MEMORY_CONFIG
        rows = ttnn.untilize(logits, memory_config=dram)
        full = self.mesh.all_gather(rows, 3, dram)  # [1, 1, 32, V_pad]
        if geo.vocab_padded != geo.vocab:
            full = ttnn.slice(full, (0, 0, 0, 0), (1, 1, full.shape[2], geo.vocab))
        return full

    def argmax(self, logits, output_tensor=None):
        """Greedy token per row on the device: uint32 `[1, 1, 32]`."""
        ttnn = self.mesh.ttnn
        rows = self.gather(logits)
        return ttnn.argmax(rows, dim=3, keepdim=False, memory_config=ttnn.DRAM_MEMORY_CONFIG,
                           output_tensor=output_tensor)
