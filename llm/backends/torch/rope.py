"""Rotary position embedding (rotate-half convention) with precomputed cos/sin tables."""

from __future__ import annotations

import math

import torch

from llm.config import ModelConfig


def inv_frequencies(config: ModelConfig) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2] in fp32, with the config's RoPE scaling applied."""
    hd = config.head_dim
    exponents = torch.arange(0, hd, 2, dtype=torch.int64).float() / hd
    inv = 1.0 / (config.rope_theta ** exponents)  # [hd/2]
    rs = config.rope_scaling
    if rs is None:
        return inv
    if rs.rope_type == "linear":
        return inv / rs.factor
    if rs.rope_type == "freq_factors":
        factors = torch.tensor(rs.freq_factors, dtype=torch.float32)
        if factors.shape != inv.shape:
            raise ValueError(f"rope_freqs has {factors.numel()} values, expected {inv.numel()}")
        return inv / factors
    # llama3: keep high frequencies, divide low ones by `factor`, interpolate in between.
    low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / rs.factor, inv)
    smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
        rs.high_freq_factor - rs.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


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
