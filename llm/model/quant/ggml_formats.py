"""The GGUF (ggml) block formats as planes: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K.

A weight matrix is [N, K] (Hugging Face (out, in)); column k of a row lies in 32-group
g = k // 32 (and 256-column super-block s = k // 256 for the K-quants). Codes are packed per
32-group as described in `llm.model.quant.bits`:

- `qs` 4-bit: byte 16g+i holds column 32g+i (bits 0-3) and 32g+16+i (bits 4-7);
- `qh` 1-bit (Q5_*): byte 4g+j bit t is bit 4 of the code of column 32g+4j+t, bit 4+t that of
  column 32g+16+4j+t (t < 4);
- `qh` 2-bit (Q6_K): byte 8g+i bits 2s..2s+1 are bits 4-5 of the code of column 32g+8s+i.

fp16 scales stay fp16; all arithmetic below is float32, one IEEE rounding per operation, in
exactly the order written (which is the order of ggml's `dequantize_row_*` and of
`gguf.quants.dequantize`), so `dequantize` is bit-exact with ggml in fp32. `f(x)` is the exact
float32 value of an fp16 or integer x.

  format  planes (dtype [shape])                                  w[n, k]                 bits/w
  Q8_0    qs i8 [N,K], d f16 [N,K/32]                             f(qs[k]) * f(d[g])      8.5
  Q4_0    qs u8 [N,K/2], d f16 [N,K/32]                           f(d[g]) * f(q - 8)      4.5
  Q4_1    qs, d f16 [N,K/32], m f16 [N,K/32]                      f(d[g])*f(q) + f(m[g])  5.0
  Q5_0    qs, qh u8 [N,K/8], d f16 [N,K/32]                       f(d[g]) * f(q - 16)     5.5
  Q5_1    qs, qh, d, m (as Q4_1)                                  f(d[g])*f(q) + f(m[g])  6.0
  Q4_K    qs, d f16 [N,K/256], dmin f16 [N,K/256],                see below               4.625
          scales u8 [N,K/32] (0..63), mins u8 [N,K/32] (0..63)
  Q5_K    as Q4_K plus qh (1-bit)                                 see below               5.625
  Q6_K    qs (low 4 bits), qh (2-bit: high 2 bits),               see below               6.5625
          scales i8 [N,K/16], d f16 [N,K/256]

where q is the code of column k: the 4-bit `qs` field, or for Q5_* `qs | qh << 4` (0..31), for
Q6_K `qs | qh << 4` (0..63). K-quants:

  Q4_K, Q5_K:  w = (f(d[s]) * f(scales[g])) * f(q) - f(dmin[s]) * f(mins[g])
               (both products rounded to float32 first, then the product with q, then the
               difference; no fused multiply-add)
  Q6_K:        w = (f(d[s]) * f(scales[k // 16])) * f(q - 32)

Bytes per weight equal the GGUF's own for all formats but Q4_K/Q5_K, whose 12 bytes of packed
6-bit sub-block scales and mins per super-block are unpacked to 16 bytes (+0.125 bits/weight,
so that a kernel reads a sub-block's scale with one byte load). Column slices must be multiples
of 32 (legacy formats) or 256 (K-quants), the span of the scales.
"""

from __future__ import annotations

import torch

from llm.model.quant.bits import unpack1, unpack2, unpack4
from llm.model.quant.layout import Plane, Planes, QuantFormat

QK = 32  # columns per block of the legacy formats (and per 32-group everywhere)
QK_K = 256  # columns per super-block of the K-quants


def _per_group(scale: torch.Tensor, codes: torch.Tensor, span: int) -> tuple[torch.Tensor, ...]:
    """(scale [N, K/span, 1], codes [N, K/span, span]) for broadcasting a per-span value."""
    n = codes.shape[0]
    return scale.reshape(n, -1, 1), codes.reshape(n, -1, span)


def _q8_0(p: Planes, n: int, k: int) -> torch.Tensor:
    d, q = _per_group(p["d"].float(), p["qs"].float(), QK)
    return (q * d).reshape(n, k)


def _q4_0(p: Planes, n: int, k: int) -> torch.Tensor:
    q = unpack4(p["qs"]).to(torch.int8) - 8
    d, q = _per_group(p["d"].float(), q.float(), QK)
    return (d * q).reshape(n, k)


def _q4_1(p: Planes, n: int, k: int) -> torch.Tensor:
    d, q = _per_group(p["d"].float(), unpack4(p["qs"]).float(), QK)
    m = p["m"].float().reshape(n, -1, 1)
    return (d * q + m).reshape(n, k)


def _q5(p: Planes) -> torch.Tensor:
    return unpack4(p["qs"]) | (unpack1(p["qh"]) << 4)  # [N, K] 0..31


def _q5_0(p: Planes, n: int, k: int) -> torch.Tensor:
    q = _q5(p).to(torch.int8) - 16
    d, q = _per_group(p["d"].float(), q.float(), QK)
    return (d * q).reshape(n, k)


def _q5_1(p: Planes, n: int, k: int) -> torch.Tensor:
    d, q = _per_group(p["d"].float(), _q5(p).float(), QK)
    m = p["m"].float().reshape(n, -1, 1)
    return (d * q + m).reshape(n, k)


def _k_scales(p: Planes, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-32-group float32 scale d*sc and offset dmin*m of Q4_K/Q5_K, each [N, K/32]."""
    d = p["d"].float().reshape(n, -1, 1)  # [N, K/256, 1]
    dmin = p["dmin"].float().reshape(n, -1, 1)
    sc = p["scales"].float().reshape(n, d.shape[1], -1)  # [N, K/256, 8]
    m = p["mins"].float().reshape(n, d.shape[1], -1)
    return (d * sc).reshape(n, -1), (dmin * m).reshape(n, -1)


def _q4_k(p: Planes, n: int, k: int) -> torch.Tensor:
    scale, offset = _k_scales(p, n)
    d, q = _per_group(scale, unpack4(p["qs"]).float(), QK)
    return (d * q - offset.reshape(n, -1, 1)).reshape(n, k)


def _q5_k(p: Planes, n: int, k: int) -> torch.Tensor:
    scale, offset = _k_scales(p, n)
    d, q = _per_group(scale, _q5(p).float(), QK)
    return (d * q - offset.reshape(n, -1, 1)).reshape(n, k)


def _q6_k(p: Planes, n: int, k: int) -> torch.Tensor:
    q = (unpack4(p["qs"]) | (unpack2(p["qh"]) << 4)).to(torch.int8) - 32  # [N, K] -32..31
    d = p["d"].float().reshape(n, -1, 1)  # [N, K/256, 1]
    sc = p["scales"].float().reshape(n, d.shape[1], -1)  # [N, K/256, 16]
    scale, q = _per_group((d * sc).reshape(n, -1), q.float(), 16)
    return (scale * q).reshape(n, k)


_QS4 = Plane("qs", torch.uint8, 2)
_QH1 = Plane("qh", torch.uint8, 8)
_D32 = Plane("d", torch.float16, QK)
_M32 = Plane("m", torch.float16, QK)
_D256 = Plane("d", torch.float16, QK_K)
_DMIN256 = Plane("dmin", torch.float16, QK_K)
_SCALES32 = Plane("scales", torch.uint8, QK)
_MINS32 = Plane("mins", torch.uint8, QK)

GGML_FORMATS: dict[str, QuantFormat] = {
    f.name: f
    for f in (
        QuantFormat("q8_0", (Plane("qs", torch.int8, 1), _D32), QK, _q8_0),
        QuantFormat("q4_0", (_QS4, _D32), QK, _q4_0),
        QuantFormat("q4_1", (_QS4, _D32, _M32), QK, _q4_1),
        QuantFormat("q5_0", (_QS4, _QH1, _D32), QK, _q5_0),
        QuantFormat("q5_1", (_QS4, _QH1, _D32, _M32), QK, _q5_1),
        QuantFormat("q4_k", (_QS4, _D256, _DMIN256, _SCALES32, _MINS32), QK_K, _q4_k),
        QuantFormat("q5_k", (_QS4, _QH1, _D256, _DMIN256, _SCALES32, _MINS32), QK_K, _q5_k),
        QuantFormat(
            "q6_k",
            (_QS4, Plane("qh", torch.uint8, 4), Plane("scales", torch.int8, 16), _D256),
            QK_K,
            _q6_k,
        ),
    )
}
