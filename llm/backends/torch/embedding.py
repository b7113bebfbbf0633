"""Token embedding lookup."""

from __future__ import annotations

import torch


class Embedding:
    """Looks up rows of the embedding table `[vocab, hidden]`."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight  # [V, H]

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [...] int64 -> [..., H]."""
        return torch.nn.functional.embedding(tokens, self.weight)
