"""Numerics: rounding values to a ttnn dtype, including block-float BFLOAT8_B / BFLOAT4_B.

Block-float (reference 0.1): inside a 32x32 tile, the 16 consecutive values of one face row
share one exponent e = floor(log2(max|x|)). Each value keeps a sign and an unsigned magnitude
with an explicit leading bit: 7 bits for bfloat8_b (step 2**(e-6), saturating at 127) and 3 bits
for bfloat4_b (step 2**(e-2), saturating at 7). Magnitudes round half to even; the exponent is
never bumped. An inf or nan in a group flushes the other members of the group to 0.
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
    """
    shift, max_mag = _BFP_PARAMS[dtype]
    width = x.shape[-1]
    if width % GROUP != 0:
        raise RuntimeError(f"block-float quantization needs the last dim padded to 16, got {width}")
    g = x.to(torch.float64).reshape(*x.shape[:-1], width // GROUP, GROUP)  # [..., W/16, 16]
    finite = torch.isfinite(g)
    group_finite = finite.all(dim=-1, keepdim=True)
    mag = torch.where(finite, g.abs(), torch.zeros_like(g))
    gmax = mag.amax(dim=-1, keepdim=True)
    _, exp = torch.frexp(gmax)  # gmax = m * 2**exp with m in [0.5, 1): floor(log2 gmax) = exp-1
    step = torch.ldexp(torch.ones_like(gmax), exp - 1 - shift)
    q = torch.round(mag / step).clamp(0, max_mag) * step * torch.sign(g)
    q = torch.where(group_finite, q, torch.zeros_like(q))
    q = torch.where(finite, q, g)  # inf / nan members keep their value
    return q.reshape(x.shape).to(torch.float32)


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
