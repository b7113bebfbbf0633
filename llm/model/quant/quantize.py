"""Round-to-nearest quantizers for Hugging Face (safetensors) weights: `int8` and `int4_g<G>`.

The formats and their dequant formulas are in `llm.model.quant.int_formats`. Both quantizers work
in float32 (a bf16/fp16 weight converts exactly), round half to even, and are deterministic: the
same weights give the same planes, byte for byte, on any run.

- `quantize_int8`: per output row, d = max|w| / 127 (float32), q = round(w / d) in [-127, 127]
  (an all-zero row gets d = 0, q = 0). |w - q*d| <= d/2.
- `quantize_int4`: per row and group of G columns, m = the group's minimum rounded down to bf16,
  d = (max - m) / 15 rounded up to bf16, q = round((w - m) / d) in [0, 15]. The 16 levels m + q*d
  cover [min, max], so |w - (d*q + m)| <= d/2 (up to float32 rounding).

Default group size 128: 4.25 bits per weight, against 5.0 at G = 32 (the group parameters are
0.25 instead of 1 bit per weight, 6% rather than 25% on top of the codes in a bandwidth-bound
decode) and the usual GPTQ/AWQ group size, with a larger but still half-step error; G = 32
trades those bytes for groups as fine as Q4_1's.
"""

from __future__ import annotations

import torch

from llm.model.quant.bits import pack4
from llm.model.quant.int_formats import INT8, int4_format
from llm.model.quant.tensor import QuantizedTensor

DEFAULT_INT4_GROUP = 128


def _matrix(w: torch.Tensor) -> torch.Tensor:
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(
            f"expected a 2-D floating-point weight matrix, got {w.dtype} {tuple(w.shape)}"
        )
    w = w.detach().to(torch.float32)
    if not bool(torch.isfinite(w).all()):
        raise ValueError("cannot quantize a weight matrix with inf or NaN entries")
    return w


def _bf16_toward(x: torch.Tensor, direction: float) -> torch.Tensor:
    """float32 -> bfloat16 rounded toward -inf (direction < 0) or +inf (direction > 0)."""
    r = x.to(torch.bfloat16)
    wrong = r.float() > x if direction < 0 else r.float() < x
    step = torch.nextafter(r, torch.full_like(r, direction * float("inf")))
    return torch.where(wrong, step, r)


def quantize_int8(w: torch.Tensor, absmax: torch.Tensor | None = None) -> QuantizedTensor:
    """Per-output-channel symmetric int8 quantization of an [N, K] matrix (format `int8`).

    absmax: float32 [N, 1], each row's max |w| over the whole matrix when `w` is a column slice
    of it (a tensor-parallel rank's part): the slice then gets exactly the whole matrix's codes
    and scales for its columns. Default: w's own.
    """
    w = _matrix(w)
    if absmax is None:
        absmax = w.abs().amax(dim=1, keepdim=True)
    elif absmax.shape != (w.shape[0], 1) or absmax.dtype != torch.float32:
        raise ValueError(f"absmax must be float32 {(w.shape[0], 1)}, got {absmax.dtype} "
                         f"{tuple(absmax.shape)}")
    d = absmax / 127  # [N, 1]
    q = torch.round(w / torch.where(d == 0, 1.0, d)).clamp_(-127, 127).to(torch.int8)
    return QuantizedTensor(INT8.name, tuple(w.shape), {"qs": q, "d": d})


def quantize_int4(w: torch.Tensor, group_size: int = DEFAULT_INT4_GROUP) -> QuantizedTensor:
    """Group-wise asymmetric int4 quantization of an [N, K] matrix (format `int4_g<group_size>`);
    K must be a multiple of `group_size`, itself a multiple of 32.
    """
    fmt = int4_format(group_size)
    w = _matrix(w)
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"in_features {k} is not a multiple of the int4 group size {group_size}")
    g = w.reshape(n, k // group_size, group_size)  # [N, K/G, G]
    m = _bf16_toward(g.amin(dim=-1), -1.0)  # [N, K/G]
    d = _bf16_toward((g.amax(dim=-1) - m.float()) / 15, 1.0)
    step = torch.where(d == 0, 1.0, d.float()).unsqueeze(-1)
    q = torch.round((g - m.float().unsqueeze(-1)) / step).clamp_(0, 15).to(torch.uint8)
    return QuantizedTensor(fmt.name, (n, k), {"qs": pack4(q.reshape(n, k)), "d": d, "m": m})
