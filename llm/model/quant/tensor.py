"""`QuantizedTensor`: a quantized weight matrix held as it is stored, in named planar tensors.

The matrix has the Hugging Face (out_features N, in_features K) layout. Its planes (see
`llm.model.quant.layout`) are 2-D, one row per output row, so

- rows [lo, hi) (a tensor-parallel column split of the layer) are rows [lo, hi) of every plane;
- columns [lo, hi) with lo, hi multiples of the format's block (a row-parallel split) are a
  dim-1 slice of every plane, and per-row planes (shape [N, 1]) are kept whole.

Slices are views; `contiguous()` copies them into their own memory.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from llm.model.quant.layout import QuantFormat
from llm.model.quant.registry import get_format


@dataclass(frozen=True, eq=False)
class QuantizedTensor:
    """A quantized [N, K] weight matrix: format name, logical shape and the format's planes.

    The planes together hold exactly the stored information; `dequantize` is the reference
    semantics every kernel must reproduce up to accumulation order. Do not mutate `planes`.
    """

    format: str
    shape: tuple[int, int]
    planes: dict[str, torch.Tensor]

    def __post_init__(self) -> None:
        layout = get_format(self.format)
        if len(self.shape) != 2 or any(int(s) != s or s <= 0 for s in self.shape):
            raise ValueError(f"shape must be (out_features, in_features) > 0, got {self.shape}")
        object.__setattr__(self, "shape", (int(self.shape[0]), int(self.shape[1])))
        n, k = self.shape
        if k % layout.block:
            raise ValueError(
                f"{self.format}: in_features {k} is not a multiple of the block size {layout.block}"
            )
        names = {p.name for p in layout.planes}
        if set(self.planes) != names:
            raise ValueError(
                f"{self.format}: planes {sorted(self.planes)} given, {sorted(names)} expected"
            )
        devices = {t.device for t in self.planes.values()}
        if len(devices) != 1:
            on = sorted(map(str, devices))
            raise ValueError(f"{self.format}: planes on several devices {on}")
        for p in layout.planes:
            t = self.planes[p.name]
            want = (n, p.width(k))
            if t.dtype != p.dtype or tuple(t.shape) != want:
                raise ValueError(
                    f"{self.format}: plane {p.name!r} is {t.dtype} {tuple(t.shape)}, "
                    f"expected {p.dtype} {want}"
                )

    @property
    def layout(self) -> QuantFormat:
        """The format's description (planes, block, dequant)."""
        return get_format(self.format)

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def device(self) -> torch.device:
        return next(iter(self.planes.values())).device

    @property
    def nbytes(self) -> int:
        """Bytes of all planes (what a kernel reads to apply the whole matrix once)."""
        return sum(t.numel() * t.element_size() for t in self.planes.values())

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The [N, K] matrix: computed in float32 exactly as ggml does, then cast to `dtype`."""
        w = self.layout.dequantize(self.planes, *self.shape)
        return w if dtype == torch.float32 else w.to(dtype)

    def slice_rows(self, lo: int, hi: int) -> QuantizedTensor:
        """Output rows [lo, hi) (views)."""
        _check_range("row", lo, hi, self.out_features)
        planes = {name: t[lo:hi] for name, t in self.planes.items()}
        return QuantizedTensor(self.format, (hi - lo, self.in_features), planes)

    def take_rows(self, index: torch.Tensor) -> QuantizedTensor:
        """The output rows listed in `index` (1-D integer tensor), in that order (copies)."""
        index = index.to(device=self.device, dtype=torch.long)
        if index.dim() != 1 or index.numel() == 0:
            raise ValueError(f"row index must be a non-empty 1-D tensor, got shape {index.shape}")
        planes = {name: t.index_select(0, index) for name, t in self.planes.items()}
        return QuantizedTensor(self.format, (index.numel(), self.in_features), planes)

    def slice_cols(self, lo: int, hi: int) -> QuantizedTensor:
        """Input columns [lo, hi) (views); lo and hi must be multiples of the format's block."""
        _check_range("column", lo, hi, self.in_features)
        layout = self.layout
        if lo % layout.block or hi % layout.block:
            raise ValueError(
                f"{self.format}: column slice [{lo}, {hi}) is not aligned to the block size "
                f"{layout.block} (both bounds must be multiples of {layout.block})"
            )
        planes = {p.name: self.planes[p.name][:, p.col_range(lo, hi)] for p in layout.planes}
        return QuantizedTensor(self.format, (self.out_features, hi - lo), planes)

    def to(self, device: torch.device | str) -> QuantizedTensor:
        """The same tensor with every plane on `device` (dtypes never change)."""
        planes = {name: t.to(device) for name, t in self.planes.items()}
        return QuantizedTensor(self.format, self.shape, planes)

    def contiguous(self) -> QuantizedTensor:
        """The same tensor with every plane contiguous (a copy of those that are views)."""
        planes = {name: t.contiguous() for name, t in self.planes.items()}
        return QuantizedTensor(self.format, self.shape, planes)

    def to_flat(self, name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(`{name.plane: tensor}` with contiguous CPU tensors, JSON-able metadata) for a
        safetensors file; `from_flat` reverses it.
        """
        tensors = {f"{name}.{p}": t.contiguous().cpu() for p, t in self.planes.items()}
        return tensors, {"format": self.format, "shape": list(self.shape)}

    @classmethod
    def from_flat(
        cls, name: str, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]
    ) -> QuantizedTensor:
        """The tensor `name` saved by `to_flat` (tensors may hold other entries too)."""
        layout = get_format(metadata["format"])
        planes = {}
        for p in layout.planes:
            key = f"{name}.{p.name}"
            if key not in tensors:
                raise KeyError(f"quantized tensor {name!r} ({layout.name}): plane {key!r} missing")
            planes[p.name] = tensors[key]
        return cls(layout.name, tuple(metadata["shape"]), planes)


def _check_range(what: str, lo: int, hi: int, size: int) -> None:
    if not 0 <= lo < hi <= size:
        raise ValueError(f"{what} range [{lo}, {hi}) is empty or outside [0, {size})")


def cat_rows(parts: list[QuantizedTensor]) -> QuantizedTensor:
    """The row-wise concatenation of quantized matrices of one format and one in_features (e.g.
    q/k/v or gate/up fused into one projection); ValueError otherwise.
    """
    if not parts:
        raise ValueError("cat_rows needs at least one tensor")
    first = parts[0]
    for p in parts[1:]:
        if p.format != first.format or p.in_features != first.in_features:
            raise ValueError(f"cannot stack {p.format} {p.shape} under {first.format} "
                             f"{first.shape}: formats and in_features must match")
    planes = {name: torch.cat([p.planes[name] for p in parts]) for name in first.planes}
    return QuantizedTensor(first.format, (sum(p.out_features for p in parts),
                                          first.in_features), planes)
