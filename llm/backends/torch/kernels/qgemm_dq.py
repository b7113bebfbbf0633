"""Batches of 2..16 rows on Q4_0 weights dequantized to bf16 in registers, one tensor-core dot
chain over K (an exploration: bench/qgemm_explore.py; not picked by `qgemv`).

A step's 32-groups are dequantized exactly as `QuantizedTensor.dequantize(float32).to(bf16)`
((q - 8) * d in float32, exact, then one rounding to nearest even), the values the prefill path
(kernels/dequant.py) hands to cuBLAS, and multiplied into one float32 accumulator: the same
function as the prefill path, up to accumulation order.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from llm.backends.torch.kernels.splitk import split_groups, split_sum, tile_counters
from llm.model.quant.tensor import QuantizedTensor


@triton.jit
def _bf16_rne(v):
    """float32 v rounded to bfloat16 (to nearest, ties to even), as float32."""
    bits = v.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _dq_kernel(x_ptr, y_ptr, qs_ptr, d_ptr, p_ptr, cnt_ptr, M, N, stride_x, stride_y, s_qs, s_d,
               K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               GROUPS: tl.constexpr, STAGES: tl.constexpr, SPLITS: tl.constexpr,
               SPLIT_G: tl.constexpr, TILED: tl.constexpr, SCALE: tl.constexpr,
               COMPILED: tl.constexpr):
    """y[:, tile] for up to BLOCK_M rows of x: per step GROUPS 32-groups of the tile's rows
    dequantized to bf16 ((q - 8) * d exact in float32, one rounding) and multiplied on the
    tensor cores into one float32 accumulator (no per-group scaling after the dot)."""
    NG: tl.constexpr = K // 32
    pid = tl.program_id(0)
    if SPLITS == 1:
        g_lo = 0
        g_hi = NG
    else:
        g_lo = tl.program_id(1) * SPLIT_G
        g_hi = tl.minimum(g_lo + SPLIT_G, NG)
    ns = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_live = ns < N
    rows = ns[:, None]  # [BLOCK_N, 1]
    jb = tl.arange(0, GROUPS * 16)  # a step's bytes of one row: group jb // 16, byte jb % 16
    kl = 32 * (jb // 16) + jb % 16  # the column of byte jb's low nibble, from the step's first
    gi = tl.arange(0, GROUPS)
    ms = tl.arange(0, BLOCK_M)
    xmask = (ms < M)[None, :]
    x_lo = x_ptr + ms[None, :] * stride_x + kl[:, None]  # [GROUPS * 16, BLOCK_M]
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    for g0 in tl.range(g_lo, g_hi, GROUPS, num_stages=STAGES):
        if TILED:  # step s of tile t: one block [BLOCK_N, GROUPS * 16] (scales [BLOCK_N, GROUPS])
            blk = pid * (NG // GROUPS) + g0 // GROUPS
            b = tl.load(qs_ptr + blk * (BLOCK_N * GROUPS * 16) + tl.arange(0, BLOCK_N)[:, None]
                        * (GROUPS * 16) + jb[None, :])
            d_at = d_ptr + blk * (BLOCK_N * GROUPS) + tl.arange(0, BLOCK_N)[:, None] * GROUPS
            if SCALE == 1:  # each weight's scale loaded in the weights' layout
                d = tl.load(d_at + (jb // 16)[None, :])
            else:
                d = tl.load(d_at + gi[None, :])
        else:
            b = tl.load(qs_ptr + rows * s_qs + 16 * g0 + jb[None, :], mask=n_live[:, None],
                        other=0)
            if SCALE == 1:
                d = tl.load(d_ptr + rows * s_d + g0 + (jb // 16)[None, :], mask=n_live[:, None],
                            other=0.0)
            else:
                d = tl.load(d_ptr + rows * s_d + g0 + gi[None, :], mask=n_live[:, None],
                            other=0.0)
        bi = b.to(tl.int32)
        lo = ((bi & 15) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0  # q - 8, exact
        hi = ((bi >> 4) | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0
        if SCALE == 0:  # [BLOCK_N, GROUPS] broadcast over each group's columns
            d3 = tl.reshape(d.to(tl.float32), [BLOCK_N, GROUPS, 1])
            wlo = tl.reshape(tl.reshape(lo, [BLOCK_N, GROUPS, 16]) * d3, [BLOCK_N, GROUPS * 16])
            whi = tl.reshape(tl.reshape(hi, [BLOCK_N, GROUPS, 16]) * d3, [BLOCK_N, GROUPS * 16])
        elif SCALE == 1:
            wlo = lo * d.to(tl.float32)
            whi = hi * d.to(tl.float32)
        else:  # a diagnostic: no scales at all (wrong results; what the scaling costs)
            wlo = lo + 0.0 * d.to(tl.float32).sum()
            whi = hi
        xl = tl.load(x_lo + 32 * g0, mask=xmask, other=0.0)
        xh = tl.load(x_lo + 32 * g0 + 16, mask=xmask, other=0.0)
        if COMPILED:
            acc = tl.dot(wlo.to(tl.bfloat16), xl, acc)
            acc = tl.dot(whi.to(tl.bfloat16), xh, acc)
        else:  # the interpreter's tl.dot misreads bfloat16 and its casts truncate: float32
            acc = tl.dot(_bf16_rne(wlo), xl.to(tl.float32), acc)
            acc = tl.dot(_bf16_rne(whi), xh.to(tl.float32), acc)
    live = xmask & n_live[:, None]
    if SPLITS == 1:
        out = acc
    else:
        out, live = split_sum(acc, p_ptr, cnt_ptr, ms[None, :] * N + rows, live, pid,
                              tl.program_id(1), SPLITS, M * N)
    tl.store(y_ptr + ms[None, :] * stride_y + rows, out.to(y_ptr.dtype.element_ty), mask=live)


def tiled(w: QuantizedTensor, block_n: int, groups: int) -> dict[str, torch.Tensor]:
    """Q4_0 planes repacked for TILED: [tiles, steps, BLOCK_N, GROUPS * 16] codes and [tiles,
    steps, BLOCK_N, GROUPS] scales, each step of a tile one contiguous block."""
    n, k = w.shape
    ng = k // 32
    qs = w.planes["qs"].reshape(n // block_n, block_n, ng // groups, groups * 16)
    d = w.planes["d"].reshape(n // block_n, block_n, ng // groups, groups)
    return {"qs": qs.transpose(1, 2).contiguous(), "d": d.transpose(1, 2).contiguous()}


def dq(x: torch.Tensor, w: QuantizedTensor, spec: list[str],
       packed: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """x [M, K] bf16 @ bf16(dequantize(w)).T by `_dq_kernel` (spec: the variant's fields)."""
    block_n, groups, warps, stages = (int(v) for v in spec[:4])
    flags = spec[4:]
    scale = 1 if "b" in flags else 2 if "n" in flags else 0
    split_k = next((int(f[1:]) for f in flags if f.startswith("s")), 1)
    m, k = x.shape
    n = w.out_features
    ng = k // 32
    if n % block_n or ng % groups:
        raise ValueError(f"dq: {n}x{k} does not divide into {block_n} rows x {groups} groups")
    split_g, splits = split_groups(ng, split_k)
    if split_g % groups:
        raise ValueError(f"dq: a split of {split_g} groups is not whole steps of {groups}")
    qs, d = (packed["qs"], packed["d"]) if packed else (w.planes["qs"], w.planes["d"])
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    tiles = n // block_n
    if splits > 1:
        partials = torch.empty(splits, m, n, dtype=torch.float32, device=x.device)
        counters = tile_counters(x.device, tiles)
    else:
        partials = counters = y
    _dq_kernel[(tiles, splits)](
        x, y, qs, d, partials, counters, m, n, x.stride(0), y.stride(0), k // 2, ng, K=k,
        BLOCK_M=max(16, triton.next_power_of_2(m)), BLOCK_N=block_n, GROUPS=groups,
        STAGES=stages, SPLITS=splits, SPLIT_G=split_g, TILED=packed is not None, SCALE=scale,
        COMPILED=not os.environ.get("TRITON_INTERPRET"), num_warps=warps, num_stages=stages)
    return y
