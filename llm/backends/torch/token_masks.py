"""Structured output's token masks applied to the logits on the device.

The engine computes, per constrained user, a bitmask of the tokens its grammar allows next
(llm.engine.contract.structured.TokenMasks); here it is expanded to booleans on the device and
every other token's logit becomes -inf, before penalties, sampling and logprobs (so logprobs are
those of the constrained distribution). Rows of unconstrained users are left untouched, bit for
bit.
"""

from __future__ import annotations

import numpy as np
import torch

from llm.engine.contract.structured import TokenMasks


def unpack_words(words: torch.Tensor) -> torch.Tensor:
    """Mask words [R, W] (int32, on any device) -> bool [R, 32 W] there: bit j of word w allows
    token 32 w + j."""
    shifts = torch.arange(32, dtype=torch.int32, device=words.device)  # [32]
    return ((words[:, :, None] >> shifts) & 1).bool().reshape(words.shape[0], -1)


def apply_token_masks(logits: torch.Tensor, masks: TokenMasks,
                      host_unpack: bool | None = None) -> torch.Tensor:
    """logits [B, V] -> logits [B, V] with the disallowed tokens of the masked rows at -inf
    (waits for the masks; a new tensor, `logits` is not written). host_unpack: expand the bits
    by numpy on the host (None: on the CPU) rather than on the logits' device."""
    dev = logits.device
    batch, vocab = logits.shape
    bits = masks.result_for(vocab)  # [R, W] int32
    width = bits.shape[1] * 32
    rows = list(masks.rows)
    if host_unpack if host_unpack is not None else dev.type == "cpu":  # numpy: fast on the CPU
        allowed = np.ones((batch, width), dtype=np.bool_)  # [B, 32 W]: unmasked rows all True
        allowed[rows] = np.unpackbits(bits.view(np.uint8), axis=1, bitorder="little").view(
            np.bool_)
        keep = torch.from_numpy(allowed).to(dev)
    else:  # expanded on the device: 4 bytes per 32 tokens cross the bus
        words = torch.from_numpy(bits).to(dev, non_blocking=True)  # [R, W]
        keep = torch.ones(batch, width, dtype=torch.bool, device=dev)  # [B, 32 W]
        keep[torch.tensor(rows, device=dev)] = unpack_words(words)
    return torch.where(keep[:, :vocab], logits, float("-inf"))  # [B, V]
