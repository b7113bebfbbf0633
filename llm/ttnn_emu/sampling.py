"""Token selection on device: argmax, topk, sampling, plus_one, manual_seed (reference 7, 3).

The sampling PRNG is per (chip, core), as on hardware: `sampling` draws user u on core u, and
`manual_seed` seeds all cores, one core, or the cores of a tensor of user ids."""

from __future__ import annotations

import math

import torch

from .accounting import op, set_cost
from .memory import DRAM_MEMORY_CONFIG, CoreRangeSet
from .opsupport import floats, output, require_device, require_dtype, write_output
from .tensor import Tensor
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


def _core_generators(device) -> dict:
    """The device's sampling PRNGs: one per (chip, core), as hardware has one per core; a core
    never seeded starts from seed 0."""
    gens = getattr(device, "_core_rngs", None)
    if gens is None:
        gens = device._core_rngs = {}
    return gens


def _core_generator(device, chip: int, core: int) -> torch.Generator:
    gens = _core_generators(device)
    if (chip, core) not in gens:
        gens[(chip, core)] = torch.Generator().manual_seed(0)
    return gens[(chip, core)]


def _uint32s(t, name: str, what: str) -> list[list[int]]:
    """Per chip, the values of a UINT32 ROW_MAJOR device tensor."""
    require_device(t, name, what)
    if t.dtype != DataType.UINT32 or t.layout != Layout.ROW_MAJOR:
        raise RuntimeError(f"{name}: {what} must be UINT32 ROW_MAJOR")
    return [s.reshape(-1).to(torch.int64).tolist() for s in t.logical_shards()]


_SKIP_SEED = 0xFFFFFFFF  # ttnn: a seed of UINT32_MAX leaves the PRNG state unchanged


def _cores_of(sub_core_grids, users: int, name: str) -> None:
    """Raise unless `sub_core_grids` (if given) is a CoreRangeSet of at least `users` cores."""
    if sub_core_grids is None:
        return
    if not isinstance(sub_core_grids, CoreRangeSet):
        raise TypeError(f"{name}: sub_core_grids must be a CoreRangeSet")
    if sub_core_grids.num_cores() < users:
        raise RuntimeError(f"{name}: sub_core_grids has {sub_core_grids.num_cores()} cores, "
                           f"{users} needed")


@op("manual_seed")
def manual_seed(seeds=None, *, device=None, user_ids=None, sub_core_grids=None):
    """ttnn.manual_seed: seed the sampling PRNGs, per chip. An int seed goes to every core of
    `device` (user_ids None), to one core (an int user id, 0..31) or to the cores of a UINT32
    user_ids tensor; a UINT32 seeds tensor needs a user_ids tensor of the same length, seed i
    going to core user_ids[i] (user u's draws in `sampling` run on core u). A seed of
    UINT32_MAX leaves that core's PRNG as it is."""
    name = "manual_seed"
    if isinstance(user_ids, int) and not 0 <= user_ids < TILE_SIZE:
        raise RuntimeError(f"{name}: user id {user_ids} outside 0..31")
    if isinstance(seeds, int):
        if isinstance(user_ids, Tensor):
            users = _uint32s(user_ids, name, "user_ids")
            dev, per_chip = user_ids.device(), [[seeds] * len(u) for u in users]
        else:
            if device is None:
                raise RuntimeError(f"{name}: device is required with an int seed")
            cores = list(range(TILE_SIZE)) if user_ids is None else [user_ids]
            dev, users = device, [cores] * device.get_num_devices()
            per_chip = [[seeds] * len(cores)] * len(users)
    else:
        if not isinstance(user_ids, Tensor):
            raise RuntimeError(f"{name}: a seeds tensor needs a user_ids tensor")
        per_chip, users = _uint32s(seeds, name, "seeds"), _uint32s(user_ids, name, "user_ids")
        dev = seeds.device()
    gens = _core_generators(dev)
    for chip, (ss, us) in enumerate(zip(per_chip, users)):
        if len(ss) != len(us):
            raise RuntimeError(f"{name}: {len(ss)} seeds for {len(us)} user ids")
        for seed, user in zip(ss, us):
            if not 0 <= user < TILE_SIZE:
                raise RuntimeError(f"{name}: user id {user} outside 0..31")
            _cores_of(sub_core_grids, user + 1, name)
            if seed != _SKIP_SEED:
                gens[(chip, user)] = torch.Generator().manual_seed(seed)
    return None


@op("sampling")
def sampling(input_values_tensor, input_indices_tensor, k, p, temp, *, seed=None,
             sub_core_grids=None, output_tensor=None):
    """Per user u: softmax(values[u] * temp[u]), keep the top k[u], then the smallest prefix whose
    cumulative probability reaches p[u]; draw one index with the PRNG of user u's core (seeded
    by `seed` for this call, else as `manual_seed` left it); return indices[u] of the draw.
    Output [1, 1, 1, U] uint32."""
    name = "sampling"
    vals_t, idx_t = input_values_tensor, input_indices_tensor
    for t, n in ((vals_t, "values"), (idx_t, "indices"), (k, "k"), (p, "p"), (temp, "temp")):
        require_device(t, name, n)
    if vals_t.dtype != DataType.BFLOAT16 or vals_t.layout != Layout.TILE:
        raise RuntimeError(f"{name}: values must be BFLOAT16 TILE")
    if idx_t.dtype not in (DataType.INT32, DataType.UINT32) or idx_t.layout != Layout.ROW_MAJOR:
        raise RuntimeError(f"{name}: indices must be int32/uint32 ROW_MAJOR")
    one, one2, users, width = vals_t.shape
    _cores_of(sub_core_grids, users, name)
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
    outs = []
    for chip, (vals, idx) in enumerate(zip(floats(vals_t), idx_t.logical_shards())):
        chosen = torch.zeros(1, 1, 1, users, dtype=torch.int64)
        for u in range(users):
            gen = torch.Generator().manual_seed(seed) if seed is not None else \
                _core_generator(vals_t.device(), chip, u)
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
