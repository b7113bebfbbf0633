"""Rotary position embedding (rotate-half convention) with precomputed cos/sin tables."""

from __future__ import annotations

import torch

from llm.model.config import ModelConfig
from llm.model.rope import inv_frequencies


class RotaryEmbedding:
    """cos/sin tables `[max_seq_len, head_dim]` computed once in fp32, kept in the model dtype."""

    def __init__(self, config: ModelConfig, max_seq_len: int, device: torch.device | str,
                 dtype: torch.dtype) -> None:
        inv = inv_frequencies(config)
        pos = torch.arange(max_seq_len, dtype=torch.float32)
        freqs = pos[:, None] * inv[None, :]  # [S, hd/2]
        emb = torch.cat([freqs, freqs], dim=-1)  # [S, hd]
        self.cos = emb.cos().to(device=device, dtype=dtype)
        self.sin = emb.sin().to(device=device, dtype=dtype)
        self.max_seq_len = max_seq_len

    def gather(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [N] -> (cos, sin) each [N, hd]."""
        return self.cos[positions], self.sin[positions]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., N, heads, hd] with cos/sin [N, hd] -> rotated x, same shape."""
    cos = cos.unsqueeze(-2)  # [N, 1, hd]
    sin = sin.unsqueeze(-2)
    return x * cos + rotate_half(x) * sin
