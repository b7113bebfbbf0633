"""RoPE frequencies of a model, shared by every backend (the model's math, not a device's)."""

from __future__ import annotations

import math

import torch

from llm.model.config import ModelConfig


def inv_frequencies(config: ModelConfig, long: bool = False) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2] in fp32, with the config's RoPE scaling applied (for
    LongRoPE: divided by the short factors, or the long ones when `long`). With partial rotation
    the frequencies of the rotary dims come first, zeros (no rotation) after them: the order of
    `rotary_row_order`."""
    inv = _rotary_inv_frequencies(config, long)  # [rotary_dim/2]
    return torch.cat([inv, inv.new_zeros(config.head_dim // 2 - inv.numel())])  # [hd/2]


def rotary_row_order(config: ModelConfig) -> torch.Tensor | None:
    """With partial rotation, the order [head_dim] in which each q/k head's rows (and biases,
    q/k norm gains) go, so that rotating the whole head in rotate-half pairs (j, j + hd/2) with
    `inv_frequencies` is transformers' partial rotation: its pairs (i, i + rd/2) of the first rd
    dims at j < rd/2, its unrotated dims in pairs of zero frequency after them. The same order
    for q and k leaves q.k as it is. None when whole heads rotate."""
    hd, rd = config.head_dim, config.rotary_dim
    if rd == hd:
        return None
    half, rest = rd // 2, (hd - rd) // 2
    first = [*range(half), *range(rd, rd + rest)]
    second = [*range(half, rd), *range(rd + rest, hd)]
    return torch.tensor(first + second)


def head_row_index(heads: int, order: torch.Tensor) -> torch.Tensor:
    """[heads * head_dim] the source row of each row of a per-head projection whose rows go in
    `order` [head_dim] within each head."""
    return (torch.arange(heads)[:, None] * order.numel() + order[None, :]).reshape(-1)


def _rotary_inv_frequencies(config: ModelConfig, long: bool) -> torch.Tensor:
    """The scaled inverse frequencies of the rotary dims [rotary_dim / 2]."""
    rd = config.rotary_dim
    exponents = torch.arange(0, rd, 2, dtype=torch.int64).float() / rd
    inv = 1.0 / (config.rope_theta ** exponents)  # [rd/2]
    rs = config.rope_scaling
    if rs is None:
        return inv
    if rs.rope_type == "linear":
        return inv / rs.factor
    if rs.rope_type in ("freq_factors", "longrope"):
        if rs.rope_type == "freq_factors":
            values = rs.freq_factors
        else:
            values = rs.long_factor if long else rs.short_factor
        factors = torch.tensor(values, dtype=torch.float32)
        if factors.shape != inv.shape:
            raise ValueError(f"{rs.rope_type} has {factors.numel()} factors, expected "
                             f"{inv.numel()}")
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


def has_long_table(config: ModelConfig) -> bool:
    """Whether this model rotates with two sets of frequencies (LongRoPE's short and long)."""
    return config.rope_scaling is not None and config.rope_scaling.rope_type == "longrope"


def cos_sin(config: ModelConfig, length: int, long: bool = False
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [length, head_dim / 2] fp32 of positions 0 .. length - 1, one column per
    frequency. LongRoPE's attention factor, by which transformers multiplies cos and sin, is in
    `ModelConfig.attention_scale` instead (squared, as q and k both carry it), except with
    partial rotation: there it scales the rotary dims only, so it stays here, on their columns.

    long False: the table of single-position steps (decode): with LongRoPE, row p uses the long
    factors when p + 1 > original_max_position_embeddings (`RopeScaling.uses_long`), the short
    ones below. long True: every row uses the long factors (a prefill whose positions reach past
    original_max_position_embeddings: transformers rotates the whole forward pass with them).
    """
    pos = torch.arange(length, dtype=torch.float32)
    rs = config.rope_scaling
    if not has_long_table(config):
        ang = pos[:, None] * inv_frequencies(config)[None, :]  # [L, hd/2]
        return ang.cos(), ang.sin()
    ang_long = pos[:, None] * inv_frequencies(config, long=True)[None, :]  # [L, hd/2]
    if long:
        ang = ang_long
    else:
        ang_short = pos[:, None] * inv_frequencies(config)[None, :]
        beyond = (pos + 1 > rs.original_max_position_embeddings)[:, None]  # [L, 1]
        ang = torch.where(beyond, ang_long, ang_short)
    cos, sin = ang.cos(), ang.sin()
    if config.partial_rotary_dim is not None:
        scale = torch.ones(config.head_dim // 2)
        scale[:config.rotary_dim // 2] = rs.attention_factor  # [hd/2]
        cos, sin = cos * scale, sin * scale
    return cos, sin
