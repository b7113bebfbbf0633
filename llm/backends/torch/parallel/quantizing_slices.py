"""Quantize-at-load on a tensor-parallel rank: int8 / int4 from a Hugging Face model's slices.

Each rank reads only its slices of the float checkpoint and quantizes them as `load_checkpoint`
quantizes the whole matrices (`llm.model.checkpoint.load.quantize_matrix`), so that a rank holds
exactly the rows / columns of the single-process quantized matrices:

- rows (column-parallel q/k/v, gate/up, embedding, LM head): per-row int8 scales and int4 groups
  lie within a row, so quantizing the rows alone gives the same codes and scales;
- columns (row-parallel o_proj / down_proj): int4 groups are whole groups of the slice when the
  split falls on group boundaries (the plan aligns it, `column_block`), and the int8 scale of a
  row is max |w| over the whole row: the ranks agree on it with one max all-reduce of their
  slices' row maxima per matrix (`across(mesh)`), so no rank reads another rank's columns.

The all-reduce is a collective: every rank reads the same column-sliced matrices in the same
order (the plan's `read_local` does).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from llm.backends.torch.parallel.slices import WeightSlices, check_group, open_weight_slices
from llm.model.checkpoint.common import (
    QUANTIZE_MODES,
    CheckpointError,
    expected_tensors,
)
from llm.model.checkpoint.load import (
    check_weights,
    int4_group,
    matrix_mode,
    quantize_matrix,
    resolve_checkpoint,
)
from llm.model.quant.int_formats import int4_format
from llm.model.quant.state import Weight

if TYPE_CHECKING:
    from llm.backends.torch.parallel.mesh import Mesh

RowMax = Callable[[torch.Tensor], torch.Tensor]  # float32 [N, 1] -> elementwise max over ranks


def open_slices_as(path: str | Path, weights: str, *, cache_dir: str | Path | None = None,
                   progress: bool = True, int4_group: int | None = None) -> WeightSlices:
    """A `WeightSlices` giving what `load_checkpoint(path, weights=weights)` gives, in slices:
    `open_weight_slices` for "dequantize" / "stored", an HF directory's slices quantized as they
    are read (`QuantizingSlices`) for "int8" / "int4" / "int4_mix" (int4_group: as
    `load_checkpoint`'s)."""
    check_weights(weights, int4_group)
    if weights in ("dequantize", "stored"):
        return open_weight_slices(path, cache_dir=cache_dir, progress=progress, weights=weights)
    resolved, kind = resolve_checkpoint(path)
    if kind != "dir":
        raise CheckpointError(f"{resolved}: weights={weights!r} quantizes a floating-point "
                              "Hugging Face checkpoint; a GGUF runs as stored (weights='stored') "
                              "or dequantized")
    return QuantizingSlices(open_weight_slices(resolved, progress=progress), weights,
                            group=int4_group)


class QuantizingSlices(WeightSlices):
    """`inner`'s float slices with every matrix quantized to `mode` (one of QUANTIZE_MODES) as
    read.

    row_max: the max over the ranks of each rank's [N, 1] row maxima (default: the identity, one
    rank or a reader used alone); `across(mesh)` gives the reader for a mesh.
    """

    def __init__(self, inner: WeightSlices, mode: str, row_max: RowMax | None = None,
                 group: int | None = None) -> None:
        if mode not in QUANTIZE_MODES:
            raise ValueError(f"QuantizingSlices quantizes to one of {', '.join(QUANTIZE_MODES)},"
                             f" not {mode!r}")
        self.inner, self.mode = inner, mode
        self.config, self.source = inner.config, inner.source
        self.source_sha256 = inner.source_sha256
        self.row_max = row_max or (lambda x: x)
        self.group = group  # every int4 matrix's (None: `int4_group`'s choice per matrix)
        self._shapes = expected_tensors(inner.config)

    def across(self, mesh: Mesh) -> QuantizingSlices:
        """This reader for one rank of `mesh` (`Mesh.all_max` agrees on int8 row scales)."""
        return QuantizingSlices(self.inner, self.mode, mesh.all_max, self.group)

    def column_block(self, name: str) -> tuple[int, str]:
        shape = self._shapes[name]
        if len(shape) != 2 or matrix_mode(name, self.mode) == "int8":
            return (1, "int8") if len(shape) == 2 else (1, "")
        group = self.group if self.group is not None else int4_group(name, shape[1])
        if shape[1] % group:
            raise CheckpointError(f"{name}: in_features {shape[1]} is no multiple of the int4 "
                                  f"group {group}")
        return group, int4_format(group).name

    def _read(self, name: str, dim: int | None, start: int, stop: int) -> Weight:
        t = self.inner._read(name, dim, start, stop)
        if t.dim() != 2:
            return t
        block, fmt = self.column_block(name)
        absmax = None
        if dim == 1:
            check_group(name, fmt, block, start, stop)
            if fmt == "int8":  # the whole rows' max |w|: from every rank's columns
                absmax = self.row_max(t.detach().float().abs().amax(dim=1, keepdim=True))
        return quantize_matrix(name, t, self.mode, self._shapes[name][1], absmax,
                               None if fmt == "int8" else block)

    def close(self) -> None:
        self.inner.close()
