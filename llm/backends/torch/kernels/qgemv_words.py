"""The v2 quantized GEMV: whole 32-groups per thread, for 1..4 rows of bf16 / fp16 x.

Each thread owns whole halves of 32-groups of several rows of w, so x is converted once per thread
and the group scale is applied once per group sum (8B gate_up Q4_0 23 us = 69% of the copy
bandwidth, Q8_0 89%, on an H200; docs/performance.md). Several rows of x share each decoded code
(one accumulator a row): at 2 rows 8B Q4_0 gate_up 49 us, against 54 for the tensor-core kernel.
`qgemv` (kernels/qgemv.py) picks it up to `qgemv_config.words_rows_max` rows.

Q6_K (the LM head / tied embedding of llama.cpp's Q4_0 and Q4_K_M files): the 4-bit words of
`qs` with the two high bits of each code from the 2-bit `qh` plane OR-ed in (one 32-bit `qh` word
covers 4 columns of both 16-column halves of a group), a sum per 16-column half, each scaled by
its (d * scale) as ggml dequantizes: sum x * w = (f(d) * f(sc_lo)) * sum x (q - 32) + (f(d) *
f(sc_hi)) * sum x (q - 32) over the other half.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton

from llm.backends.torch.kernels.pdl import launch_options, use_pdl
from llm.backends.torch.kernels.qgemv_common import DEFAULT_PLANES, INT4, PLANES, family
from llm.backends.torch.kernels.qgemv_config import QGemvWConfig, qgemv_w_config
from llm.backends.torch.kernels.qgemv_words_kernel import _qgemv_w_kernel
from llm.model.quant.tensor import QuantizedTensor

# Formats of the v2 kernel (FMT ids: `family`): codes read as 32-bit words, x as 64-bit words.
_WORD_FAMILIES = {0, 1, 2, 3, 4, 5, 6, 7, 8, INT4}
WORDS_MAX_M = 4  # rows of x one launch takes (an accumulator each)


def words_kernel_runs(x: torch.Tensor, w: QuantizedTensor) -> bool:
    """Whether `qgemv` takes the v2 kernel (`_qgemv_w_kernel`) for x and w: bf16 / fp16
    activations, a format it implements (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K,
    int4), whole 32-groups."""
    if x.dtype not in (torch.bfloat16, torch.float16) or w.in_features % 32:
        return False
    fmt, gs = family(w.format)
    return fmt in _WORD_FAMILIES and gs % 32 == 0


def _words(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A 2-D tensor with contiguous rows reinterpreted as `dtype` words along dim 1."""
    if t.stride(1) != 1 or (t.stride(0) * t.element_size()) % dtype.itemsize \
            or (t.storage_offset() * t.element_size()) % dtype.itemsize:
        t = t.clone(memory_format=torch.contiguous_format)  # a fresh, aligned copy
    return t.view(dtype)


@dataclass(frozen=True)
class RopeTarget:
    """Where `qgemv_words(rope=...)` puts one token's fused QKV projection: RoPE tables rows cos,
    sin [1, hd]; the token's page and slot blocks, offsets [1] (int64); the layer's pools
    [num_blocks, n_kv, block, hd]; n_heads query heads (q [1, n_heads * hd] is the result).
    row0: the fused QKV's row that the weight's first row is, where the weight is a block of
    whole heads of it (a QKV whose q/k and v are stored in different formats runs one launch a
    block, `weight.RowBlocks`); q: the q tensor the launches write their query columns into
    (None: a new one)."""

    cos: torch.Tensor
    sin: torch.Tensor
    blocks: torch.Tensor
    offsets: torch.Tensor
    k_pool: torch.Tensor
    v_pool: torch.Tensor
    n_heads: int
    row0: int = 0
    q: torch.Tensor | None = None


@dataclass(frozen=True)
class AddNorm:
    """The residual add and RMSNorm that follow a projection, for `qgemv_words(norm=...)`:
    residual [M, N] (contiguous rows), the norm's weight [N] and eps; arrivals: an int32 zero
    on the device (the programs' counter), left zero by every launch (one per launch site:
    launches that could run at once must not share it)."""

    residual: torch.Tensor
    weight: torch.Tensor
    eps: float
    arrivals: torch.Tensor


def _norm_args(y: torch.Tensor, norm: AddNorm) -> tuple[tuple, torch.Tensor, torch.Tensor]:
    """The kernel's NORM arguments for y [M, N] and where they go: (args, normed, total)."""
    res, arr = norm.residual, norm.arrivals
    if (res.shape != y.shape or res.dtype != y.dtype or res.stride(1) != 1
            or norm.weight.shape != (y.shape[1],) or arr.dtype != torch.int32
            or arr.numel() < 1 or arr.device != y.device):
        raise ValueError(f"qgemv_words(norm=...) needs a residual like y {tuple(y.shape)} "
                         f"{y.dtype} with unit column stride, a weight [{y.shape[1]}] and an "
                         f"int32 counter on {y.device}; got residual "
                         f"{tuple(res.shape)} {res.dtype}, weight {tuple(norm.weight.shape)}, "
                         f"counters {arr.dtype} [{arr.numel()}] on {arr.device}")
    out, total = torch.empty_like(y), torch.empty_like(y)
    args = (res, norm.weight, out, total, arr, norm.eps, res.stride(0), out.stride(0),
            total.stride(0))
    return args, out, total


def qgemv_words(x: torch.Tensor, w: QuantizedTensor, bias: torch.Tensor | None = None,
                config: QGemvWConfig | None = None, pdl: bool | None = None,
                glu: bool = False, rope: RopeTarget | None = None, norm: AddNorm | None = None,
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`qgemv` of up to WORDS_MAX_M rows of x in one launch of the v2 kernel (see
    `words_kernel_runs`; more rows: one launch per WORDS_MAX_M), the codes decoded once for all
    rows. glu: w is a fused [2I, K] gate/up weight
    (gate rows first) and the result silu(gate) * up [M, I], rounded as `silu_mul` of the
    unfused product. rope (one row): w is a fused QKV weight [(nh + 2 n_kv) hd, K] (or the
    block of its whole heads at rope.row0); q and k
    rotated as kernels/rope_kv.py `rope_and_cache` does (bit-equal), K and V written into the
    pools, and the result is q [1, nh * hd]. norm: the residual add and RMSNorm after the
    projection in the same launch (`AddNorm`; not with glu / rope, at most WORDS_MAX_M rows):
    the result is (rms_norm(y + residual) * weight, y + residual), as kernels/norm.py
    `add_rms_norm` of y computes them (the same bits at the norm kernel's 4 warps, which every
    config of `qgemv_w_config` has: the statistic's sum follows the launch's thread layout)."""
    m = x.shape[0]
    if rope is not None and m != 1:
        raise ValueError(f"qgemv_words(rope=...) takes one token, got {m}")
    if norm is not None and (glu or rope is not None or m > WORDS_MAX_M):
        raise ValueError(f"qgemv_words(norm=...) takes at most {WORDS_MAX_M} rows and neither "
                         f"glu nor rope; got {m} rows, glu {glu}, rope {rope is not None}")
    if m > WORDS_MAX_M:
        return torch.cat([qgemv_words(r, w, bias, config, pdl, glu)
                          for r in x.split(WORDS_MAX_M)])
    fmt, gs = family(w.format)
    k = x.shape[1]
    n = w.out_features // 2 if glu else w.out_features  # columns of y
    if glu and w.out_features % 2:
        raise ValueError(f"a gate/up weight has an even number of rows, got {w.out_features}")
    xw = _words(x, torch.int64)
    names = PLANES.get(w.format, DEFAULT_PLANES)
    planes = [w.planes[p] if p in w.planes else None for p in names]
    qw = _words(planes[0], torch.int32)
    if planes[1] is None:
        qh = qw  # not read
    elif fmt == 7:
        qh = _words(planes[1], torch.int32)  # Q6_K: 32-bit words of its 2-bit plane
    else:
        qh = planes[1] if planes[1].stride(1) == 1 else planes[1].contiguous()  # Q5: bytes
    rest = [x if p is None else (p if p.stride(1) == 1 else p.contiguous()) for p in planes[2:]]
    cfg = config or qgemv_w_config(m, w.out_features, k, w.format)
    if glu and cfg.block_n % 2:
        raise ValueError(f"glu needs an even block_n, got {cfg.block_n}")
    if cfg.tiles > 1 and k > 32 * cfg.block_g:
        raise ValueError(f"a config of {cfg.tiles} row tiles a program needs K in one chunk of "
                         f"block_g 32-groups: K {k} > 32 * {cfg.block_g}")
    heads, rope_args = (0, 0, 2), (x,) * 6 + (0, 0, 0)  # unused without rope
    if rope is not None:
        _, n_kv, _, hd = rope.k_pool.shape
        rows = (rope.n_heads + 2 * n_kv) * hd
        if (glu or cfg.block_n % 2 or hd % 2 or rope.row0 % hd or w.out_features % hd
                or not 0 <= rope.row0 < rope.row0 + w.out_features <= rows):
            raise ValueError(f"qgemv_words(rope=...) needs a QKV weight of (nh + 2 n_kv) * hd = "
                             f"({rope.n_heads} + 2 * {n_kv}) * {hd} rows, or a block of whole "
                             f"heads of it, got {w.out_features} rows at row {rope.row0} "
                             f"(block_n {cfg.block_n}, glu {glu})")
        if rope.v_pool.stride() != rope.k_pool.stride():
            raise ValueError("qgemv_words(rope=...) needs K and V pools of one layout")
        heads = (rope.n_heads, n_kv, hd)
        rope_args = (rope.cos, rope.sin, rope.blocks, rope.offsets, rope.k_pool, rope.v_pool,
                     *rope.k_pool.stride()[:3])
        n = rope.n_heads * hd  # columns of y: q
        if rope.q is not None and (rope.q.shape != (1, n) or rope.q.dtype != x.dtype
                                   or not rope.q.is_contiguous()):
            raise ValueError(f"qgemv_words(rope=...): q must be a contiguous [1, {n}] "
                             f"{x.dtype} tensor, got {tuple(rope.q.shape)} {rope.q.dtype}")
    y = rope.q if rope is not None and rope.q is not None else torch.empty(
        m, n, dtype=x.dtype, device=x.device)
    norm_args, normed, total = (x,) * 5 + (0.0, 0, 0, 0), None, None  # unused without norm
    if norm is not None:
        norm_args, normed, total = _norm_args(y, norm)
    gdc = use_pdl(x, pdl)
    n_arg = w.out_features if rope is not None else n  # the kernel's N: rows of w with rope
    up_row = rope.row0 // 2 if rope is not None else n_arg  # ROPE: w's first pair in the QKV
    # every mode: a tile is BLOCK_N rows of w (GLU / ROPE: BLOCK_N / 2 pairs of them)
    grid = triton.cdiv(triton.cdiv(w.out_features, cfg.block_n), cfg.tiles)
    _qgemv_w_kernel[(grid,)](
        xw, y, bias if bias is not None else x, qw, qh, *rest, n_arg, up_row, xw.stride(0),
        y.stride(0), qw.stride(0), qh.stride(0), *(p.stride(0) for p in rest), *rope_args,
        *norm_args, K=k,
        FMT=fmt, GS=gs, M=m, BLOCK_N=cfg.block_n,
        BLOCK_G=cfg.block_g, MAGIC=cfg.magic, PREFETCH=cfg.prefetch, GLU=glu,
        ROPE=rope is not None, N_HEADS=heads[0], N_KV=heads[1], HEAD_DIM=heads[2],
        XF16=x.dtype == torch.float16, HAS_BIAS=bias is not None,
        COMPILED=not os.environ.get("TRITON_INTERPRET"), USE_GDC=gdc, STAGES=cfg.num_stages,
        TILES=cfg.tiles, NORM=norm is not None, NORM_N=n if norm is not None else 1,
        NBLOCK=triton.next_power_of_2(n) if norm is not None else 1,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **launch_options(gdc))
    return (normed, total) if norm is not None else y
