"""RMSNorm and distributed RMSNorm (reference 4.4): fp32 compute, rounded to the output dtype."""

from __future__ import annotations

import math

import torch

from .accounting import op, set_cost
from .memory import DRAM_MEMORY_CONFIG, TensorMemoryLayout
from .opsupport import floats, output, require_device, require_dtype, require_tile, same_device
from .program_configs import LayerNormDefaultProgramConfig, LayerNormShardedMultiCoreProgramConfig
from .types import TILE_SIZE, DataType, Layout

_NORM_DTYPES = (DataType.BFLOAT16, DataType.FLOAT32, DataType.BFLOAT8_B)


def _check_input(x, residual, name):
    require_device(x, name)
    require_tile(x, name)
    require_dtype(x, _NORM_DTYPES, name)
    if residual is not None:
        same_device(name, x, residual)
        if tuple(residual.shape) != tuple(x.shape):
            raise RuntimeError(f"{name}: residual shape {list(residual.shape)} != input")


def _gamma(weight, width: int, padded_width: int, name: str, what: str = "weight"):
    """Per-chip gamma/beta vectors [W] in fp32 (rounded storage values) plus the raw dtype."""
    if weight is None:
        return None
    if weight.layout == Layout.TILE:
        if weight.padded_shape[-1] != padded_width:
            raise RuntimeError(f"{name}: TILE {what} needs the input's padded last dim")
    elif weight.shape[-1] != TILE_SIZE:
        raise RuntimeError(f"{name}: ROW_MAJOR {what} must have last dim 32 ([1,1,W/32,32])")
    return [g.reshape(-1)[:width] for g in floats(weight)]


def _check_sharding(x, memory_config, program_config, name):
    mem = x.memory_config()
    if mem.is_sharded():
        if mem.memory_layout == TensorMemoryLayout.HEIGHT_SHARDED:
            raise RuntimeError(f"{name}: height-sharded input is not supported")
        if memory_config is not None and memory_config.memory_layout != mem.memory_layout:
            raise RuntimeError(f"{name}: sharded input needs an output sharded the same way")
        if program_config is not None:
            if not isinstance(program_config, LayerNormShardedMultiCoreProgramConfig):
                raise RuntimeError(f"{name}: sharded input needs a sharded program config")
            sh, sw = mem.shard_spec.shape
            pc = program_config
            if pc.block_h != sh // TILE_SIZE or pc.block_w != sw // TILE_SIZE:
                raise RuntimeError(f"{name}: block_h/block_w ({pc.block_h},{pc.block_w}) must"
                                   f" equal the shard {mem.shard_spec.shape} in tiles")
            if pc.block_w % pc.subblock_w:
                raise RuntimeError(f"{name}: subblock_w must divide block_w")
    elif isinstance(program_config, LayerNormShardedMultiCoreProgramConfig):
        raise RuntimeError(f"{name}: sharded program config needs a sharded input")
    elif program_config is not None and not isinstance(program_config,
                                                       LayerNormDefaultProgramConfig):
        raise RuntimeError(f"{name}: unsupported program config {type(program_config).__name__}")
    if memory_config is not None and memory_config.is_sharded() and not mem.is_sharded():
        raise RuntimeError(f"{name}: interleaved input cannot produce a sharded output")


@op("rms_norm")
def rms_norm(input_tensor, *, epsilon=1e-12, weight=None, bias=None, residual_input_tensor=None,
             memory_config=None, program_config=None, compute_kernel_config=None):
    """ttnn.rms_norm: y = (x+res) * rsqrt(mean((x+res)^2) + eps) [* weight] [+ bias]."""
    name = "rms_norm"
    _check_input(input_tensor, residual_input_tensor, name)
    _check_sharding(input_tensor, memory_config, program_config, name)
    width, pwidth = input_tensor.shape[-1], input_tensor.padded_shape[-1]
    gammas = _gamma(weight, width, pwidth, name)
    betas = _gamma(bias, width, pwidth, name, "bias")
    res = floats(residual_input_tensor) if residual_input_tensor is not None else None
    outs = []
    for i, x in enumerate(floats(input_tensor)):
        if res is not None:
            x = x + res[i]
        var = x.pow(2).mean(-1, keepdim=True)
        y = x * torch.rsqrt(var + epsilon)
        if gammas is not None:
            if weight.dtype == DataType.BFLOAT16:
                y = y.to(torch.bfloat16).float()
            y = y * gammas[i]
        if betas is not None:
            y = y + betas[i]
        outs.append(y)
    set_cost(flops=5 * math.prod(input_tensor.padded_shape))
    return output(input_tensor, outs, memory_config=memory_config, op=name)


@op("rms_norm_pre_all_gather")
def rms_norm_pre_all_gather(input_tensor, *, dtype=DataType.BFLOAT16, residual_input_tensor=None,
                            compute_kernel_config=None, program_config=None, memory_config=None,
                            use_2d_core_grid=None, fast_and_approximate_mode=False):
    """Local statistics [..., 32]: column 0 holds sum(x^2) over the local width, others are 0."""
    name = "rms_norm_pre_all_gather"
    _check_input(input_tensor, residual_input_tensor, name)
    res = floats(residual_input_tensor) if residual_input_tensor is not None else None
    outs = []
    for i, x in enumerate(floats(input_tensor)):
        if res is not None:
            x = x + res[i]
        stats = torch.zeros(*x.shape[:-1], TILE_SIZE)  # [..., W] -> [..., 32]
        stats[..., 0] = x.pow(2).sum(-1)
        outs.append(stats)
    set_cost(flops=2 * math.prod(input_tensor.padded_shape))
    mem = memory_config
    if mem is None and input_tensor.is_sharded():
        mem = DRAM_MEMORY_CONFIG
    return output(input_tensor, outs, dtype=dtype, memory_config=mem, op=name)


@op("rms_norm_post_all_gather")
def rms_norm_post_all_gather(input_tensor, stats, *, epsilon=1e-12, weight=None, bias=None,
                             memory_config=None, compute_kernel_config=None, program_config=None,
                             dtype=None, use_2d_core_grid=None):
    """y = x * rsqrt(sum_d stats[..., 32 d] / (W * n) + eps) [* weight] [+ bias]."""
    name = "rms_norm_post_all_gather"
    _check_input(input_tensor, None, name)
    require_device(stats, name, "stats")
    if stats.shape[-1] % TILE_SIZE:
        raise RuntimeError(f"{name}: stats width must be a multiple of 32")
    width, pwidth = input_tensor.shape[-1], input_tensor.padded_shape[-1]
    gammas = _gamma(weight, width, pwidth, name)
    betas = _gamma(bias, width, pwidth, name, "bias")
    n = stats.shape[-1] // TILE_SIZE
    outs = []
    for i, (x, s) in enumerate(zip(floats(input_tensor), floats(stats))):
        ex2 = s[..., ::TILE_SIZE].sum(-1, keepdim=True) / (width * n)
        y = x * torch.rsqrt(ex2 + epsilon)
        if gammas is not None:
            y = y * gammas[i]
        if betas is not None:
            y = y + betas[i]
        outs.append(y)
    set_cost(flops=3 * math.prod(input_tensor.padded_shape))
    return output(input_tensor, outs, dtype=dtype, memory_config=memory_config, op=name)
