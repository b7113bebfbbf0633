"""Sub-byte code planes: packing and unpacking of 4-, 2- and 1-bit fields along the last dim.

All three packings work on aligned groups of 32 columns (k = 32*g + j, 0 <= j < 32), so a
block-aligned column range of the codes is a plain slice of the packed plane:

- 4-bit (`pack4`, K/2 bytes): byte 16*g + i (i < 16) holds column 32*g + i in bits 0-3 and
  column 32*g + 16 + i in bits 4-7 (ggml's Q4_0 byte order).
- 2-bit (`pack2`, K/4 bytes): byte 8*g + i (i < 8) holds column 32*g + 8*s + i in bits 2*s and
  2*s+1, s = 0..3.
- 1-bit (`pack1`, K/8 bytes): byte 4*g + j (j < 4) holds column 32*g + 4*j + t in bit t and
  column 32*g + 16 + 4*j + t in bit 4 + t (t < 4): the bits of the columns whose 4-bit codes are
  byte-for-byte the 32-bit word j of the group's 4-bit codes, so a GEMV that reads codes by the
  word finds their fifth bits in one byte. (ggml's Q5_0 `qh` is another order: its little-endian
  32-bit word of group g holds column 32*g + c in bit c; llm.model.quant.gguf_repack converts.)

Inputs are uint8 tensors of codes already in range; outputs are new contiguous uint8 tensors.
"""

from __future__ import annotations

import torch

GROUP = 32


def _groups(t: torch.Tensor, *inner: int) -> torch.Tensor:
    cols = t.shape[-1]
    per_group = 1
    for n in inner:
        per_group *= n
    if cols % per_group:
        raise ValueError(f"last dim {cols} is not a multiple of {per_group}")
    return t.reshape(*t.shape[:-1], cols // per_group, *inner)


def pack4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes 0..15 [..., K] -> packed [..., K/2] (4-bit layout of the module docstring)."""
    g = _groups(codes, 2, 16)  # [..., K/32, 2, 16]
    return (g[..., 0, :] | (g[..., 1, :] << 4)).reshape(*codes.shape[:-1], -1)


def unpack4(packed: torch.Tensor) -> torch.Tensor:
    """Packed [..., K/2] -> uint8 codes 0..15 [..., K]."""
    g = _groups(packed, 16)  # [..., K/32, 16]
    return torch.stack((g & 0xF, g >> 4), dim=-2).reshape(*packed.shape[:-1], -1)


def pack2(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes 0..3 [..., K] -> packed [..., K/4] (2-bit layout of the module docstring)."""
    g = _groups(codes, 4, 8)  # [..., K/32, 4, 8]
    out = g[..., 0, :] | (g[..., 1, :] << 2) | (g[..., 2, :] << 4) | (g[..., 3, :] << 6)
    return out.reshape(*codes.shape[:-1], -1)


def unpack2(packed: torch.Tensor) -> torch.Tensor:
    """Packed [..., K/4] -> uint8 codes 0..3 [..., K]."""
    g = _groups(packed, 8).unsqueeze(-2)  # [..., K/32, 1, 8]
    # made on the device (no host copy: dequantizing stays capturable in a CUDA graph)
    shifts = torch.arange(0, 8, 2, dtype=torch.uint8, device=packed.device).view(4, 1)
    return ((g >> shifts) & 0x3).reshape(*packed.shape[:-1], -1)  # [..., K/32, 4, 8] -> [..., K]


def pack1(bits: torch.Tensor) -> torch.Tensor:
    """uint8 bits 0..1 [..., K] -> packed [..., K/8] (1-bit layout of the module docstring)."""
    g = _groups(bits, 2, 4, 4)  # [..., K/32, half, j, t]: column 16 * half + 4 * j + t
    out = torch.zeros_like(g[..., 0, :, 0])  # [..., K/32, j]
    for half in range(2):
        for t in range(4):
            out |= g[..., half, :, t] << (4 * half + t)
    return out.reshape(*bits.shape[:-1], -1)


def unpack1(packed: torch.Tensor) -> torch.Tensor:
    """Packed [..., K/8] -> uint8 bits 0..1 [..., K]."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    b = (_groups(packed, 4).unsqueeze(-1) >> shifts) & 0x1  # [..., K/32, j, bit 4 * half + t]
    b = b.reshape(*b.shape[:-1], 2, 4).transpose(-3, -2)  # [..., K/32, half, j, t]
    return b.reshape(*packed.shape[:-1], -1)
