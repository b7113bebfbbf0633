"""ttnn.matmul / ttnn.linear (reference 4.2): fp32 compute, rounded to the output dtype."""

from __future__ import annotations

import math

import torch

from .accounting import op, set_cost
from .eltwise import apply_unary
from .memory import DRAM_MEMORY_CONFIG
from .opsupport import (
    floats,
    output,
    require_device,
    require_dtype,
    require_tile,
    same_device,
    write_output,
)
from .program_configs import validate_matmul_program_config
from .types import FLOAT_DTYPES, TILE_SIZE


def _matmul(name, a, b, bias, transpose_a, transpose_b, memory_config, dtype, program_config,
            activation, compute_kernel_config, optional_output_tensor):
    for t, what in ((a, "input_tensor_a"), (b, "input_tensor_b")):
        require_device(t, name, what)
        require_tile(t, name, what)
        require_dtype(t, FLOAT_DTYPES, name, what)
    same_device(name, a, b, bias)
    a_shape, b_shape = list(a.shape), list(b.shape)
    a_pad, b_pad = list(a.padded_shape), list(b.padded_shape)
    if len(a_shape) < 2 or len(b_shape) < 2:
        raise RuntimeError(f"{name}: inputs must have rank >= 2")
    if transpose_a:
        a_shape[-2:], a_pad[-2:] = a_shape[-2:][::-1], a_pad[-2:][::-1]
    if transpose_b:
        b_shape[-2:], b_pad[-2:] = b_shape[-2:][::-1], b_pad[-2:][::-1]
    if a_shape[-1] != b_shape[-2] or a_pad[-1] != b_pad[-2]:
        raise RuntimeError(f"{name}: K mismatch, a {a_shape} (padded {a_pad}) vs b {b_shape}"
                           f" (padded {b_pad})")
    a_batch, b_batch = a_shape[:-2], b_shape[:-2]
    if math.prod(b_batch) != 1 and [d for d in a_batch] != [d for d in b_batch]:
        raise RuntimeError(f"{name}: batched b {b_batch} must match a's batch {a_batch}")
    mt = math.prod(a_pad[:-2]) * a_pad[-2] // TILE_SIZE  # batch folded into M
    if math.prod(b_batch) != 1 or getattr(program_config, "fuse_batch", True) is False:
        mt = a_pad[-2] // TILE_SIZE  # batch looped: each program sees one batch's M
    kt, nt = a_pad[-1] // TILE_SIZE, b_pad[-1] // TILE_SIZE
    out_mem = memory_config or DRAM_MEMORY_CONFIG
    fp32_acc = bool(compute_kernel_config and compute_kernel_config.fp32_dest_acc_en)
    validate_matmul_program_config(program_config, a, b, out_mem, mt, kt, nt, fp32_acc)
    if getattr(program_config, "fused_activation", None) is not None:
        activation = program_config.fused_activation
    if bias is not None:
        require_tile(bias, name, "bias")
        if bias.shape[-1] != b_shape[-1]:
            raise RuntimeError(f"{name}: bias width {bias.shape[-1]} != N {b_shape[-1]}")
    outs = []
    b_vals = floats(b)
    bias_vals = floats(bias) if bias is not None else [None] * len(b_vals)
    for x, w, bv in zip(floats(a), b_vals, bias_vals):
        if transpose_a:
            x = x.transpose(-2, -1)
        if transpose_b:
            w = w.transpose(-2, -1)
        y = torch.matmul(x, w)  # [..., M, K] @ [..., K, N] -> [..., M, N], fp32
        if bv is not None:
            y = y + bv.reshape(-1, bv.shape[-1])[:1]  # [1, N] row broadcast over rows
        if activation is not None:
            y = apply_unary(y, activation)
        outs.append(y)
    batch = math.prod(a_pad[:-2])
    set_cost(flops=2 * batch * a_pad[-2] * a_pad[-1] * b_pad[-1])
    if dtype is None and optional_output_tensor is not None:
        dtype = optional_output_tensor.dtype  # round once, to the destination's dtype
    out = output(a, outs, dtype=dtype or a.dtype, memory_config=out_mem, op=name)
    return write_output(out, optional_output_tensor, name)


def _unsupported(name: str, **options) -> None:
    """Accept ttnn's keywords at their defaults; refuse values the emulator cannot honour."""
    for key, value in options.items():
        if value is not None and not (isinstance(value, (list, tuple)) and not value):
            raise NotImplementedError(f"ttnn_emu: {name}({key}=...) is not supported (the"
                                      " emulator has no prefetcher / in0 column offset)")


@op("matmul")
def matmul(input_tensor_a, input_tensor_b, *, transpose_a=False, transpose_b=False,
           memory_config=None, dtype=None, program_config=None, activation=None,
           compute_kernel_config=None, core_grid=None, output_tile=None,
           optional_output_tensor=None, global_cb=None, sub_device_id=None, prefetcher_pipes=()):
    """ttnn.matmul: a @ b (b broadcast when its batch dims are 1), then the fused activation."""
    _unsupported("matmul", prefetcher_pipes=prefetcher_pipes)
    return _matmul("matmul", input_tensor_a, input_tensor_b, None, transpose_a, transpose_b,
                   memory_config, dtype, program_config, activation, compute_kernel_config,
                   optional_output_tensor)


@op("linear")
def linear(input_tensor_a, input_tensor_b, *, bias=None, transpose_a=False, transpose_b=False,
           memory_config=None, dtype=None, program_config=None, activation=None,
           compute_kernel_config=None, core_grid=None, output_tile=None,
           optional_output_tensor=None, global_cb=None, sub_device_id=None, prefetcher_pipes=(),
           in0_column_offset=None):
    """ttnn.linear: a @ b + bias (a [1, N] row vector), then the fused activation."""
    _unsupported("linear", prefetcher_pipes=prefetcher_pipes,
                 in0_column_offset=in0_column_offset or None)  # an offset of 0 is the default
    return _matmul("linear", input_tensor_a, input_tensor_b, bias, transpose_a, transpose_b,
                   memory_config, dtype, program_config, activation, compute_kernel_config,
                   optional_output_tensor)
