"""Token selection on device: argmax, topk, sampling, plus_one, manual_seed (reference 7, 3)."""

from __future__ import annotations

import math

import torch

from .accounting import op, set_cost
from .memory import DRAM_MEMORY_CONFIG
from .opsupport import floats, output, require_device, require_dtype, write_output
from .types import TILE_SIZE, DataType, Layout


@op("argmax")
def argmax(input_tensor, dim=None, keepdim=False, *, sub_core_grids=None, memory_config=None,
           output_tensor=None, enable_secondary_dm=None):
    """torch.argmax semantics (first index on ties); UINT32 ROW_MAJOR interleaved output."""
    name = "argmax"
    require_device(input_tensor, name)
    if input_tensor.is_sharded():
        raise RuntimeError(f"{name}: input must be interleaved")
    if input_tensor.layout == Layout.TILE:
        require_dtype(input_tensor, (DataType.BFLOAT16, DataType.FLOAT32), name)
    outs = []
    for x in floats(input_tensor):
        if dim is None:
            outs.append(torch.argmax(x))
        else:
            outs.append(torch.argmax(x, dim=dim, keepdim=keepdim))
    set_cost(flops=math.prod(input_tensor.shape))
    out = output(input_tensor, outs, dtype=DataType.UINT32, layout=Layout.ROW_MAJOR,
                 memory_config=memory_config or DRAM_MEMORY_CONFIG, op=name)
    return write_output(out, output_tensor, name, match_dtype=True)


@op("topk")
def topk(input_tensor, k=32, dim=-1, largest=True, sorted=True, *, memory_config=None,  # noqa: A002
         sub_core_grids=None, indices_tensor=None, output_tensor=None, stable=False):
    """[values, indices] of torch.topk; indices UINT16, or UINT32 for fp32 input or a reduced
    dim > 65536; `indices_tensor` supplies labels returned instead of positions."""
    name = "topk"
    require_device(input_tensor, name)
    if input_tensor.layout != Layout.TILE:
        raise RuntimeError(f"{name}: input must be TILE")
    require_dtype(input_tensor, (DataType.BFLOAT8_B, DataType.BFLOAT16, DataType.FLOAT32), name)
    rows = math.prod(input_tensor.shape[:-1])
    if rows % TILE_SIZE:
        raise RuntimeError(f"{name}: N*C*H ({rows}) must be a multiple of 32")
    if not 1 <= k <= input_tensor.shape[dim]:
        raise RuntimeError(f"{name}: k must be in [1, {input_tensor.shape[dim]}]")
    wide = input_tensor.padded_shape[dim] > 65536 or input_tensor.dtype == DataType.FLOAT32
    idx_dtype = DataType.UINT32 if wide else DataType.UINT16
    labels = indices_tensor.logical_shards() if indices_tensor is not None else None
    vals, idxs = [], []
    for i, x in enumerate(floats(input_tensor)):
        v, ix = torch.topk(x, k, dim=dim, largest=largest, sorted=sorted)
        if labels is not None:
            ix = torch.gather(labels[i].to(torch.int64).expand_as(x), dim, ix)
        vals.append(v)
        idxs.append(ix)
    set_cost(flops=math.prod(input_tensor.shape) * max(1, int(math.log2(max(k, 2)))))
    mem = memory_config or DRAM_MEMORY_CONFIG
    return [
        output(input_tensor, vals, memory_config=mem, op=name),
        output(input_tensor, idxs, dtype=idx_dtype, memory_config=mem, op=name),
    ]


def _device_generator(device) -> torch.Generator:
    gen = getattr(device, "_rng", None)
    if gen is None:
        gen = torch.Generator().manual_seed(0)
        device._rng = gen
    return gen


def manual_seed(seeds, *, device=None, user_ids=None, sub_core_grids=None):
    """ttnn.manual_seed: seed the device sampling RNG (the emulator keeps one stream)."""
    seed = seeds if isinstance(seeds, int) else int(seeds.logical_shards()[0].reshape(-1)[0])
    if device is None:
        raise RuntimeError("manual_seed: device is required")
    device._rng = torch.Generator().manual_seed(seed)


@op("sampling")
def sampling(input_values_tensor, input_indices_tensor, k, p, temp, *, seed=None,
             sub_core_grids=None, output_tensor=None):
    """Per user u: softmax(values[u] * temp[u]), keep the top k[u], then the smallest prefix whose
    cumulative probability reaches p[u]; draw one index with the device RNG; return indices[u]
    of the draw. Output [1, 1, 1, U] uint32."""
    name = "sampling"
    vals_t, idx_t = input_values_tensor, input_indices_tensor
    for t, n in ((vals_t, "values"), (idx_t, "indices"), (k, "k"), (p, "p"), (temp, "temp")):
        require_device(t, name, n)
    if vals_t.dtype != DataType.BFLOAT16 or vals_t.layout != Layout.TILE:
        raise RuntimeError(f"{name}: values must be BFLOAT16 TILE")
    if idx_t.dtype not in (DataType.INT32, DataType.UINT32) or idx_t.layout != Layout.ROW_MAJOR:
        raise RuntimeError(f"{name}: indices must be int32/uint32 ROW_MAJOR")
    one, one2, users, width = vals_t.shape
    if (one, one2) != (1, 1) or users > TILE_SIZE or tuple(idx_t.shape) != tuple(vals_t.shape):
        raise RuntimeError(f"{name}: values/indices must be [1, 1, U<=32, W] and equal")
    if width % TILE_SIZE or (width // TILE_SIZE) & (width // TILE_SIZE - 1):
        raise RuntimeError(f"{name}: W must be 32 * 2^n, got {width}")
    if k.dtype not in (DataType.INT32, DataType.UINT32):
        raise RuntimeError(f"{name}: k must be int32/uint32")
    if p.dtype != DataType.BFLOAT16 or temp.dtype != DataType.BFLOAT16:
        raise RuntimeError(f"{name}: p and temp must be BFLOAT16")
    ks = k.logical_shards()[0].reshape(-1).tolist()
    ps = floats(p)[0].reshape(-1).tolist()
    ts = floats(temp)[0].reshape(-1).tolist()
    if not (len(ks) == len(ps) == len(ts) == users):
        raise RuntimeError(f"{name}: k, p, temp must have {users} entries")
    if any(not 1 <= kk <= 32 for kk in ks) or any(not 0 <= pp <= 1 for pp in ps):
        raise RuntimeError(f"{name}: need 1 <= k <= 32 and 0 <= p <= 1")
    gen = torch.Generator().manual_seed(seed) if seed is not None else _device_generator(
        vals_t.device())
    outs = []
    for vals, idx in zip(floats(vals_t), idx_t.logical_shards()):
        chosen = torch.zeros(1, 1, 1, users, dtype=torch.int64)
        for u in range(users):
            probs = torch.softmax(vals[0, 0, u] * ts[u], dim=-1)
            top_p, top_i = torch.topk(probs, ks[u])
            cum = torch.cumsum(top_p, 0)
            keep = (cum - top_p) < ps[u]  # smallest prefix reaching p (at least one token)
            keep[0] = True
            kept = top_p * keep
            draw = torch.multinomial(kept / kept.sum(), 1, generator=gen)
            chosen[0, 0, 0, u] = idx[0, 0, u, top_i[draw]].to(torch.int64)
        outs.append(chosen)
    set_cost(flops=5 * users * width)
    out = output(vals_t, outs, dtype=DataType.UINT32, layout=Layout.ROW_MAJOR,
                 memory_config=DRAM_MEMORY_CONFIG, op=name)
    return write_output(out, output_tensor, name)


@op("plus_one")
def plus_one(input_tensor, sub_core_grids=None, skip_negative_entries=False):
    """Increment an int32/uint32 device tensor in place (negative entries kept if asked)."""
    input = input_tensor  # noqa: A001 (ttnn 0.81.1 names the argument `input_tensor`)
    require_device(input, "plus_one")
    require_dtype(input, (DataType.INT32, DataType.UINT32), "plus_one")
    for store in input.mutable_shards():
        inc = torch.ones_like(store)
        if skip_negative_entries:
            inc = torch.where(store < 0, torch.zeros_like(store), inc)
        store.add_(inc)
    set_cost(flops=math.prod(input.shape))
    return input
