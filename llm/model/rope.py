"""RoPE frequencies of a model, shared by every backend (the model's math, not a device's)."""

from __future__ import annotations

import math

import torch

from llm.model.config import ModelConfig


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
