"""Launch parameters of the quantized small-batch GEMV (kernels/qgemv.py) and the deterministic rule
that picks them (never autotuned, so the first call, made before CUDA-graph capture, compiles
everything the capture needs)."""

from __future__ import annotations

from dataclasses import dataclass

import triton

GROUP = 32  # columns of one 32-group: every format's codes and scales are laid out per group


@dataclass(frozen=True)
class QGemvConfig:
    """Rows of w per program, K columns per chunk (a multiple of 32), warps, pipeline depth;
    unroll: the K loop unrolled at compile time, so every chunk's loads can be issued before
    the first chunk's arithmetic (more bytes in flight per program)."""

    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    unroll: bool = False


# each row of x costs one fp32 accumulator per byte pair (lo and hi lane) of the chunk: keep
# BLOCK_M * BLOCK_N * BLOCK_K / 2 within this many (32 per thread at 4 warps)
_ACC_BUDGET = 4096


def qgemv_config(m: int, n: int, k: int) -> QGemvConfig:
    """Block sizes for x [m, k] @ w[n, k].T with w quantized.

    The accumulator is [BLOCK_M, BLOCK_N, BLOCK_K / 2] fp32 (BLOCK_M = m rounded up to a power
    of two), summed over K once at the end, so its size bounds the chunk. At batch 1 it is the
    bf16 GEMV's one-row shape (2 rows x 2048 columns: about 1 KB of 4-bit codes per row and
    chunk, many short programs with wide loads in flight); with more rows the chunk shrinks to
    the budget, never below one 32-group per row.
    """
    rows = triton.next_power_of_2(m)
    block_n = 2
    block_k = max(GROUP, min(2048, 2 * _ACC_BUDGET // (rows * block_n)))
    block_k = min(block_k, max(GROUP, triton.next_power_of_2(k)))
    return QGemvConfig(block_n, block_k)
