"""The LM head, computed in vocabulary chunks."""

from __future__ import annotations

import torch


class LMHead:
    """logits = x @ W^T with W `[V, H]` split into column chunks of at most `chunk_size` rows of W.

    Chunking bounds the size of each matmul's output (the working set of one chunk) and mirrors the
    tt backend's split LM head; the chunks write into one preallocated logits tensor.
    """

    def __init__(self, weight: torch.Tensor, chunk_size: int = 16384) -> None:
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        self.weight = weight  # [V, H]
        self.chunks = list(torch.split(weight, chunk_size, dim=0))

    @property
    def vocab_size(self) -> int:
        return self.weight.shape[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, H] -> logits [N, V]."""
        if len(self.chunks) == 1:
            return x @ self.weight.T
        out = torch.empty(x.shape[0], self.vocab_size, dtype=x.dtype, device=x.device)
        col = 0
        for w in self.chunks:
            out[:, col:col + w.shape[0]] = x @ w.T  # [N, chunk]
            col += w.shape[0]
        return out
