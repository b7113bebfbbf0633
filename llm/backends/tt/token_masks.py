"""Structured output's token masks applied to the logits on the device.

The engine computes, per constrained user, a bitmask of the tokens its grammar allows next
(llm.engine.contract.structured.TokenMasks). ttnn 0.81.1 has no op that expands packed bits on
the device (no shifts or bitwise ops among the documented ones), so the host unpacks them into an
additive mask of the 32 rows: 0 where allowed, MASKED elsewhere (rows of unconstrained users all
0), written into a persistent device buffer before the step (copy_host_to_device_tensor) and added
to the logits on the device before penalties, selection and logprobs (logprobs.select), so
logprobs are those of the constrained distribution. The cost is one host write of 32 x V_pad
bfloat16 values per constrained step (3.1 MB for a 49152-token vocabulary), where the torch
backend moves the 4-byte words; STATUS.md says so.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from llm.backends.tt.mesh import TILE
from llm.engine.contract.structured import TokenMasks

MASKED = -1e30  # a disallowed token's additive mask: finite in bf16 and fp32, exp() gives 0


def additive_masks(masks: TokenMasks | None, rows: Sequence[int], vocab: int,
                   width: int) -> torch.Tensor:
    """The masks as an additive float tensor `[1, 1, 32, width]` (waits for the masks):
    masks.rows index `rows` (the tile row of each of the step's users); other rows are 0.
    vocab: the model's vocabulary; width: the padded one (columns past vocab are MASKED)."""
    out = torch.zeros(1, 1, TILE, width)
    if masks is None:
        return out
    bits = masks.result_for(vocab)  # [R, W] int32
    allowed = np.unpackbits(bits.view(np.uint8), axis=1, bitorder="little")  # [R, 32 W]
    cols = vocab
    keep = torch.zeros(len(masks.rows), width, dtype=torch.bool)
    keep[:, :cols] = torch.from_numpy(allowed[:, :cols].astype(np.bool_))
    tile_rows = torch.tensor([rows[i] for i in masks.rows], dtype=torch.int64)
    out[0, 0, tile_rows] = torch.where(keep, 0.0, MASKED)
    return out
