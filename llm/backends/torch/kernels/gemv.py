"""Small-batch matrix-vector products in Triton, for decode (M <= 16 rows of activations).

y = x @ w.T with w [N, K] row-major (the F.linear layout). At batch 1 the work is reading w once:
each program owns BLOCK_N rows of w and walks the whole of K in BLOCK_K chunks (no split-K, so no
second pass and no atomics), accumulating in fp32. Two inner products:
- one row of x (`GemvConfig.fma`): elementwise multiply-adds on the CUDA cores into a
  [BLOCK_N, BLOCK_K] fp32 accumulator, summed over K once at the end. BLOCK_N can be as small as
  2, so thousands of short programs stream w with many wide loads in flight.
- more rows: a tensor-core dot whose M side is the batch padded to 16 rows, weight tiles through
  Triton's software pipeline (`num_stages` deep, cp.async into shared memory). At batch 1 (and
  in every fused-norm kernel) only the live rows of x are loaded and normalised; the dot sees
  them broadcast to its 16 rows.

Fusions that remove whole kernels from a decode layer:
- `norm_gemv`: the residual add + RMSNorm in front of the product. Every program recomputes the row
  statistics (one extra pass over x, a few KB from L2), and program 0 alone writes the new residual
  stream. Rounding is `kernels/norm.py`'s: the sum rounded to the activation dtype, fp32 statistics,
  the normalised row rounded to the dtype, times the weight in fp32, rounded to the dtype; only the
  order of the fp32 sum of squares differs (chunked here, one tree there).
- `gate_up_silu_gemv`: for MLP's fused [2I, K] gate/up weight (gate rows first), each program
  computes matching gate and up rows and writes silu(gate) * up [M, I], rounded as torch's unfused
  path: gate and up rounded to the dtype (as F.linear's output), silu in fp32 rounded to the dtype,
  the product in fp32 rounded to the dtype.
- `norm_gate_up_silu_gemv`: both.

Block sizes come from the deterministic rule in kernels/gemv_config.py. Every kernel loads its
first weight chunk before waiting on the previous kernel (programmatic dependent launch,
kernels/pdl.py), so with PDL the weight stream starts during the previous kernel's tail.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from llm.backends.torch.kernels.gemv_config import GemvConfig, gemv_config
from llm.backends.torch.kernels.pdl import launch_options, use_pdl, wait_then_release

MAX_M = 16  # rows of x one launch handles: the dot's M side is padded to 16
MAX_W_SPAN = 2**31  # the kernel's weight offsets are 32-bit: rows * row stride stays below this


@functools.lru_cache(maxsize=8)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # the interpreter: any grid works
    return torch.cuda.get_device_properties(device).multi_processor_count


def _stat_block(m: int, k: int) -> tuple[int, int]:
    """(ROWS, STAT_K): the live rows padded to a power of two, and the K chunk of the statistics
    pass: at most 4096 elements a chunk (32 per thread at 4 warps), so K <= 4096 at batch 1 is one
    load per program."""
    rows = triton.next_power_of_2(m)
    return rows, min(triton.next_power_of_2(k), max(64, 4096 // rows))


@triton.jit
def _input_chunk(x_ptr, res_ptr, nw_ptr, k0, M, rstd, stride_x, stride_r, K: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, ROWS: tl.constexpr,
                 COMPACT: tl.constexpr, NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    """Chunk k0 of the GEMV input as the dot's [BLOCK_M, BLOCK_K] operand in the activation dtype:
    x itself, or rms_norm(x + residual) * weight rounded exactly as kernels/norm.py rounds it.

    COMPACT: loads and arithmetic touch only the ROWS live rows, then dot row r holds x row
    r % ROWS (a broadcast, no memory traffic), so rows r < M of the product are the wanted ones.
    Otherwise x is loaded as BLOCK_M rows with the dead ones masked to zero (NORM needs COMPACT).
    """
    cols = k0 + tl.arange(0, BLOCK_K)
    col_live = cols < K
    if COMPACT:
        rows = tl.arange(0, ROWS)
    else:
        rows = tl.arange(0, BLOCK_M)
    mask = (rows < M)[:, None] & col_live[None, :]
    xv = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    if NORM:
        if HAS_RESIDUAL:
            r = tl.load(res_ptr + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0)
            xv = (xv.to(tl.float32) + r.to(tl.float32)).to(xv.dtype)  # the residual stream
        nw = tl.load(nw_ptr + cols, mask=col_live, other=0.0)
        xn = (xv.to(tl.float32) * rstd[:, None]).to(xv.dtype).to(tl.float32)
        xv = (xn * nw.to(tl.float32)[None, :]).to(xv.dtype)  # [ROWS, BLOCK_K]
    if COMPACT and ROWS < BLOCK_M:
        xv = tl.reshape(tl.broadcast_to(xv[None, :, :], (BLOCK_M // ROWS, ROWS, BLOCK_K)),
                        (BLOCK_M, BLOCK_K))
    return xv


@triton.jit
def _row_rstd(x_ptr, res_ptr, sum_ptr, eps, M, stride_x, stride_r, stride_s, write_sum,
              K: tl.constexpr, ROWS: tl.constexpr, STAT_K: tl.constexpr,
              HAS_RESIDUAL: tl.constexpr):
    """1 / rms of each row of x (+ residual), [ROWS]; stores the residual sum where write_sum.
    The K loop is unrolled so that its loads are in flight together: this pass is latency, not
    bandwidth (every program reads the same few KB from L2)."""
    rows = tl.arange(0, ROWS)
    live = rows < M
    sk = tl.arange(0, STAT_K)
    ssq = tl.zeros([ROWS], tl.float32)
    for k0 in tl.static_range(0, K, STAT_K):
        cols = k0 + sk
        mask = live[:, None] & (cols < K)[None, :]
        xv = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(res_ptr + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0)
            xv = (xv.to(tl.float32) + r.to(tl.float32)).to(xv.dtype)  # the residual stream
            if write_sum:
                tl.store(sum_ptr + rows[:, None] * stride_s + cols[None, :], xv, mask=mask)
        xf = xv.to(tl.float32)
        ssq += tl.sum(xf * xf, axis=1)
    return 1.0 / tl.sqrt(ssq / K + eps)


@triton.jit
def _dot_acc(acc, xv, wv, IEEE: tl.constexpr):
    """acc [BLOCK_M, BLOCK_N] += xv [BLOCK_M, BLOCK_K] @ wv[BLOCK_N, BLOCK_K].T in fp32."""
    if IEEE:  # fp32 weights: true fp32 products, as torch's fp32 matmul (not TF32)
        return tl.dot(xv, tl.trans(wv), acc, input_precision="ieee")
    return tl.dot(xv, tl.trans(wv), acc)


@triton.jit
def _weight_chunk(w_rows, k0, ks, n_live, up_offset, K: tl.constexpr, GLU: tl.constexpr):
    """Chunk k0 of this program's weight rows [BLOCK_N, BLOCK_K] (and of the matching up rows
    with GLU; otherwise the gate chunk again, unused)."""
    cols = k0 + ks
    wmask = n_live[:, None] & (cols < K)[None, :]
    wv = tl.load(w_rows + cols[None, :], mask=wmask, other=0.0)
    wu = wv
    if GLU:
        wu = tl.load(w_rows + up_offset + cols[None, :], mask=wmask, other=0.0)
    return wv, wu


@triton.jit
def _accumulate(acc, acc_up, xv, wv, wu, GLU: tl.constexpr, FMA: tl.constexpr,
                IEEE: tl.constexpr):
    """acc (+ acc_up) += one chunk: elementwise fp32 products with FMA ([BLOCK_N, BLOCK_K]
    accumulators), else tensor-core dots ([BLOCK_M, BLOCK_N])."""
    if FMA:
        acc += xv.to(tl.float32) * wv.to(tl.float32)
        if GLU:
            acc_up += xv.to(tl.float32) * wu.to(tl.float32)
    else:
        acc = _dot_acc(acc, xv, wv, IEEE)
        if GLU:
            acc_up = _dot_acc(acc_up, xv, wu, IEEE)
    return acc, acc_up


@triton.jit
def _gemv_kernel(x_ptr, res_ptr, nw_ptr, sum_ptr, w_ptr, b_ptr, y_ptr, eps, M, N, UP_ROW,
                 stride_x, stride_r, stride_s, stride_w, stride_y,
                 K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, ROWS: tl.constexpr, STAT_K: tl.constexpr,
                 COMPACT: tl.constexpr, NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                 HAS_BIAS: tl.constexpr, GLU: tl.constexpr, IEEE: tl.constexpr,
                 FMA: tl.constexpr, USE_GDC: tl.constexpr):
    """y[:, n0:n0 + BLOCK_N] for n0 = program * BLOCK_N; with GLU, w's rows UP_ROW + n are the up
    rows that pair with gate row n, and y = silu(gate) * up."""
    pid = tl.program_id(0)
    ns = pid * BLOCK_N + tl.arange(0, BLOCK_N)  # rows of w = columns of y
    n_live = ns < N
    ks = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + ns[:, None] * stride_w  # [BLOCK_N, 1]
    # the first weight chunk depends on no other kernel: its loads are issued before the wait
    wv, wu = _weight_chunk(w_rows, 0, ks, n_live, UP_ROW * stride_w, K, GLU)
    wait_then_release(USE_GDC)
    rstd = tl.zeros([ROWS], tl.float32)
    if NORM:  # a first pass over x: row statistics; program 0 also stores the residual sum
        rstd = _row_rstd(x_ptr, res_ptr, sum_ptr, eps, M, stride_x, stride_r, stride_s, pid == 0,
                         K, ROWS, STAT_K, HAS_RESIDUAL)
    if FMA:  # one row of x (BLOCK_M = 1): elementwise products, summed over K once at the end
        acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        acc_up = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    xv = _input_chunk(x_ptr, res_ptr, nw_ptr, 0, M, rstd, stride_x, stride_r, K, BLOCK_M,
                      BLOCK_K, ROWS, COMPACT, NORM, HAS_RESIDUAL)  # [BLOCK_M, BLOCK_K]
    acc, acc_up = _accumulate(acc, acc_up, xv, wv, wu, GLU, FMA, IEEE)
    for k0 in range(BLOCK_K, K, BLOCK_K):
        xv = _input_chunk(x_ptr, res_ptr, nw_ptr, k0, M, rstd, stride_x, stride_r, K, BLOCK_M,
                          BLOCK_K, ROWS, COMPACT, NORM, HAS_RESIDUAL)
        wv, wu = _weight_chunk(w_rows, k0, ks, n_live, UP_ROW * stride_w, K, GLU)
        acc, acc_up = _accumulate(acc, acc_up, xv, wv, wu, GLU, FMA, IEEE)
    if FMA:
        acc = tl.sum(acc, axis=1)[None, :]  # [1, BLOCK_N]
        acc_up = tl.sum(acc_up, axis=1)[None, :]
    out_ty = y_ptr.dtype.element_ty
    if HAS_BIAS:
        acc += tl.load(b_ptr + ns, mask=n_live, other=0.0).to(tl.float32)[None, :]
    y = acc.to(out_ty)  # [BLOCK_M, BLOCK_N], rounded as F.linear's output
    if GLU:
        if HAS_BIAS:
            acc_up += tl.load(b_ptr + UP_ROW + ns, mask=n_live, other=0.0).to(tl.float32)[None, :]
        gf = y.to(tl.float32)
        act = (gf / (1.0 + tl.exp(-gf))).to(out_ty).to(tl.float32)
        y = (act * acc_up.to(out_ty).to(tl.float32)).to(out_ty)
    rows = tl.arange(0, BLOCK_M)
    tl.store(y_ptr + rows[:, None] * stride_y + ns[None, :], y,
             mask=(rows < M)[:, None] & n_live[None, :])


def fits(w: torch.Tensor) -> bool:
    """Whether w [N, K] is within the kernels' 32-bit weight offsets."""
    return w.shape[0] * w.stride(0) < MAX_W_SPAN


def _check(x: torch.Tensor, w: torch.Tensor) -> None:
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"gemv wants x [M, K] and w [N, K], got {tuple(x.shape)} and "
                         f"{tuple(w.shape)}")
    if x.shape[0] > MAX_M:
        raise ValueError(f"gemv handles at most {MAX_M} rows of x, got {x.shape[0]}")
    if x.dtype != w.dtype:
        raise ValueError(f"x is {x.dtype} but w is {w.dtype}")
    if x.stride(1) != 1 or w.stride(1) != 1:
        raise ValueError("gemv wants x and w contiguous along K")
    if not fits(w):
        raise ValueError("w is too large for the kernel's 32-bit offsets")


def _launch(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, n: int, glu: bool,
            residual: torch.Tensor | None, norm_weight: torch.Tensor | None, eps: float,
            config: GemvConfig | None, pdl: bool | None,
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Shared launcher: returns (y [M, n], new residual stream or None)."""
    _check(x, w)
    m, k = x.shape
    norm = norm_weight is not None
    if residual is not None and (residual.shape != x.shape or residual.stride(1) != 1):
        raise ValueError(f"residual {tuple(residual.shape)} does not match x {tuple(x.shape)}")
    cfg = config or gemv_config(m, n, k, glu, x.element_size(), _sm_count(x.device), norm)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    total = torch.empty_like(x) if residual is not None else None
    res = residual if residual is not None else x
    out_sum = total if total is not None else x  # never written without a residual
    live_rows, stat_k = _stat_block(m, k)
    gdc = use_pdl(x, pdl)
    # measured on an H100: the compact input helps every fused-norm kernel and batch 1, and costs
    # the plain kernels at batch 4 (18.6 vs 16.9 us for the 1B down projection) and the gate/up
    # kernel at batch 1 (27.6 vs 24.8 us)
    compact = norm or (live_rows == 1 and not glu) or cfg.fma
    if cfg.fma and m != 1:
        raise ValueError(f"the fma GEMV takes one row of x, got {m}")
    _gemv_kernel[(triton.cdiv(n, cfg.block_n),)](
        x, res, norm_weight if norm else x, out_sum, w, bias if bias is not None else w, y,
        eps, m, n, n if glu else 0, x.stride(0), res.stride(0), out_sum.stride(0), w.stride(0),
        y.stride(0), K=k, BLOCK_M=1 if cfg.fma else MAX_M, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, ROWS=live_rows, STAT_K=stat_k, COMPACT=compact, NORM=norm,
        HAS_RESIDUAL=norm and residual is not None, HAS_BIAS=bias is not None, GLU=glu,
        IEEE=x.dtype == torch.float32, FMA=cfg.fma, USE_GDC=gdc, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, **launch_options(gdc))
    return y, total


def gemv(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
         config: GemvConfig | None = None, pdl: bool | None = None) -> torch.Tensor:
    """x [M, K] @ w[N, K].T (+ bias [N]) -> [M, N] in x's dtype; M <= 16. pdl: launch with
    programmatic dependent launch (kernels/pdl.py; default: where the GPU supports it)."""
    return _launch(x, w, bias, w.shape[0], False, None, None, 0.0, config, pdl)[0]


def norm_gemv(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor,
              eps: float, w: torch.Tensor, bias: torch.Tensor | None = None,
              config: GemvConfig | None = None, pdl: bool | None = None,
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(F.linear(rms_norm(x + residual) * norm_weight, w, bias), x + residual) for x, residual
    [M, K]; residual None means zero (the second result is then x itself). Equals
    `add_rms_norm` followed by F.linear, up to summation order."""
    y, total = _launch(x, w, bias, w.shape[0], False, residual, norm_weight, eps, config, pdl)
    return y, (total if total is not None else x)


def _inter(w_gate_up: torch.Tensor) -> int:
    if w_gate_up.shape[0] % 2:
        raise ValueError(f"gate/up weight has an odd number of rows: {w_gate_up.shape[0]}")
    return w_gate_up.shape[0] // 2


def gate_up_silu_gemv(x: torch.Tensor, w_gate_up: torch.Tensor, bias: torch.Tensor | None = None,
                      config: GemvConfig | None = None, pdl: bool | None = None) -> torch.Tensor:
    """x [M, K], w_gate_up [2I, K] (gate rows, then up rows), bias [2I] -> silu(gate) * up
    [M, I]: `silu_mul(F.linear(x, w_gate_up, bias))` in one kernel."""
    return _launch(x, w_gate_up, bias, _inter(w_gate_up), True, None, None, 0.0, config,
                   pdl)[0]


def norm_gate_up_silu_gemv(x: torch.Tensor, residual: torch.Tensor | None,
                           norm_weight: torch.Tensor, eps: float, w_gate_up: torch.Tensor,
                           bias: torch.Tensor | None = None, config: GemvConfig | None = None,
                           pdl: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(silu(gate) * up of rms_norm(x + residual) * norm_weight, x + residual): `add_rms_norm`,
    the gate/up F.linear and `silu_mul` in one kernel; residual None means zero."""
    y, total = _launch(x, w_gate_up, bias, _inter(w_gate_up), True, residual, norm_weight, eps,
                       config, pdl)
    return y, (total if total is not None else x)
