"""Quantized formats rewritten as 4-bit codes with a scale and zero per group of columns.

torch's CPU int4 kernel (`aten._weight_int4pack_mm_for_cpu`) applies the weight

    w'[n, k'] = (c[n, k'] - 8) * s[n, g] + z[n, g]        c in 0..15, g = k' // G

(on AVX-512 one fused multiply-add in float32 per weight, s and z upcast from the activation
dtype). `to_int4_groups` writes a `QuantizedTensor` in that form, with s and z in float32:

  format      copies  c                       s            z
  q4_0        1       q                       d            0
  q4_1        1       q                       d            m + 8d
  int4_g<G>   1       q                       d            m + 8d
  q4_k        1       q                       S = d*sc     8S - dmin*m
  q5_0        2       lo: q & 15 | hi: b + 8  d | 16d      -8d | 0
  q5_1        2       lo | hi                 d | 16d      m + 8d | 0
  q5_k        2       lo | hi                 S | 16S      8S - dmin*m | 0
  q8_0        2       lo: q & 15 | hi: q >> 4 + 8  d | 16d  8d | 0

(b the fifth bit of a 5-bit code, q >> 4 the arithmetic shift of the int8 code). With two copies
the columns of the low part are followed by those of the high part (K' = 2K) and the activations
are repeated along K, so one kernel call sums both parts in its float32 accumulator:
d*(q & 15) + 16d*(q >> 4) = d*q and likewise for the 5-bit codes. In exact arithmetic every row
above equals the format's dequantization (`llm.model.quant.ggml_formats`); what rounding remains
is that of z in float32 (exact when the significands of its two terms fit in 24 bits together,
e.g. fp16 m and d within 2^13 of each other: so in all Q4_1 tensors of the default model), of the
low part of a two-part format (Q8_0's is exact), and of s and z to the activation dtype.

Q6_K (a scale per 16 columns; the kernel's groups are 32, 64, 128 or 256 columns) and `int8` (one
scale per row: `aten._weight_int8pack_mm`) have no int4 form.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llm.model.quant.bits import unpack1, unpack4
from llm.model.quant.tensor import QuantizedTensor

KERNEL_GROUPS = (256, 128, 64, 32)  # group sizes the CPU kernel accepts
GROUP = 32  # the ggml formats' scale span


@dataclass(frozen=True)
class Int4Groups:
    """A weight as the int4 kernel sees it: w'[n, k'] = (codes - 8) * scale + zero per group.

    codes uint8 [N, copies*K] (0..15), scale and zero float32 [N, copies*K / group]; the matrix
    applied to x [M, K] is the sum over copies c of w'[:, c*K:(c+1)*K].
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    group: int
    copies: int

    def weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The float64 [N, K] matrix the kernel applies with scale and zero in `dtype`: each part
        rounded once to float32 as one fused multiply-add does, then the copies summed.
        """
        n, kk = self.codes.shape
        s = self.scale.to(dtype).double().repeat_interleave(self.group, dim=1)  # [N, K']
        z = self.zero.to(dtype).double().repeat_interleave(self.group, dim=1)
        parts = ((self.codes.double() - 8) * s + z).float().double()
        return parts.reshape(n, self.copies, kk // self.copies).sum(dim=1)


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32)


def k_scales(p: dict[str, torch.Tensor], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(S = d*sc, O = dmin*m) of Q4_K/Q5_K per 32 columns, float32 [N, K/32] (both exact)."""
    d = _f32(p["d"]).reshape(n, -1, 1)  # [N, K/256, 1]
    dmin = _f32(p["dmin"]).reshape(n, -1, 1)
    sc = _f32(p["scales"]).reshape(n, d.shape[1], -1)  # [N, K/256, 8]
    m = _f32(p["mins"]).reshape(n, d.shape[1], -1)
    return (d * sc).reshape(n, -1), (dmin * m).reshape(n, -1)


def _two_parts(lo: torch.Tensor, hi: torch.Tensor, s_lo: torch.Tensor, z_lo: torch.Tensor,
               s_hi: torch.Tensor) -> Int4Groups:
    """Low part (codes lo, s_lo, z_lo) then high part (codes hi, s_hi, zero 0), group 32."""
    codes = torch.cat((lo, hi), dim=1)  # [N, 2K]
    scale = torch.cat((s_lo, s_hi), dim=1)  # [N, 2K/32]
    zero = torch.cat((z_lo, torch.zeros_like(s_hi)), dim=1)
    return Int4Groups(codes, scale, zero, GROUP, 2)


def _int4_group(group: int) -> int:
    """The largest group size the kernel accepts that divides `group` (a multiple of 32)."""
    return next(g for g in KERNEL_GROUPS if group % g == 0)


def to_int4_groups(w: QuantizedTensor) -> Int4Groups | None:
    """`w` as 4-bit codes with a float32 scale and zero per group (table of the module
    docstring), or None for a format the int4 kernel cannot express (q6_k, int8).
    """
    p = {name: t.cpu() for name, t in w.planes.items()}
    n = w.out_features
    fmt = w.format
    if fmt in ("q4_0", "q4_1") or fmt.startswith("int4_g"):
        d = _f32(p["d"])
        zero = _f32(p["m"]) + 8 * d if "m" in p else torch.zeros_like(d)
        group = GROUP if fmt.startswith("q") else w.layout.block
        kernel_group = _int4_group(group)
        rep = group // kernel_group  # int4_g<G> with G not a kernel group size: repeat
        return Int4Groups(unpack4(p["qs"]), d.repeat_interleave(rep, dim=1),
                          zero.repeat_interleave(rep, dim=1), kernel_group, 1)
    if fmt == "q4_k":
        s, o = k_scales(p, n)
        return Int4Groups(unpack4(p["qs"]), s, 8 * s - o, GROUP, 1)
    if fmt in ("q5_0", "q5_1", "q5_k"):
        lo, hi = unpack4(p["qs"]), unpack1(p["qh"]) + 8
        if fmt == "q5_k":
            s, o = k_scales(p, n)
            return _two_parts(lo, hi, s, 8 * s - o, 16 * s)
        d = _f32(p["d"])
        z = _f32(p["m"]) + 8 * d if fmt == "q5_1" else -8 * d
        return _two_parts(lo, hi, d, z, 16 * d)
    if fmt == "q8_0":
        q = p["qs"].to(torch.int16)  # -128..127 = 16 * (q >> 4) + (q & 15)
        d = _f32(p["d"])
        lo, hi = (q & 15).to(torch.uint8), ((q >> 4) + 8).to(torch.uint8)
        return _two_parts(lo, hi, d, 8 * d, 16 * d)
    return None
