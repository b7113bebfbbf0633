"""Numerics: rounding values to a ttnn dtype, including block-float BFLOAT8_B / BFLOAT4_B.

Block-float (reference 0.1): inside a 32x32 tile, the 16 consecutive values of one face row
share one exponent, the largest fp32 exponent field in the group. Each value keeps a sign and an
unsigned magnitude with an explicit leading bit: 7 bits for bfloat8_b (step 2**(e-6), saturating
at 127) and 3 bits for bfloat4_b (step 2**(e-2), saturating at 7). The conversion works on the
fp32 bits, as ttnn's host packer does (checked bit for bit against ttnn 0.81.1): fp32 subnormals
and zeros become 0; the 24-bit mantissa (hidden bit included) is first shifted right by
(e_shared - e), dropping the bits shifted out, and only then rounded half to even; the exponent is
never bumped; a magnitude that rounds to 0 loses its sign (+0.0). An inf or nan sets the shared
exponent to 255, which flushes the ordinary members of the group to 0.
"""

from __future__ import annotations

import torch

from .types import TILE_SIZE, DataType

GROUP = 16  # values per shared exponent (one face row of a tile)

_BFP_PARAMS = {
    DataType.BFLOAT8_B: (6, 127),  # (mantissa shift, saturation magnitude)
    DataType.BFLOAT4_B: (2, 7),
}


def quantize_block_float(x: torch.Tensor, dtype: DataType) -> torch.Tensor:
    """Round `x` (tile-padded along the last dim) to `dtype` block-float; returns float32.

    The last dimension must be a multiple of 16. Rows are independent, so any leading shape works.
    Bit-exact with ttnn's host conversion (convert_u32_to_bfp, round to nearest even).
    """
    shift, max_mag = _BFP_PARAMS[dtype]
    width = x.shape[-1]
    if width % GROUP != 0:
        raise RuntimeError(f"block-float quantization needs the last dim padded to 16, got {width}")
    drop = 23 - shift  # mantissa bits below the kept magnitude (17 for bf8, 21 for bf4)
    # int32 bit arithmetic (every intermediate fits): half the memory traffic of int64
    u = x.to(torch.float32).contiguous().view(torch.int32)
    u = u.reshape(*x.shape[:-1], width // GROUP, GROUP)  # [..., W/16, 16]
    sign = (u < 0).to(torch.int32)
    exp = (u >> 23) & 0xFF
    shared = exp.amax(dim=-1, keepdim=True)
    mant = ((u & 0x7FFFFF) | (1 << 23)) >> (shared - exp).clamp(max=31)  # truncating shift
    low = mant & ((1 << drop) - 1)
    mag = mant >> drop
    tie = 1 << (drop - 1)
    up = (low > tie) | ((low == tie) & ((mag & 1) == 1))
    mag = (mag + up.to(torch.int32)).clamp(max=max_mag)
    mag = torch.where(exp == 0, 0, mag)  # zeros and subnormals flush to 0
    sign = torch.where(mag == 0, 0, sign)  # no -0.0
    # mag * 2**(shared - 127 - shift) is exact in float32 for every shared exponent in 1..254
    q = torch.ldexp(mag.to(torch.float32), (shared - 127 - shift).to(torch.float32))
    q = torch.where(sign == 1, -q, q)
    # shared exponent 255 (inf / nan in the group): a magnitude with its leading bit decodes as
    # inf (no further mantissa bits) or nan, as in ttnn's unpacker
    special = (shared == 255) & (mag >= 1 << shift)
    if bool(special.any()):
        m64, s64 = mag.to(torch.int64), sign.to(torch.int64)
        bits = (s64 << 31) | (0xFF << 23) | (((m64 << 1) & max_mag) << (22 - shift))
        bits = torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32)
        q = torch.where(special, bits.view(torch.float32), q)
    return q.reshape(x.shape)


def _pad_last(x: torch.Tensor, multiple: int) -> torch.Tensor:
    pad = (-x.shape[-1]) % multiple
    if pad == 0:
        return x
    return torch.nn.functional.pad(x, (0, pad))


def round_to_dtype(x: torch.Tensor, dtype: DataType) -> torch.Tensor:
    """Round values to `dtype` and return them in the emulator's storage torch dtype.

    Float -> integer conversion truncates toward zero; uint32 clamps at 0 (reference 3, typecast).
    Block-float rounding groups 16 values along the last dim; callers pass tile-padded data.
    """
    if dtype == DataType.BFLOAT16:
        return x.to(torch.bfloat16)
    if dtype == DataType.FLOAT32:
        return x.to(torch.float32)
    if dtype in _BFP_PARAMS:
        width = x.shape[-1]
        padded = _pad_last(x.to(torch.float32), TILE_SIZE if x.dim() > 0 else GROUP)
        return quantize_block_float(padded, dtype)[..., :width]
    if dtype == DataType.UINT32:
        v = x.to(torch.float64).trunc() if x.is_floating_point() else x.to(torch.int64)
        return v.clamp(0, 2**32 - 1).to(torch.int64)
    if dtype == DataType.UINT16:
        v = x.to(torch.float64).trunc() if x.is_floating_point() else x.to(torch.int64)
        return v.clamp(0, 2**16 - 1).to(torch.int64)
    if dtype == DataType.INT32:
        v = x.to(torch.float64).trunc() if x.is_floating_point() else x.to(torch.int64)
        return v.clamp(-(2**31), 2**31 - 1).to(torch.int64)
    raise RuntimeError(f"ttnn_emu: dtype {dtype} is not supported by the emulator")
