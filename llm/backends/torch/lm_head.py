"""The LM head, computed in vocabulary chunks (and vocabulary-parallel over a mesh)."""

from __future__ import annotations

import torch

from llm.backends.torch.parallel.mesh import Mesh
from llm.backends.torch.weight import QuantLinear, is_dense, linear


class LMHead:
    """logits = x @ W^T with W `[V, H]` split into column chunks of at most `chunk_size` rows of W.

    Chunking bounds the size of each matmul's output (the working set of one chunk) and mirrors the
    tt backend's split LM head; the chunks write into one preallocated logits tensor. On a mesh, W
    is this rank's vocabulary rows [offset, offset + V_local): `__call__` gives the local logits,
    `gather` the whole row and `argmax` the global greedy token without gathering the logits.
    """

    def __init__(self, weight: torch.Tensor | QuantLinear, chunk_size: int = 16384,
                 mesh: Mesh | None = None,
                 offset: int = 0, sizes: list[int] | None = None,
                 fused_argmax: bool = False) -> None:
        """sizes: every rank's number of vocabulary rows, in rank order (gathers pad to the
        largest). fused_argmax: `argmax` by the split Triton kernel (kernels/argmax.py) instead
        of torch's single-reduction argmax."""
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        self.weight = weight  # [V_local, H]
        if chunk_size >= weight.shape[0]:  # one chunk: the weight itself (a tied one is shared)
            self.chunks = [weight]
        elif isinstance(weight, QuantLinear):
            self.chunks = weight.split_rows(chunk_size)
        else:
            self.chunks = list(torch.split(weight, chunk_size, dim=0))
        self.mesh = mesh or Mesh.single()
        self.offset = offset
        self.sizes = sizes or [weight.shape[0]]
        self.fused_argmax = fused_argmax

    @property
    def vocab_size(self) -> int:
        return self.weight.shape[0]

    def __call__(self, x: torch.Tensor, gemv: bool = False) -> torch.Tensor:
        """x [N, H] -> logits [N, V_local]. gemv (small decode batches on CUDA): the whole local
        vocabulary in one launch of the small-batch Triton GEMV (no chunks: its output is N rows),
        where the weight is within the kernel's 32-bit offsets."""
        if gemv:
            from llm.backends.torch.kernels.gemv import fits
            from llm.backends.torch.kernels.gemv import gemv as small_gemv

            if is_dense(self.weight) and fits(self.weight):
                return small_gemv(x, self.weight)
        if len(self.chunks) == 1:
            return linear(x, self.weight)
        out = torch.empty(x.shape[0], self.vocab_size, dtype=x.dtype, device=x.device)
        col = 0
        for w in self.chunks:
            out[:, col:col + w.shape[0]] = linear(x, w)  # [N, chunk]
            col += w.shape[0]
        return out

    def gather(self, logits: torch.Tensor) -> torch.Tensor:
        """Local logits [N, V_local] -> the whole vocabulary's [N, V] on every rank."""
        if not self.mesh.distributed:
            return logits
        pad = max(self.sizes) - logits.shape[-1]
        if pad:
            logits = torch.nn.functional.pad(logits, (0, pad), value=float("-inf"))
        parts = self.mesh.all_gather(logits)  # [ranks, N, max(sizes)]
        return torch.cat([p[:, :n] for p, n in zip(parts, self.sizes)], dim=-1)  # [N, V]

    def argmax(self, logits: torch.Tensor) -> torch.Tensor:
        """Local logits [N, V_local] -> global argmax token ids [N] (the lowest id among equal
        maxima, as a single-device argmax), from one all-gather of [2, N] per rank.
        """
        if self.fused_argmax:
            from llm.backends.torch.kernels.argmax import max_argmax

            value, index = max_argmax(logits)  # [N] fp32, [N] int64
        elif not self.mesh.distributed:
            return torch.argmax(logits, dim=-1)
        else:
            value, index = torch.max(logits.float(), dim=-1)  # [N]
        if not self.mesh.distributed:
            return index
        pair = torch.stack([value, (index + self.offset).float()])  # ids < 2**24: exact in fp32
        both = self.mesh.all_gather(pair)  # [ranks, 2, N]
        best = torch.argmax(both[:, 0], dim=0)  # [N]: the first rank holding the maximum
        return both[:, 1].gather(0, best[None])[0].to(torch.int64)
