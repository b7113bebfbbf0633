"""SwiGLU feed-forward with the gate and up projections fused into one matmul."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llm.backends.torch.parallel.mesh import Mesh
from llm.backends.torch.quant.native import NativeKernels
from llm.backends.torch.weight import QuantLinear, linear, stack_rows


class MLP:
    """down(silu(gate(x)) * up(x)) with W_gate and W_up stacked as one `[2 * I, H]` weight.

    fused: the activation runs as one Triton kernel instead of two torch ops. On a mesh the
    weights are the rank's slice of the intermediate dimension (gate/up column-parallel, down
    row-parallel) and the output is all-reduced.
    """

    def __init__(self, gate_up: torch.Tensor | QuantLinear, down: torch.Tensor | QuantLinear,
                 gate_up_bias: torch.Tensor | None = None,
                 down_bias: torch.Tensor | None = None, fused: bool = False,
                 mesh: Mesh | None = None) -> None:
        self.fused = fused
        self.mesh = mesh or Mesh.single()
        self.gate_up = gate_up  # [2I, H]
        self.down = down  # [H, I]
        self.gate_up_bias = gate_up_bias
        self.down_bias = down_bias
        self.inter = down.shape[1]

    @classmethod
    def from_weights(cls, w: dict[str, torch.Tensor], prefix: str, fused: bool = False,
                     mesh: Mesh | None = None) -> MLP:
        """Build from canonical names under `prefix` (e.g. `model.layers.0.mlp.`)."""
        gate_up = stack_rows([w[prefix + "gate_proj.weight"], w[prefix + "up_proj.weight"]])
        bias = None
        if prefix + "gate_proj.bias" in w:
            bias = torch.cat([w[prefix + "gate_proj.bias"], w[prefix + "up_proj.bias"]], dim=0)
        return cls(gate_up, w[prefix + "down_proj.weight"], bias, w.get(prefix + "down_proj.bias"),
                   fused, mesh)

    def down_gemv(self, act: torch.Tensor) -> torch.Tensor:
        """The down projection of silu(gate) * up `act` [B, I] by the small-batch Triton GEMV,
        all-reduced on a mesh -> [B, H]."""
        from llm.backends.torch.kernels.gemv import gemv

        return self.mesh.all_reduce(gemv(act, self.down, self.down_bias))

    def native(self, x: torch.Tensor, kernels: NativeKernels) -> torch.Tensor:
        """x float32 [B, H] -> [B, H] on the CPU, the activation by the C kernels."""
        act = kernels.silu_mul(linear(x, self.gate_up, self.gate_up_bias).contiguous())  # [B, I]
        return self.mesh.all_reduce(linear(act, self.down, self.down_bias))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., H] -> [..., H]: the down projection of `act(x)`, all-reduced on a mesh."""
        return self.mesh.all_reduce(linear(self.act(x), self.down, self.down_bias))

    def act(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., H] -> silu(gate(x)) * up(x) [..., I]. fused, with a quantized gate/up weight
        and a decode-sized batch on CUDA: the activation in the quantized GEMV's epilogue where
        it has one (kernels/qgemv.py `qgemv_silu_mul`); fused otherwise: the Triton SiLU*up
        kernel after the projection."""
        gate_up = self.gate_up
        if self.fused and isinstance(gate_up, QuantLinear) and gate_up.decodes(x):
            from llm.backends.torch.kernels.qgemv import qgemv_silu_mul

            return qgemv_silu_mul(x, gate_up.weight, self.gate_up_bias)  # [B, I]
        gu = linear(x, gate_up, self.gate_up_bias)  # [..., 2I]
        if self.fused and gu.dim() == 2:
            from llm.backends.torch.kernels.silu_mul import silu_mul

            return silu_mul(gu)
        gate, up = gu.split(self.inter, dim=-1)
        return F.silu(gate) * up
