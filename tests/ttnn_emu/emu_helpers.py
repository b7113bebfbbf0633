"""Test helpers written from the reference doc (not from emulator internals)."""

import math

import torch

import llm.ttnn_emu as ttnn


def crs(x0, y0, x1, y1):
    """CoreRangeSet of one rectangle."""
    return ttnn.CoreRangeSet({ttnn.CoreRange(ttnn.CoreCoord(x0, y0), ttnn.CoreCoord(x1, y1))})


def width_sharded_l1(rows, width, ncores):
    """L1 WIDTH_SHARDED config over the first `ncores` cores of row 0."""
    spec = ttnn.ShardSpec(crs(0, 0, ncores - 1, 0), (rows, width // ncores),
                          ttnn.ShardOrientation.ROW_MAJOR)
    return ttnn.MemoryConfig(ttnn.TensorMemoryLayout.WIDTH_SHARDED, ttnn.BufferType.L1, spec)


def dram_sharded_weight_config(k, n, banks=12):
    """create_dram_sharded_mem_config(k, n) of reference 0.2."""
    shard_w = math.ceil(n / (32 * banks)) * 32
    spec = ttnn.ShardSpec(crs(0, 0, banks - 1, 0), (k, shard_w), ttnn.ShardOrientation.ROW_MAJOR)
    return ttnn.MemoryConfig(ttnn.TensorMemoryLayout.WIDTH_SHARDED, ttnn.BufferType.DRAM, spec)


def bf16(x):
    """Round to bf16 and back to fp32."""
    return x.to(torch.bfloat16).float()


def on(device, x, dtype=ttnn.bfloat16, layout=ttnn.TILE_LAYOUT, mem=None, mapper=None):
    """from_torch onto `device`."""
    return ttnn.from_torch(x, dtype=dtype, layout=layout, device=device,
                           memory_config=mem or ttnn.DRAM_MEMORY_CONFIG, mesh_mapper=mapper)
