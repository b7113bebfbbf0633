"""Split-K over programs with a deterministic sum: the pieces a kernel needs to split its K loop.

A tile's output is computed by `splits` programs, each over a range of K's 32-groups
(`split_groups`). Every program writes its float32 partial into a buffer [splits, M, N] (fresh
from the caching allocator per call, so CUDA-graph capture takes it from the graph's pool), then
increments its tile's counter (release, GPU scope, after a CTA barrier so that all of its
threads' writes come first). The program that finds the counter at splits - 1 is the last: it
reads the others' partials (acquire; loads bypass L1) and adds them in split order 0, 1, ...,
whichever program came last, so the result does not depend on the schedule; then it sets the
counter back to 0. The counters are the only state kept between calls: one zeroed int32 buffer
per device (`tile_counters`), which every launch leaves all zero. So launches that use them must
not overlap: one stream per device, as the engine runs (a PDL launch waits for its predecessor
before touching them), and the first call on a device must come before any CUDA-graph capture
(as the engine's warm-up does), where the buffer is allocated.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

COUNTERS = 1 << 16  # tiles one launch may have (a 16-row tile: N up to 1M)


def split_groups(groups: int, split_k: int) -> tuple[int, int]:
    """(32-groups per split, splits) for K of `groups` groups and at most `split_k` splits: a
    multiple of 4 groups per split (the kernel's step), so the last split may be shorter and
    fewer than `split_k` splits may remain."""
    if split_k < 1:
        raise ValueError(f"split_k must be >= 1, got {split_k}")
    per = 4 * -(-groups // (4 * split_k))
    return per, -(-groups // per)


@functools.cache
def _counters(device: torch.device) -> torch.Tensor:
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("split-K: the first call on a device must come before CUDA-graph "
                           "capture (its tile counters are allocated then)")
    return torch.zeros(COUNTERS, dtype=torch.int32, device=device)


def tile_counters(device: torch.device, tiles: int) -> torch.Tensor:
    """The device's tile counters (zero between launches) for a launch of `tiles` tiles."""
    if tiles > COUNTERS:
        raise ValueError(f"split-K: {tiles} tiles, more than the {COUNTERS} counters")
    return _counters(device)


@triton.jit
def split_sum(acc, p_ptr, cnt_ptr, offs, mask, tile, split, SPLITS: tl.constexpr,
              stride_split):
    """(the tile's sum over the splits in split order, where to store it: `mask` in the tile's
    last program, nothing elsewhere) from this program's partial `acc` (float32, any shape) of
    split `split`; offs / mask: acc's offsets and mask in one split's partial [M, N],
    stride_split = M * N. (Scalars enter masks as full tensors, zeros_like(offs) + s: the
    interpreter misreads a splat scalar comparison as a mask.)"""
    tl.store(p_ptr + split * stride_split + offs, acc, mask=mask)
    tl.debug_barrier()  # every thread's partial is written before the release below
    arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
    zero = tl.zeros_like(offs)
    total = tl.zeros_like(acc)
    if arrived == SPLITS - 1:
        for s in tl.static_range(SPLITS):
            p = tl.load(p_ptr + s * stride_split + offs, mask=mask & (zero + s != split),
                        other=0.0, cache_modifier=".cg")
            total += tl.where(zero + s == split, acc, p)
        tl.store(cnt_ptr + tile, 0)
    return total, mask & (zero + arrived == SPLITS - 1)
