"""Fused SwiGLU activation in Triton: silu(gate) * up from the fused gate/up projection output.

Rounding follows transformers: silu(gate) is rounded to the dtype before the multiply.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llm.backends.torch.kernels.pdl import launch_options, use_pdl, wait_then_release


@triton.jit
def _silu_mul_kernel(gu_ptr, out_ptr, stride_gu, stride_o, INTER: tl.constexpr,
                     BLOCK: tl.constexpr, USE_GDC: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    live = cols < INTER
    wait_then_release(USE_GDC)
    g = tl.load(gu_ptr + row * stride_gu + cols, mask=live, other=0.0)
    u = tl.load(gu_ptr + row * stride_gu + INTER + cols, mask=live, other=0.0)
    gf = g.to(tl.float32)
    act = (gf / (1.0 + tl.exp(-gf))).to(g.dtype).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (act * u.to(tl.float32)).to(g.dtype), mask=live)


def silu_mul(gate_up: torch.Tensor, pdl: bool | None = None) -> torch.Tensor:
    """gate_up [N, 2I] (gate columns first) -> silu(gate) * up [N, I]. pdl: see kernels/pdl.py
    (default: where supported)."""
    n, two_i = gate_up.shape
    inter = two_i // 2
    out = torch.empty(n, inter, dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    gdc = use_pdl(gate_up, pdl)
    _silu_mul_kernel[(n, triton.cdiv(inter, block))](gate_up, out, gate_up.stride(0),
                                                     out.stride(0), INTER=inter, BLOCK=block,
                                                     USE_GDC=gdc, **launch_options(gdc))
    return out
