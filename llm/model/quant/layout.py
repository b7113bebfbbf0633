"""What a quantized format stores: its planes (name, dtype, columns per element) and its dequant.

Every plane of a format is a 2-D tensor with one row per output row of the weight matrix, so a row
range of the matrix is the same row range of every plane. Along dim 1 a plane either covers the
columns in order, `cols_per_elem` weight columns per element (a packed code byte, a block scale),
or holds one element per row that applies to all columns (`cols_per_elem == 0`, shape [N, 1]).
A column range that is a multiple of the format's `block` is therefore a plain slice of every
plane too.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

Planes = Mapping[str, torch.Tensor]
# planes, out_features N, in_features K -> float32 [N, K]
Dequantizer = Callable[[Planes, int, int], torch.Tensor]


@dataclass(frozen=True)
class Plane:
    """One planar tensor of a format."""

    name: str
    dtype: torch.dtype
    cols_per_elem: int  # weight columns one element covers along dim 1; 0: one element per row

    def width(self, in_features: int) -> int:
        """Size of dim 1 of this plane for a matrix with `in_features` columns."""
        return 1 if self.cols_per_elem == 0 else in_features // self.cols_per_elem

    def col_range(self, lo: int, hi: int) -> slice:
        """The dim-1 slice of this plane that holds weight columns [lo, hi) (block-aligned)."""
        if self.cols_per_elem == 0:
            return slice(None)
        return slice(lo // self.cols_per_elem, hi // self.cols_per_elem)


@dataclass(frozen=True)
class QuantFormat:
    """A quantized weight format: named planes, slice granularity and the reference dequant."""

    name: str
    planes: tuple[Plane, ...]
    block: int  # in_features and column slice bounds must be multiples of this
    dequantize: Dequantizer = field(compare=False, repr=False)

    def plane(self, name: str) -> Plane:
        """The plane called `name`."""
        for p in self.planes:
            if p.name == name:
                return p
        raise KeyError(f"format {self.name} has no plane {name!r}")

    def nbytes(self, out_features: int, in_features: int) -> int:
        """Bytes of all planes of an [out_features, in_features] matrix."""
        return sum(out_features * p.width(in_features) * p.dtype.itemsize for p in self.planes)

    def bits_per_weight(self, out_features: int, in_features: int) -> float:
        """Stored bits per weight (all planes) of an [out_features, in_features] matrix."""
        return 8 * self.nbytes(out_features, in_features) / (out_features * in_features)
