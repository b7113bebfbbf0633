"""Quantized formats rewritten for the C kernels (cpu_kernels.c): codes with a scale and zero per
block of 32 columns, each weight w = fma(c, s, z) in float32 (Q6_K: two scales, see below).
Scale and zero are float16 where that holds every one of them exactly (Q4_0, Q4_1, Q8_0, Q5_0,
Q5_1: a Q4_1 block in the GGUF's 20 bytes instead of 24, and the decode step is memory-bound on
one core), else float32.

  format      layout  c                          s              z
  q4_0        q4      q (the GGUF's packed bytes)  d              -8d
  q4_1        q4      q                            d              m
  int4_g<G>   q4      q                            d (per 32)     m (per 32)
  q4_k        q4      q                            S = d*sc       -dmin*m
  q5_0        q8      q | b << 4 (0..31)           d              -16d
  q5_1        q8      q | b << 4                   d              m
  q5_k        q8      q | b << 4                   S              -dmin*m
  q8_0        q8      q (int8)                     d              0
  int8        q8      q (int8)                     d[n] per 32    0
  q6_k        q6      q - 32 (int8, -32..31)       d*sc[2h]       d*sc[2h+1]

(b the fifth bit; S and dmin*m are products of a float16 and a 6-bit integer, exact in float32.)
Every row is the format's dequantization in exact arithmetic, and each product c*s has at most
11 + 6 + 5 significant bits, so fma(c, s, z) rounds once, like `QuantizedTensor.dequantize` in
float32: the kernels apply the very float32 matrix that dequantize-then-matmul applies.

Q6_K has a scale per 16 columns and no zero: its q6 layout keeps 32 int8 codes a block with the
first 16 columns' scale in `scale` and the last 16's in `zero`, w = c * s (c * z). d*sc (float16
times int8) has at most 11 + 7 significant bits and (d*sc) * (q - 32) at most 11 + 7 + 5: both
exact in float32, so again the very matrix `dequantize` gives. 10 bits a weight (int8 codes, two
float32 scales per 32) against the GGUF's 6.56 and a dense float32 copy's 32. int8 with K not a
multiple of 32 has no form here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llm.backends.torch.quant.int4_groups import k_scales
from llm.model.quant.bits import unpack1, unpack2, unpack4
from llm.model.quant.tensor import QuantizedTensor

BLOCK = 32


@dataclass(frozen=True)
class CodeGroups:
    """W [N, K] for the C kernels: bits 4 (`codes` uint8 [N, K/2], ggml nibble order per 32),
    8 (`codes` int8 [N, K]) or 6 (the q6 layout: `codes` int8 [N, K], `zero` the second half's
    scale); `scale`, `zero` [N, K/32], both float16 or both float32; all contiguous on the
    CPU."""

    bits: int
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale, self.zero))

    def dequantize(self) -> torch.Tensor:
        """The float32 [N, K] matrix these groups stand for (reference for tests)."""
        c = unpack4(self.codes) if self.bits == 4 else self.codes
        n, k = c.shape
        if self.bits == 6:  # [N, K/32, 2 halves, 16] times each half's scale
            halves = torch.stack((self.scale, self.zero), dim=-1).float().reshape(n, -1, 2, 1)
            return (c.float().reshape(n, -1, 2, BLOCK // 2) * halves).reshape(n, k)
        w = torch.addcmul(self.zero.float().reshape(n, -1, 1), c.float().reshape(n, -1, BLOCK),
                          self.scale.float().reshape(n, -1, 1))
        return w.reshape(n, k)


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32).contiguous()


def _groups(bits: int, codes: torch.Tensor, scale: torch.Tensor,
            zero: torch.Tensor) -> CodeGroups:
    """Scale and zero in float16 when it holds every value exactly, else float32."""
    scale, zero = _f32(scale), _f32(zero)
    s16, z16 = scale.half(), zero.half()
    if torch.equal(s16.float(), scale) and torch.equal(z16.float(), zero):
        scale, zero = s16, z16
    return CodeGroups(bits, codes.contiguous(), scale, zero)


def to_code_groups(w: QuantizedTensor) -> CodeGroups | None:
    """`w` in the kernels' form (table of the module docstring), or None where it has none."""
    p = {name: t.cpu() for name, t in w.planes.items()}
    n, k = w.shape
    fmt = w.format
    if k % BLOCK:
        return None
    if fmt in ("q4_0", "q4_1"):
        d = _f32(p["d"])
        return _groups(4, p["qs"], d, p["m"] if fmt == "q4_1" else -8 * d)
    if fmt.startswith("int4_g"):
        rep = w.layout.block // BLOCK
        d, m = (_f32(p[x]).repeat_interleave(rep, dim=1) for x in ("d", "m"))
        return _groups(4, p["qs"], d, m)
    if fmt == "q4_k":
        s, o = k_scales(p, n)
        return _groups(4, p["qs"], s, -o)
    if fmt in ("q5_0", "q5_1", "q5_k"):
        codes = (unpack4(p["qs"]) | (unpack1(p["qh"]) << 4)).to(torch.int8)  # [N, K] 0..31
        if fmt == "q5_k":
            s, o = k_scales(p, n)
            return _groups(8, codes, s, -o)
        d = _f32(p["d"])
        return _groups(8, codes, d, p["m"] if fmt == "q5_1" else -16 * d)
    if fmt == "q6_k":
        codes = (unpack4(p["qs"]) | (unpack2(p["qh"]) << 4)).to(torch.int8) - 32  # [N, K]
        d = _f32(p["d"]).reshape(n, -1, 1)  # [N, K/256, 1]
        halves = (d * _f32(p["scales"]).reshape(n, d.shape[1], -1)).reshape(n, -1, 2)
        return _groups(6, codes, halves[..., 0], halves[..., 1])  # [N, K/32] each
    if fmt == "q8_0":
        d = _f32(p["d"])
        return _groups(8, p["qs"], d, torch.zeros_like(d))
    if fmt == "int8":
        d = _f32(p["d"]).reshape(n, 1).expand(n, k // BLOCK)
        return _groups(8, p["qs"], d, torch.zeros(n, k // BLOCK))
    return None
