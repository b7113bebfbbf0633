"""Rotary position embedding (rotate-half convention) with precomputed cos/sin tables."""

from __future__ import annotations

import torch

from llm.model.config import ModelConfig
from llm.model.rope import cos_sin, has_long_table


class RotaryEmbedding:
    """cos/sin tables `[max_seq_len, head_dim]` computed once in fp32, kept in the model dtype;
    `sin_rot` is sin with its first half negated, so that rotate_half(x) * sin, which is
    cat(-x2, x1) * sin, is roll(x) * sin_rot: the same values in two ops fewer (`apply_rotary`).

    With LongRoPE there are two sets: `cos`/`sin`/`sin_rot` rotate one position per step as
    transformers does (long factors from original_max_position_embeddings on, `gather`), and
    `tables(end)` gives the set of a prefill reaching position end - 1 (all long past it).
    """

    def __init__(self, config: ModelConfig, max_seq_len: int, device: torch.device | str,
                 dtype: torch.dtype) -> None:
        self.scaling = config.rope_scaling
        self.cos, self.sin, self.sin_rot = _tables(config, max_seq_len, False, device, dtype)
        self._long = (_tables(config, max_seq_len, True, device, dtype)
                      if has_long_table(config) else None)
        self.max_seq_len = max_seq_len

    @property
    def by_end(self) -> bool:
        """Whether a prefill's tables depend on its end position (LongRoPE, `tables`)."""
        return self._long is not None

    def gather(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [N] -> (cos, sin) each [N, hd] (single-position steps)."""
        return self.cos[positions], self.sin[positions]

    def gather_rot(self, positions: torch.Tensor) -> torch.Tensor:
        """positions [N] -> sin_rot [N, hd] (for `apply_rotary`; single-position steps)."""
        return self.sin_rot[positions]

    def tables(self, end: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(cos, sin, sin_rot) `[max_seq_len, hd]` for a forward pass over positions below
        `end`: LongRoPE's long set when `end` is past original_max_position_embeddings."""
        if self._long is not None and self.scaling.uses_long(end):
            return self._long
        return self.cos, self.sin, self.sin_rot


def _tables(config: ModelConfig, length: int, long: bool, device: torch.device | str,
            dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(cos, sin, sin_rot) [length, hd] in `dtype`: each frequency's column twice
    (rotate-half)."""
    cos, sin = cos_sin(config, length, long)  # [L, hd/2]
    cos = torch.cat([cos, cos], dim=-1).to(device=device, dtype=dtype)  # [L, hd]
    sin = torch.cat([sin, sin], dim=-1).to(device=device, dtype=dtype)
    return cos, sin, rot_sin(sin)


def rot_sin(sin: torch.Tensor) -> torch.Tensor:
    """sin [..., hd] -> sin_rot: its first half negated (see RotaryEmbedding)."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin_rot: torch.Tensor) -> torch.Tensor:
    """x [N, heads, hd] with cos and sin_rot [N, hd] (`RotaryEmbedding.gather_rot`) -> rotated
    x, same shape: x * cos + rotate_half(x) * sin, the rotate-half convention."""
    return x * cos[:, None] + x.roll(x.shape[-1] // 2, -1) * sin_rot[:, None]
