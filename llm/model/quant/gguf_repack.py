"""GGUF tensor data -> `QuantizedTensor` planes, losslessly (or a plain tensor for float types).

`gguf.GGUFReader` exposes a quantized tensor's data as uint8 [rows, bytes_per_row]: each row is
K/block consecutive ggml blocks. Block byte layouts (little-endian; fp16 fields are IEEE half):

  Q8_0 (34 B / 32):  d f16 | qs[32] int8
  Q4_0 (18 B / 32):  d f16 | qs[16]
  Q4_1 (20 B / 32):  d f16 | m f16 | qs[16]
  Q5_0 (22 B / 32):  d f16 | qh[4] | qs[16]
  Q5_1 (24 B / 32):  d f16 | m f16 | qh[4] | qs[16]
  Q4_K (144 B / 256): d f16 | dmin f16 | scales[12] | qs[128]
  Q5_K (176 B / 256): d f16 | dmin f16 | scales[12] | qh[32] | qs[128]
  Q6_K (210 B / 256): ql[128] | qh[64] | scales[16] int8 | d f16

The legacy formats' bytes already are our planes' bytes (`llm.model.quant.ggml_formats`): their
fields are only cut apart, but for Q5_0/Q5_1's `qh`, whose bits are reordered (below). The
K-quants are reordered to the per-32-group packing:

- Q4_K/Q5_K `qs`: chunk c (bytes 32c..32c+31) holds columns 64c+l in its low nibbles and
  64c+32+l in its high nibbles; Q6_K `ql`: half h (bytes 64h..64h+63) holds columns 128h+l in its
  low nibbles and 128h+64+l in its high nibbles. Both become the 4-bit `qs` plane.
- Q5_0/Q5_1 `qh` (a little-endian 32-bit word per block, bit c = bit 4 of column c) and Q5_K
  `qh` (bit i of byte l is bit 4 of column 32i+l) -> the 1-bit `qh` plane of
  llm.model.quant.bits (byte j of a group: bits of columns 4j..4j+3, then of 16+4j..16+4j+3).
- Q6_K `qh`: bits 2s..2s+1 of byte 32h+l are bits 4-5 of column 128h+32s+l -> 2-bit `qh` plane.
- Q4_K/Q5_K `scales[12]`: eight 6-bit scales and eight 6-bit mins (ggml's get_scale_min_k4):
  for j < 4, scale j = b[j] & 63 and min j = b[j+4] & 63; for j >= 4,
  scale j = (b[j+4] & 15) | (b[j-4] >> 6) << 4 and min j = (b[j+4] >> 4) | (b[j] >> 6) << 4.
  They become the uint8 `scales` and `mins` planes, one byte per 32-group.

Everything is vectorised over all blocks of the tensor (numpy, no Python loop per block).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import gguf
import numpy as np
import torch

from llm.model.quant.tensor import QuantizedTensor

Planes = dict[str, torch.Tensor]
Q = gguf.GGMLQuantizationType
_FLOAT_TYPES = {Q.F32: np.float32, Q.F16: np.float16, Q.BF16: np.int16}


class _Blocks:
    """The raw blocks of a tensor, uint8 [N, B, block bytes], cut into fields (numpy arrays: on
    these byte-wise operations numpy measured faster than torch).
    """

    def __init__(self, data: np.ndarray, n: int, n_blocks: int, type_size: int) -> None:
        self.data = np.asarray(data).reshape(n, n_blocks, type_size)
        self.n = n

    def bytes(self, lo: int, hi: int) -> np.ndarray:
        """Bytes [lo, hi) of every block as a new contiguous uint8 array [N, B, hi - lo]."""
        return np.array(self.data[:, :, lo:hi], order="C")  # always a copy, never the file map

    def plane(self, lo: int, hi: int) -> torch.Tensor:
        """Bytes [lo, hi) of every block, row after row: uint8 [N, B * (hi - lo)]."""
        return torch.from_numpy(self.bytes(lo, hi).reshape(self.n, -1))

    def f16(self, lo: int) -> torch.Tensor:
        """The fp16 field at byte lo of every block: float16 [N, B]."""
        return torch.from_numpy(self.bytes(lo, lo + 2).view(np.float16).reshape(self.n, -1))


# The transforms below work on 8 (or 4) bytes at a time, as uint64 (uint32) words with per-byte
# masks, and loop in Python only over the few word positions inside a block: each numpy operation
# then runs over one strided column of all blocks (numpy is slow on tiny inner dimensions).
_U64 = np.uint64
_LOW = _U64(0x0F0F0F0F0F0F0F0F)  # the low nibble of every byte
_HIGH = _U64(0xF0F0F0F0F0F0F0F0)
_TWO_BITS = _U64(0x0303030303030303)  # bits 0-1 of every byte
_ONE_BIT = _U64(0x0101010101010101)  # bit 0 of every byte
# Multiplying a word whose bytes are 0 or 1 by this puts byte t's bit at bit 56 + t, and nothing
# else in bits 56..63 (all partial products land on distinct bits, so there are no carries).
_GATHER_BITS = _U64(0x0102040810204080)


def _words(src: np.ndarray, dtype: type, per_block: int) -> np.ndarray:
    """Contiguous uint8 [N, B, bytes] -> words [N * B * bytes / (size * per_block), per_block]."""
    return src.view(dtype).reshape(-1, per_block)


def _nibble_chunks(src: np.ndarray, chunk: int) -> torch.Tensor:
    """ggml K-quant nibbles -> 4-bit `qs` plane [N, K/2].

    `src` [N, B, bytes]: each `chunk` bytes hold `chunk` columns in their low nibbles, then the
    next `chunk` columns in their high nibbles.
    """
    subs = chunk // 32
    w = _words(src, _U64, chunk // 8).reshape(-1, subs, 2, 2)  # [chunks, chunk/32, a|b, word]
    out = np.empty((w.shape[0], 2, subs, 2), _U64)  # [chunks, low|high nibbles, chunk/32, word]
    for sub in range(subs):
        for k in range(2):
            a, b = w[:, sub, 0, k], w[:, sub, 1, k]  # bytes i and 16+i of a 32 (ggml_formats)
            low, high = out[:, 0, sub, k], out[:, 1, sub, k]
            np.left_shift(b, _U64(4), out=low)  # group of the low nibbles: a & 15 | b << 4
            low &= _HIGH
            low |= a & _LOW
            np.right_shift(a, _U64(4), out=high)  # group of the high nibbles: a >> 4 | b & 0xF0
            high &= _LOW
            high |= b & _HIGH
    return torch.from_numpy(out.view(np.uint8).reshape(src.shape[0], -1))


def _k_scales(sc: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed 6-bit scales [N, B, 12] -> (scales, mins), uint8 [N, B*8] each.

    As uint32 words a, b, c (bytes 0-3, 4-7, 8-11): scales 0-3 = a & 63, scales 4-7 =
    c & 15 | (a >> 6) << 4, mins 0-3 = b & 63, mins 4-7 = c >> 4 | (b >> 6) << 4, per byte.
    """
    u32 = np.uint32
    w = _words(sc, u32, 3)
    a, b, c = w[:, 0], w[:, 1], w[:, 2]
    six, four, two = u32(0x3F3F3F3F), u32(0x0F0F0F0F), u32(0x03030303)
    scales = np.empty((w.shape[0], 2), u32)
    mins = np.empty((w.shape[0], 2), u32)
    np.bitwise_and(a, six, out=scales[:, 0])
    np.bitwise_or(c & four, ((a >> u32(6)) & two) << u32(4), out=scales[:, 1])
    np.bitwise_and(b, six, out=mins[:, 0])
    np.bitwise_or((c >> u32(4)) & four, ((b >> u32(6)) & two) << u32(4), out=mins[:, 1])
    n = sc.shape[0]
    return (torch.from_numpy(scales.view(np.uint8).reshape(n, -1)),
            torch.from_numpy(mins.view(np.uint8).reshape(n, -1)))


def _high_bytes(words: np.ndarray) -> np.ndarray:
    """Fifth code bits as little-endian uint32 words, one a 32-group (bit c: column c) -> the
    1-bit plane's 4 bytes a group (llm.model.quant.bits: byte j = bits 4j..4j+3, then bits
    16+4j..16+4j+3 in its high nibble), uint8 [..., 4]."""
    u32 = np.uint32
    out = np.empty((*words.shape, 4), np.uint8)
    for j in range(4):
        out[..., j] = ((words >> u32(4 * j)) & u32(15)) | (((words >> u32(16 + 4 * j)) & u32(15))
                                                           << u32(4))
    return out


def _q5_high(qh: np.ndarray) -> torch.Tensor:
    """Q5_0/Q5_1 qh [N, B, 4] (a little-endian uint32 a block, bit c: column c) -> 1-bit `qh`
    plane [N, K/8]."""
    return torch.from_numpy(_high_bytes(qh.view(np.uint32)[..., 0]).reshape(qh.shape[0], -1))


def _q5_k_high(qh: np.ndarray) -> torch.Tensor:
    """Q5_K qh [N, B, 32] (bit i of byte l: column 32i+l) -> 1-bit `qh` plane [N, K/8].

    Word q (bytes 8q..8q+7 of the 32) gives group i's byte q of its little-endian uint32 (bit
    c: column c): bit i of each of its 8 bytes; then `_high_bytes`.
    """
    w = _words(qh, _U64, 4)  # [N*B, word q]
    out = np.empty((w.shape[0], 8, 4), np.uint8)  # [N*B, group i, byte q]
    for i in range(8):
        for q in range(4):
            out[:, i, q] = (((w[:, q] >> _U64(i)) & _ONE_BIT) * _GATHER_BITS) >> _U64(56)
    words = out.view(np.uint32)[..., 0]  # [N*B, group i]
    return torch.from_numpy(_high_bytes(words).reshape(qh.shape[0], -1))


def _q6_k_high(qh: np.ndarray) -> torch.Tensor:
    """Q6_K qh [N, B, 64] (bits 2s, 2s+1 of byte 32h+l: column 128h+32s+l) -> 2-bit `qh`
    plane [N, K/4] (byte i of group 4h+s: bits 2t, 2t+1 = column 32(4h+s)+8t+i).

    Byte i of word t of a half is byte 8t+i, so group 4h+s is OR over t of
    ((word t >> 2s) & 3 per byte) << 2t, eight bytes at a time.
    """
    w = _words(qh, _U64, 4)  # [N*B*2 halves, word t]
    out = np.zeros((w.shape[0], 4), _U64)  # [N*B*2, group s]
    for s in range(4):
        for t in range(4):
            out[:, s] |= ((w[:, t] >> _U64(2 * s)) & _TWO_BITS) << _U64(2 * t)
    return torch.from_numpy(out.view(np.uint8).reshape(qh.shape[0], -1))


def _q8_0(b: _Blocks) -> Planes:
    return {"d": b.f16(0), "qs": b.plane(2, 34).view(torch.int8)}


def _q4_0(b: _Blocks) -> Planes:
    return {"d": b.f16(0), "qs": b.plane(2, 18)}


def _q4_1(b: _Blocks) -> Planes:
    return {"d": b.f16(0), "m": b.f16(2), "qs": b.plane(4, 20)}


def _q5_0(b: _Blocks) -> Planes:
    return {"d": b.f16(0), "qh": _q5_high(b.bytes(2, 6)), "qs": b.plane(6, 22)}


def _q5_1(b: _Blocks) -> Planes:
    return {"d": b.f16(0), "m": b.f16(2), "qh": _q5_high(b.bytes(4, 8)), "qs": b.plane(8, 24)}


def _q4_k(b: _Blocks) -> Planes:
    scales, mins = _k_scales(b.bytes(4, 16))
    return {"d": b.f16(0), "dmin": b.f16(2), "scales": scales, "mins": mins,
            "qs": _nibble_chunks(b.bytes(16, 144), 32)}


def _q5_k(b: _Blocks) -> Planes:
    scales, mins = _k_scales(b.bytes(4, 16))
    return {"d": b.f16(0), "dmin": b.f16(2), "scales": scales, "mins": mins,
            "qh": _q5_k_high(b.bytes(16, 48)), "qs": _nibble_chunks(b.bytes(48, 176), 32)}


def _q6_k(b: _Blocks) -> Planes:
    return {"qs": _nibble_chunks(b.bytes(0, 128), 64), "qh": _q6_k_high(b.bytes(128, 192)),
            "scales": b.plane(192, 208).view(torch.int8), "d": b.f16(208)}


# GGUF type -> (our format name, repacker of its blocks)
_REPACKERS: dict[Q, tuple[str, Callable[[_Blocks], Planes]]] = {
    Q.Q8_0: ("q8_0", _q8_0),
    Q.Q4_0: ("q4_0", _q4_0),
    Q.Q4_1: ("q4_1", _q4_1),
    Q.Q5_0: ("q5_0", _q5_0),
    Q.Q5_1: ("q5_1", _q5_1),
    Q.Q4_K: ("q4_k", _q4_k),
    Q.Q5_K: ("q5_k", _q5_k),
    Q.Q6_K: ("q6_k", _q6_k),
}
GGUF_FORMATS: dict[Q, str] = {qtype: fmt for qtype, (fmt, _) in _REPACKERS.items()}


def repack_gguf(data: np.ndarray, qtype: Q, shape: tuple[int, int]) -> QuantizedTensor:
    """The raw ggml blocks `data` (uint8, N rows of K/block blocks, any array shape with that
    many bytes) of a `qtype` matrix of HF shape (N, K), as a QuantizedTensor (copies the bytes).
    Assumes a little-endian host, as GGUF files are.
    """
    if qtype not in _REPACKERS:
        supported = ", ".join(t.name for t in GGUF_FORMATS)
        raise ValueError(f"GGUF type {Q(qtype).name} cannot be kept quantized ({supported} can)")
    if sys.byteorder != "little":
        raise NotImplementedError("repacking GGUF blocks needs a little-endian host")
    n, k = shape
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    if k % block:
        raise ValueError(f"{Q(qtype).name}: in_features {k} is not a multiple of {block}")
    if data.dtype != np.uint8 or data.size != n * (k // block) * type_size:
        raise ValueError(
            f"{Q(qtype).name} ({n}, {k}): expected {n * (k // block) * type_size} uint8 bytes, "
            f"got {data.size} {data.dtype}"
        )
    fmt, repack = _REPACKERS[qtype]
    return QuantizedTensor(fmt, (n, k), repack(_Blocks(data, n, k // block, type_size)))


def from_gguf_tensor(t: gguf.ReaderTensor) -> QuantizedTensor | torch.Tensor:
    """A GGUF reader tensor in HF layout: F32/F16/BF16 as a plain tensor of that dtype (copied
    out of the memory map), the formats of `GGUF_FORMATS` as a 2-D QuantizedTensor.
    """
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF dims are fastest first
    qtype = Q(t.tensor_type)
    if qtype in _FLOAT_TYPES:
        array = np.array(t.data).view(_FLOAT_TYPES[qtype])  # BF16: bytes -> int16 bit patterns
        tensor = torch.from_numpy(array).reshape(shape)
        return tensor.view(torch.bfloat16) if qtype == Q.BF16 else tensor
    if len(shape) != 2:
        raise ValueError(f"tensor {t.name!r}: quantized tensors must be 2-D, got shape {shape}")
    return repack_gguf(t.data, qtype, shape)
