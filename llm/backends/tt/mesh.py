"""The device handle the model code works on: the ttnn module, the (mesh) device and its
collectives.

Every module receives a `Mesh` and calls ttnn through `mesh.ttnn`; whether that is real ttnn or
`llm.ttnn_emu` is decided once, by the runner, and never asked again. Tensor parallelism is 1-D
over all devices of the mesh (a 1xN or Nx1 mesh is one ring of N devices). `TILE`, the edge of
ttnn's tiles, is defined here once for the whole backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

TILE = 32  # ttnn.TILE_SIZE: tiles are 32x32; decode users are the rows of one tile


@dataclass(frozen=True)
class Mesh:
    """ttnn module + opened mesh device; `ndev` devices in 1-D tensor parallelism."""

    ttnn: Any
    device: Any
    rows: int
    cols: int

    @property
    def ndev(self) -> int:
        return self.rows * self.cols

    # ------------------------------------------------------------------ host -> device mappers
    def replicate(self):
        """Mapper placing the same tensor on every device (None on a single device)."""
        return self.ttnn.ReplicateTensorToMesh(self.device) if self.ndev > 1 else None

    def shard(self, dim: int):
        """Mapper splitting `dim` into ndev equal chunks in device order (None on one device)."""
        return self.ttnn.ShardTensorToMesh(self.device, dim=dim) if self.ndev > 1 else None

    # ------------------------------------------------------------------ device -> host
    def read(self, t) -> torch.Tensor:
        """A replicated device tensor (device 0's copy) as a torch tensor."""
        if self.ndev == 1:
            return self.ttnn.to_torch(t)
        stacked = self.ttnn.to_torch(t, mesh_composer=self.ttnn.ConcatMeshToTensor(self.device,
                                                                                    dim=0))
        return stacked[:t.shape[0]]  # device 0's copy

    def read_concat(self, t, dim: int) -> torch.Tensor:
        """A tensor fractured over the mesh along `dim`, reassembled on the host."""
        if self.ndev == 1:
            return self.ttnn.to_torch(t)
        return self.ttnn.to_torch(t, mesh_composer=self.ttnn.ConcatMeshToTensor(self.device,
                                                                                dim=dim))

    # ------------------------------------------------------------------ collectives
    def all_reduce(self, t, memory_config):
        """Sum of the partial results of a row-parallel matmul, on every device (identity on 1)."""
        if self.ndev == 1:
            return t
        return self.ttnn.all_reduce(t, memory_config=memory_config)

    def all_reduce_sharded(self, t, memory_config, bias=None):
        """Partial sums of a row-parallel decode matmul, L1 width-sharded, summed over the mesh
        (interleaved in L1 for the all-reduce) and moved into memory_config; frees t. bias: a
        row `[1, 1, 1, N]` added to the partial sums (a `once_bias`: device 0's, so once)."""
        ttnn = self.ttnn
        if self.ndev > 1 or bias is not None:
            partial = ttnn.sharded_to_interleaved(t, ttnn.L1_MEMORY_CONFIG)
            ttnn.deallocate(t)
            if bias is not None:
                biased = ttnn.add(partial, bias, memory_config=ttnn.L1_MEMORY_CONFIG)
                ttnn.deallocate(partial)
                partial = biased
            t = self.all_reduce(partial, ttnn.L1_MEMORY_CONFIG)
            if t is not partial:
                ttnn.deallocate(partial)
        out = ttnn.to_memory_config(t, memory_config)
        ttnn.deallocate(t)
        return out

    def reduce_prefill(self, t, memory_config, fractured: bool, bias=None):
        """Partial sums of a row-parallel prefill matmul `[1, 1, S, N]` summed over the mesh:
        each device keeps its width slice when the residual is `fractured` (reduce-scatter),
        else the whole sum (all-reduce). bias as in all_reduce_sharded."""
        if bias is not None:
            biased = self.ttnn.add(t, bias, memory_config=memory_config)
            self.ttnn.deallocate(t)
            t = biased
        return self.reduce_scatter(t, memory_config) if fractured else \
            self.all_reduce(t, memory_config)

    def reduce_scatter(self, t, memory_config):
        """Sum of row-parallel partial results, each device keeping its width slice (dim 3)."""
        if self.ndev == 1:
            return t
        return self.ttnn.reduce_scatter(t, 3, memory_config=memory_config)

    def all_gather(self, t, dim: int, memory_config):
        """Concatenate each device's slice along `dim` on every device (identity on 1)."""
        if self.ndev == 1:
            return t
        return self.ttnn.all_gather(t, dim, memory_config=memory_config)
