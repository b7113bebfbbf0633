"""Structured output's token masks applied to the logits on the device.

The engine computes, per constrained user, a bitmask of the tokens its grammar allows next
(llm.engine.contract.structured.TokenMasks); here it is expanded to booleans on the device and
every other token's logit becomes -inf, before penalties, sampling and logprobs (so logprobs are
those of the constrained distribution). Rows of unconstrained users are left untouched, bit for
bit.
"""

from __future__ import annotations

import torch

from llm.engine.contract.structured import TokenMasks


def apply_token_masks(logits: torch.Tensor, masks: TokenMasks) -> torch.Tensor:
    """logits [B, V] -> logits [B, V] with the disallowed tokens of the masked rows at -inf
    (waits for the masks; a new tensor, `logits` is not written)."""
    dev = logits.device
    bits = torch.from_numpy(masks.result()).to(dev, non_blocking=True)  # [R, W] int32
    shifts = torch.arange(32, dtype=torch.int32, device=dev)  # [32]
    allowed = ((bits[:, :, None] >> shifts) & 1).bool().reshape(bits.shape[0], -1)  # [R, 32 W]
    vocab = logits.shape[-1]
    if allowed.shape[1] < vocab:
        raise ValueError(f"token masks cover {allowed.shape[1]} tokens, the logits {vocab}")
    rows = torch.tensor(masks.rows, dtype=torch.int64, device=dev)  # [R]
    masked = logits[rows].masked_fill(~allowed[:, :vocab], float("-inf"))  # [R, V]
    return logits.index_put((rows,), masked)
