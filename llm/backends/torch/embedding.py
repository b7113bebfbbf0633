"""Token embedding lookup (vocabulary-parallel over a mesh)."""

from __future__ import annotations

import torch

from llm.backends.torch.parallel.mesh import Mesh
from llm.backends.torch.weight import QuantLinear


class Embedding:
    """Looks up rows of the embedding table `[vocab, hidden]`.

    On a mesh each rank holds the rows [offset, offset + rows) of the vocabulary: it looks up the
    tokens it holds, writes zeros for the others, and the all-reduce sums the one real row.
    """

    def __init__(self, weight: torch.Tensor | QuantLinear, mesh: Mesh | None = None,
                 offset: int = 0) -> None:
        self.weight = weight  # [V_local, H], dense or quantized as stored
        self._lookup = weight.rows if isinstance(weight, QuantLinear) else (
            lambda ids: torch.nn.functional.embedding(ids, weight))
        self.mesh = mesh or Mesh.single()
        self.offset = offset

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [...] int64 -> [..., H]."""
        if not self.mesh.distributed:
            return self._lookup(tokens)
        local = tokens - self.offset
        held = (local >= 0) & (local < self.weight.shape[0])
        x = self._lookup(local.clamp(0, self.weight.shape[0] - 1))
        return self.mesh.all_reduce(torch.where(held[..., None], x, 0.0).to(x.dtype))
