"""RMSNorm on the device, and the distributed form for width-fractured activations.

The gain is stored as `[1, 1, dim/32, 32]` ROW_MAJOR bf16 sticks (the layout rms_norm reads
without padding). Decode normalises the width-sharded L1 residual in place of its shards;
prefill normalises DRAM-interleaved rows. On a mesh, prefill activations are fractured over the
devices' width: `DistributedNorm` computes local sums of squares, all-gathers them, normalises
each slice with its slice of the gain and all-gathers the result for the column-parallel matmul.
"""

from __future__ import annotations

import torch

from llm.backends.tt.mesh import TILE, Mesh
from llm.backends.tt.op_configs import OpConfigs
from llm.backends.tt.weights import WeightStore


def gain_sticks(mesh: Mesh, weights: WeightStore, name: str, gain: torch.Tensor, mapper):
    """gain `[dim]` -> `[1, 1, dim/32, 32]` ROW_MAJOR bf16 in DRAM, placed by mapper, cached as
    name."""
    ttnn = mesh.ttnn
    dim = gain.shape[0]
    return weights.tensor(name, gain, lambda g: g.float().reshape(1, 1, dim // TILE, TILE),
                          dtype=ttnn.bfloat16, layout=ttnn.ROW_MAJOR_LAYOUT,
                          memory_config=ttnn.DRAM_MEMORY_CONFIG, mapper=mapper)


class RMSNorm:
    """y = x / sqrt(mean(x^2) + eps) * gain over the full (replicated) width."""

    def __init__(self, mesh: Mesh, weights: WeightStore, cfg: OpConfigs, name: str,
                 gain: torch.Tensor, eps: float) -> None:
        self.mesh, self.cfg, self.eps = mesh, cfg, eps
        self.weight = gain_sticks(mesh, weights, f"{name}_gain_{gain.shape[0]}", gain,
                                  mesh.replicate())

    def decode(self, x):
        """x `[1, 1, B, dim]` (B <= 32 rows) width-sharded L1 -> same shape and sharding."""
        return self.mesh.ttnn.rms_norm(
            x, epsilon=self.eps, weight=self.weight, program_config=self.cfg.norm_program_config,
            memory_config=self.cfg.residual_memcfg, compute_kernel_config=self.cfg.kernels["hifi4"])

    def prefill(self, x):
        """x `[1, 1, S, dim]` DRAM interleaved -> same."""
        ttnn = self.mesh.ttnn
        return ttnn.rms_norm(x, epsilon=self.eps, weight=self.weight,
                             memory_config=ttnn.DRAM_MEMORY_CONFIG,
                             compute_kernel_config=self.cfg.kernels["hifi4"])


class DistributedNorm:
    """Prefill norm of activations fractured `[1, 1, S, dim/ndev]` over the mesh; returns the
    full-width normalised `[1, 1, S, dim]` on every device. Decode (replicated residual) uses the
    plain sharded norm. On one device, or a mesh whose residual is not fractured (the hidden size
    not a multiple of 32 ndev), both are the plain RMSNorm."""

    def __init__(self, mesh: Mesh, weights: WeightStore, cfg: OpConfigs, name: str,
                 gain: torch.Tensor, eps: float) -> None:
        self.mesh, self.cfg, self.eps = mesh, cfg, eps
        self.norm = RMSNorm(mesh, weights, cfg, name, gain, eps)
        self.local_weight = None
        if cfg.geo.fractured:  # each device's slice of the sticks
            self.local_weight = gain_sticks(
                mesh, weights, f"{name}_gain_{gain.shape[0]}_split{mesh.ndev}", gain,
                mesh.shard(2))

    def decode(self, x):
        """x `[1, 1, B, dim]` replicated, width-sharded L1 -> same."""
        return self.norm.decode(x)

    def prefill(self, x):
        """x `[1, 1, S, dim_local]` (fractured) -> `[1, 1, S, dim]` on every device."""
        if not self.cfg.geo.fractured:
            return self.norm.prefill(x)
        ttnn = self.mesh.ttnn
        dram = ttnn.DRAM_MEMORY_CONFIG
        kernel = self.cfg.kernels["hifi4"]
        stats = ttnn.rms_norm_pre_all_gather(x, dtype=ttnn.bfloat16, memory_config=dram,
                                             compute_kernel_config=kernel)  # [1, 1, S, 32]
        stats = self.mesh.all_gather(stats, 3, dram)  # [1, 1, S, 32 ndev]
        y = ttnn.rms_norm_post_all_gather(x, stats, epsilon=self.eps, weight=self.local_weight,
                                          memory_config=dram, compute_kernel_config=kernel)
        return self.mesh.all_gather(y, 3, dram)  # [1, 1, S, dim]
