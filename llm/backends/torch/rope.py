"""Rotary position embedding (rotate-half convention) with precomputed cos/sin tables."""

from __future__ import annotations

import torch

from llm.model.config import ModelConfig
from llm.model.rope import inv_frequencies


class RotaryEmbedding:
    """cos/sin tables `[max_seq_len, head_dim]` computed once in fp32, kept in the model dtype;
    `sin_rot` is sin with its first half negated, so that rotate_half(x) * sin, which is
    cat(-x2, x1) * sin, is roll(x) * sin_rot: the same values in two ops fewer (`apply_rotary`).
    """

    def __init__(self, config: ModelConfig, max_seq_len: int, device: torch.device | str,
                 dtype: torch.dtype) -> None:
        inv = inv_frequencies(config)
        pos = torch.arange(max_seq_len, dtype=torch.float32)
        freqs = pos[:, None] * inv[None, :]  # [S, hd/2]
        emb = torch.cat([freqs, freqs], dim=-1)  # [S, hd]
        self.cos = emb.cos().to(device=device, dtype=dtype)
        self.sin = emb.sin().to(device=device, dtype=dtype)
        self.sin_rot = rot_sin(self.sin)
        self.max_seq_len = max_seq_len

    def gather(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [N] -> (cos, sin) each [N, hd]."""
        return self.cos[positions], self.sin[positions]

    def gather_rot(self, positions: torch.Tensor) -> torch.Tensor:
        """positions [N] -> sin_rot [N, hd] (for `apply_rotary`)."""
        return self.sin_rot[positions]


def rot_sin(sin: torch.Tensor) -> torch.Tensor:
    """sin [..., hd] -> sin_rot: its first half negated (see RotaryEmbedding)."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin_rot: torch.Tensor) -> torch.Tensor:
    """x [N, heads, hd] with cos and sin_rot [N, hd] (`RotaryEmbedding.gather_rot`) -> rotated
    x, same shape: x * cos + rotate_half(x) * sin, the rotate-half convention."""
    return x * cos[:, None] + x.roll(x.shape[-1] // 2, -1) * sin_rot[:, None]
