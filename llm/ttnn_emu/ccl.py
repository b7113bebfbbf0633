"""Collectives over the virtual mesh (reference 6). Sums are fp32, rounded to the dtype."""

from __future__ import annotations

import math

import torch

from .accounting import op, set_cost
from .opsupport import floats, normalize_dim, output, require_device, write_output
from .types import FLOAT_DTYPES, Layout


def collective_groups(mesh_shape, cluster_axis) -> list[list[int]]:
    """Device-index groups: all devices, or the devices along one mesh axis, in coordinate order.

    Axis 0 groups a mesh column (row index varies); axis 1 groups a mesh row.
    """
    rows, cols = mesh_shape
    if cluster_axis is None:
        return [list(range(rows * cols))]
    if cluster_axis == 0:
        return [[r * cols + c for r in range(rows)] for c in range(cols)]
    if cluster_axis == 1:
        return [[r * cols + c for c in range(cols)] for r in range(rows)]
    raise RuntimeError(f"cluster_axis must be None, 0 or 1, got {cluster_axis}")


def _values(t):
    if t.dtype in FLOAT_DTYPES:
        return floats(t)
    return list(t.logical_shards())


@op("all_gather")
def all_gather(input_tensor, dim, *, cluster_axis=None, memory_config=None, output_tensor=None,
               subdevice_id=None, sub_core_grids=None, num_links=None, topology=None,
               chunks_per_sync=None, num_workers_per_link=None, num_buffers_per_channel=None,
               use_l1_small_for_semaphores=False):
    """ttnn.all_gather: each device ends with cat(shards of its group, dim)."""
    require_device(input_tensor, "all_gather")
    mesh = input_tensor.device()
    dim = normalize_dim(dim, len(input_tensor.shape))
    vals = _values(input_tensor)
    outs = [None] * len(vals)
    for group in collective_groups(mesh.shape, cluster_axis):
        gathered = torch.cat([vals[i] for i in group], dim=dim)
        for i in group:
            outs[i] = gathered
    nbytes = input_tensor.shard_nbytes()
    gsize = len(collective_groups(mesh.shape, cluster_axis)[0])
    set_cost(dram_bytes=nbytes * (1 + gsize))
    out = output(input_tensor, outs, memory_config=memory_config, op="all_gather")
    return write_output(out, output_tensor, "all_gather")


@op("reduce_scatter")
def reduce_scatter(input_tensor, dim, *, cluster_axis=None, subdevice_id=None,
                   memory_config=None, intermediate_memory_config=None, output_tensor=None,
                   num_links=None, topology=None, chunks_per_sync=None, num_workers_per_link=None,
                   num_buffers_per_channel=None, compute_kernel_config=None,
                   use_l1_small_for_semaphores=False):
    """ttnn.reduce_scatter: device k of a group gets chunk k of the group's sum along dim."""
    require_device(input_tensor, "reduce_scatter")
    if input_tensor.dtype not in FLOAT_DTYPES:
        raise RuntimeError("reduce_scatter: supports bf16, bf8_b, bf4_b and fp32 only")
    mesh = input_tensor.device()
    rank = len(input_tensor.shape)
    dim = normalize_dim(dim, rank)
    groups = collective_groups(mesh.shape, cluster_axis)
    n = len(groups[0])
    unit = n * 32 if input_tensor.layout == Layout.TILE and dim >= rank - 2 else n
    if input_tensor.shape[dim] % unit:
        raise RuntimeError(f"reduce_scatter: dim {dim} of size {input_tensor.shape[dim]} must be"
                           f" divisible by {unit}")
    vals = _values(input_tensor)
    outs = [None] * len(vals)
    for group in groups:
        total = torch.stack([vals[i] for i in group]).sum(0)
        for k, i in enumerate(group):
            outs[i] = torch.chunk(total, n, dim=dim)[k]
    set_cost(flops=(n - 1) * math.prod(input_tensor.padded_shape),
             dram_bytes=2 * input_tensor.shard_nbytes())
    out = output(input_tensor, outs, memory_config=memory_config, op="reduce_scatter")
    return write_output(out, output_tensor, "reduce_scatter")


@op("all_reduce")
def all_reduce(input_tensor, *, cluster_axis=None, subdevice_id=None, memory_config=None,
               num_links=None, topology=None):
    """ttnn.all_reduce: every device of a group gets the group's sum."""
    require_device(input_tensor, "all_reduce")
    if input_tensor.dtype not in FLOAT_DTYPES:
        raise RuntimeError("all_reduce: supports float dtypes only")
    mesh = input_tensor.device()
    vals = _values(input_tensor)
    outs = [None] * len(vals)
    groups = collective_groups(mesh.shape, cluster_axis)
    for group in groups:
        total = torch.stack([vals[i] for i in group]).sum(0)
        for i in group:
            outs[i] = total
    n = len(groups[0])
    set_cost(flops=(n - 1) * math.prod(input_tensor.padded_shape),
             dram_bytes=2 * input_tensor.shard_nbytes())
    return output(input_tensor, outs, memory_config=memory_config, op="all_reduce")


@op("mesh_partition")
def mesh_partition(input_tensor, dim, cluster_axis=None, *, memory_config=None):
    """ttnn.mesh_partition: keep this device's chunk (by position in its group) along dim."""
    require_device(input_tensor, "mesh_partition")
    mesh = input_tensor.device()
    dim = normalize_dim(dim, len(input_tensor.shape))
    vals = _values(input_tensor)
    outs = [None] * len(vals)
    for group in collective_groups(mesh.shape, cluster_axis):
        if input_tensor.shape[dim] % len(group):
            raise RuntimeError("mesh_partition: dim not divisible by the group size")
        for k, i in enumerate(group):
            outs[i] = torch.chunk(vals[i], len(group), dim=dim)[k]
    return output(input_tensor, outs, memory_config=memory_config, op="mesh_partition")
