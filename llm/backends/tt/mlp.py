"""SwiGLU feed-forward in TT-NN: w2(silu(w1 x) * w3 x).

Decode: DRAM-sharded matmuls on L1 width-sharded activations, SiLU fused into the multiply.
Prefill: 2-D multicast matmuls, sequences longer than one chunk reshaped into chunks. On a mesh,
w1/w3 are column-parallel and w2 row-parallel (1-D weight sharding), its partial sums reduced;
the intermediate size is zero-padded to a multiple of 32 x ndev (padded units contribute
silu(0) * 0 = 0). With `mlp_bias`, gate/up biases are split like their columns and the down
bias is added once, on device 0, before the reduction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llm.backends.tt.chunking import prefill_linear
from llm.backends.tt.mesh import Mesh
from llm.backends.tt.op_configs import OpConfigs
from llm.backends.tt.weights import WeightStore, once_bias


class MLP:
    """One layer's SwiGLU MLP."""

    def __init__(self, mesh: Mesh, weights: WeightStore, cfg: OpConfigs,
                 tensors: dict[str, torch.Tensor], layer: int, mlp_bias: bool = False) -> None:
        ttnn = mesh.ttnn
        self.mesh, self.cfg = mesh, cfg
        prec = cfg.precision.decoder(layer)
        self.product_dtype = prec.mlp_product
        self.kernels = {g: cfg.kernel(g, layer) for g in ("w1", "w3", "w2")}
        p = f"model.layers.{layer}.mlp."
        inner = cfg.geo.hidden * mesh.ndev  # the intermediate size zero-padded to 32 ndev

        def put(name: str, group: str, shard_dim: int, memcfg):
            w = tensors[p + name + ".weight"]  # [out, in]
            pad = inner - (w.shape[0] if shard_dim == 3 else w.shape[1])
            k, n = (w.shape[1], inner) if shard_dim == 3 else (inner, w.shape[0])

            def prepare(t: torch.Tensor) -> torch.Tensor:  # [in, out], intermediate padded
                wt = F.pad(t.float().T, (0, pad) if shard_dim == 3 else (0, 0, 0, pad))
                return wt.reshape(1, 1, k, n)

            return weights.tensor(f"layer{layer}_{group}_{k}x{n}", w, prepare,
                                  dtype=getattr(prec, group), layout=ttnn.TILE_LAYOUT,
                                  memory_config=memcfg, mapper=mesh.shard(shard_dim))

        self.w1 = put("gate_proj", "w1", 3, cfg.w1.weight_memcfg)  # [1, 1, dim, hidden]
        self.w3 = put("up_proj", "w3", 3, cfg.w1.weight_memcfg)
        self.w2 = put("down_proj", "w2", 2, cfg.w2.weight_memcfg)  # [1, 1, hidden, dim]
        self.b1 = self.b3 = self.b2 = None
        if mlp_bias:  # gate/up biases column-parallel like their weights; down's added once
            self.b1, self.b3 = (weights.tensor(
                f"layer{layer}_{g}_bias_{inner}", tensors[p + n + ".bias"],
                lambda b: F.pad(b.float(), (0, inner - b.shape[0])).reshape(1, 1, 1, inner),
                dtype=ttnn.bfloat16, layout=ttnn.TILE_LAYOUT,
                memory_config=ttnn.DRAM_MEMORY_CONFIG, mapper=mesh.shard(3))
                for g, n in (("w1", "gate_proj"), ("w3", "up_proj")))
            self.b2 = once_bias(mesh, weights, f"layer{layer}_w2", tensors[p + "down_proj.bias"])

    def _biased(self, t, bias, memory_config):
        """t `[1, 1, M, n]` interleaved plus the bias row `[1, 1, 1, n]`; frees t."""
        out = self.mesh.ttnn.add(t, bias, memory_config=memory_config)
        self.mesh.ttnn.deallocate(t)
        return out

    def _biased_sharded(self, t, bias):
        """t `[1, 1, B, n]` L1 width-sharded plus a bias row `[1, 1, 1, n]`, same sharding (the
        add runs interleaved in L1); t itself without a bias. Frees t."""
        if bias is None:
            return t
        ttnn = self.mesh.ttnn
        mem = t.memory_config()
        flat = ttnn.sharded_to_interleaved(t, ttnn.L1_MEMORY_CONFIG)
        ttnn.deallocate(t)
        biased = self._biased(flat, bias, ttnn.L1_MEMORY_CONFIG)
        out = ttnn.interleaved_to_sharded(biased, mem)
        ttnn.deallocate(biased)
        return out

    def decode(self, x):
        """x `[1, 1, B, dim]` normalised, width-sharded L1 -> `[1, 1, B, dim]` in the residual
        memory config, summed over the mesh."""
        ttnn, cfg, kern = self.mesh.ttnn, self.cfg, self.kernels
        l1ws = ttnn.L1_WIDTH_SHARDED_MEMORY_CONFIG
        xin = ttnn.to_memory_config(x, cfg.w1.input_memcfg)
        a = ttnn.linear(xin, self.w1, program_config=cfg.w1.program_config, memory_config=l1ws,
                        dtype=ttnn.bfloat16, compute_kernel_config=kern["w1"])
        b = ttnn.linear(xin, self.w3, program_config=cfg.w1.program_config, memory_config=l1ws,
                        dtype=ttnn.bfloat16, compute_kernel_config=kern["w3"])
        ttnn.deallocate(xin)
        a, b = self._biased_sharded(a, self.b1), self._biased_sharded(b, self.b3)
        g = ttnn.mul(a, b, input_tensor_a_activations=[ttnn.UnaryOpType.SILU],
                     dtype=self.product_dtype, memory_config=a.memory_config())
        ttnn.deallocate(a)
        ttnn.deallocate(b)
        g2 = ttnn.to_memory_config(g, cfg.w2.input_memcfg)  # [1, 1, 32, hidden] on the w2 grid
        ttnn.deallocate(g)
        out = ttnn.linear(g2, self.w2, program_config=cfg.w2.program_config, memory_config=l1ws,
                          dtype=ttnn.bfloat16, compute_kernel_config=kern["w2"])
        ttnn.deallocate(g2)
        return self.mesh.all_reduce_sharded(out, cfg.residual_memcfg,
                                            bias=self.b2)  # [1, 1, B, dim]

    def prefill(self, x):
        """x `[1, 1, S, dim]` normalised, DRAM -> `[1, 1, S, dim_local]` summed over the mesh
        (reduce-scattered when the residual is fractured; the full width otherwise)."""
        ttnn, cfg, kern = self.mesh.ttnn, self.cfg, self.kernels
        dram = ttnn.DRAM_MEMORY_CONFIG
        c = cfg.mlp_chunk
        a = prefill_linear(ttnn, cfg, x, self.w1, "w1", c, kern["w1"])  # [1, 1, S, hidden]
        b = prefill_linear(ttnn, cfg, x, self.w3, "w1", c, kern["w3"])  # w3 has w1's shape
        if self.b1 is not None:
            a, b = self._biased(a, self.b1, dram), self._biased(b, self.b3, dram)
        g = ttnn.mul(a, b, input_tensor_a_activations=[ttnn.UnaryOpType.SILU],
                     dtype=self.product_dtype, memory_config=dram)
        ttnn.deallocate(a)
        ttnn.deallocate(b)
        out = prefill_linear(ttnn, cfg, g, self.w2, "w2", c, kern["w2"])  # [1, 1, S, dim]
        ttnn.deallocate(g)
        return self.mesh.reduce_prefill(out, dram, cfg.geo.fractured, bias=self.b2)
