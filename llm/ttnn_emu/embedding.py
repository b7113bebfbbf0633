"""ttnn.embedding (reference 4.1)."""

from __future__ import annotations

import enum
import math

import torch

from .accounting import op, set_cost
from .opsupport import output, require_device, same_device, write_output
from .types import DataType, Layout, storage_bytes


class EmbeddingsType(enum.Enum):
    """ttnn.EmbeddingsType."""

    GENERIC = 0
    PADDED = 1
    BINARY = 2


@op("embedding")
def embedding(input_tensor, weight, *, padding_idx=None, layout=None,
              embeddings_type=EmbeddingsType.GENERIC, dtype=None, memory_config=None,
              output_tensor=None):
    """ttnn.embedding: rows of `weight` ([1,1,vocab,D] or [vocab,D]) gathered by index.

    Shapes: 4-D indices [B,1,1,S] -> [B,S,D]; other index shapes I -> I + [D].
    """
    require_device(input_tensor, "embedding", "input_tensor")
    require_device(weight, "embedding", "weight")
    same_device("embedding", input_tensor, weight)
    if input_tensor.dtype not in (DataType.UINT32, DataType.BFLOAT16):
        raise RuntimeError("embedding: indices must be UINT32 or BFLOAT16")
    if input_tensor.layout != Layout.ROW_MAJOR or weight.layout != Layout.ROW_MAJOR:
        raise RuntimeError("embedding: indices and weight must be ROW_MAJOR")
    if input_tensor.is_sharded():
        raise RuntimeError("embedding: indices must be interleaved")
    if weight.dtype != DataType.BFLOAT16:
        raise RuntimeError("embedding: weight must be BFLOAT16")
    out_layout = layout or Layout.ROW_MAJOR
    if dtype is not None and dtype != weight.dtype and out_layout != Layout.TILE:
        raise RuntimeError("embedding: a dtype cast needs layout=TILE output")
    wshape = tuple(weight.shape)
    if len(wshape) > 2 and any(d != 1 for d in wshape[:-2]):
        raise RuntimeError(f"embedding: weight must be [1,1,vocab,D], got {list(wshape)}")
    vocab, dim = wshape[-2], wshape[-1]
    ishape = tuple(input_tensor.shape)
    out_shape = (ishape[0], ishape[3], dim) if len(ishape) == 4 else ishape + (dim,)
    if out_layout == Layout.TILE and (out_shape[-2] % 32 or dim % 32):
        raise RuntimeError("embedding: layout=TILE needs S % 32 == 0 and D % 32 == 0")
    outs = []
    for idx, w in zip(input_tensor.logical_shards(), weight.logical_shards()):
        idx = idx.to(torch.int64)
        if idx.numel() and (idx.min() < 0 or idx.max() >= vocab):
            raise RuntimeError(f"embedding: index out of range [0, {vocab})")
        table = w.reshape(vocab, dim)
        rows = table[idx.reshape(-1)]
        if padding_idx is not None:
            rows = torch.where((idx.reshape(-1) == padding_idx)[:, None], 0, rows)
        outs.append(rows.reshape(out_shape))  # I -> I + [D]
    n_rows = math.prod(ishape)
    set_cost(dram_bytes=storage_bytes(n_rows * dim, weight.dtype)
             + storage_bytes(n_rows, DataType.UINT32) + storage_bytes(n_rows * dim, weight.dtype))
    out = output(input_tensor, outs, dtype=dtype or weight.dtype, layout=out_layout,
                 memory_config=memory_config, op="embedding")
    return write_output(out, output_tensor, "embedding")
