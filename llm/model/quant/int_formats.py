"""Our own formats for quantizing Hugging Face weights: `int8` and `int4_g<G>`.

Notation as in `llm.model.quant.ggml_formats` (matrix [N, K], column k, 32-group packing of
4-bit codes from `llm.model.quant.bits`); `f(x)` is the exact float32 value of x.

  int8      qs i8 [N,K], d f32 [N,1]                      w[n,k] = f(qs[n,k]) * d[n]
            per-output-channel symmetric; bits/weight 8 + 32/K (8.0078 for K = 4096)
  int4_g<G> qs u8 [N,K/2] (4-bit codes 0..15),            w[n,k] = f(d[n,k/G]) * f(q) + f(m[n,k/G])
            d bf16 [N,K/G], m bf16 [N,K/G]                 bits/weight 4 + 32/G (4.25 for G = 128)
            group-wise asymmetric, G a multiple of 32

The int8 scale is float32: 4 bytes per row cost nothing next to K bytes of codes, and a float32
scale adds no rounding of its own, so the error bound is exactly half a step.

The int4 scale `d` and offset `m` (the group's minimum, i.e. the zero point as a value, as in ggml's
Q4_1) are bfloat16: range of float32, so tiny or huge groups neither underflow nor overflow as in
float16, at 32 bits per group. Their rounding is directed (m rounded down, d up) so that the 16
levels m + q*d still span the whole group and every weight is within d/2 of its level. f(d)*f(q)
is exact in float32 (8-bit by 4-bit significands, barring underflow), so dequantization rounds
once, at the `+ m`.
The int4 dequant formula is Q4_1's, which lets one kernel path serve both.
"""

from __future__ import annotations

import functools
import re

import torch

from llm.model.quant.bits import unpack4
from llm.model.quant.layout import Plane, Planes, QuantFormat

INT4_PACK = 32  # 4-bit codes are packed per 32 columns: group sizes are multiples of it
_INT4_NAME = re.compile(r"int4_g(\d+)")


def _int8(p: Planes, n: int, k: int) -> torch.Tensor:
    return p["qs"].float() * p["d"]


def _int4(group: int):
    def dequantize(p: Planes, n: int, k: int) -> torch.Tensor:
        q = unpack4(p["qs"]).float().reshape(n, -1, group)  # [N, K/G, G]
        d = p["d"].float().reshape(n, -1, 1)
        m = p["m"].float().reshape(n, -1, 1)
        return (d * q + m).reshape(n, k)

    return dequantize


INT8 = QuantFormat("int8", (Plane("qs", torch.int8, 1), Plane("d", torch.float32, 0)), 1, _int8)


@functools.cache
def int4_format(group: int) -> QuantFormat:
    """The `int4_g<group>` format; `group` must be a positive multiple of 32."""
    if group <= 0 or group % INT4_PACK:
        raise ValueError(f"int4 group size must be a positive multiple of {INT4_PACK}, got {group}")
    planes = (
        Plane("qs", torch.uint8, 2),
        Plane("d", torch.bfloat16, group),
        Plane("m", torch.bfloat16, group),
    )
    return QuantFormat(f"int4_g{group}", planes, group, _int4(group))


def int_format(name: str) -> QuantFormat | None:
    """The format called `name` if it is `int8` or `int4_g<G>`, else None."""
    if name == INT8.name:
        return INT8
    match = _INT4_NAME.fullmatch(name)
    return int4_format(int(match.group(1))) if match else None
