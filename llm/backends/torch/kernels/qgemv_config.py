"""Launch parameters of the quantized small-batch GEMV (kernels/qgemv.py) and the deterministic rule
that picks them (never autotuned, so the first call, made before CUDA-graph capture, compiles
everything the capture needs)."""

from __future__ import annotations

from dataclasses import dataclass

import triton

GROUP = 32  # columns of one 32-group: every format's codes and scales are laid out per group


@dataclass(frozen=True)
class QGemvConfig:
    """Rows of w per program, K columns per chunk (a multiple of 32), warps, pipeline depth."""

    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3


# each row of x costs one fp32 accumulator per byte pair (lo and hi lane) of the chunk: keep
# BLOCK_M * BLOCK_N * BLOCK_K / 2 within this many (32 per thread at 4 warps)
_ACC_BUDGET = 4096


def qgemv_config(m: int, n: int, k: int) -> QGemvConfig:
    """Block sizes for x [m, k] @ w[n, k].T with w quantized.

    The accumulator is [BLOCK_M, BLOCK_N, BLOCK_K / 2] fp32 (BLOCK_M = m rounded up to a power
    of two), summed over K once at the end, so its size bounds the chunk. Measured on an H200
    (Q4_0, 14336 x 4096, distinct weights per call, graph replay):
    - one row: 2 rows x 1024 columns, 18.4 us, against 20.7 (2 x 2048), 20.0 (4 x 1024),
      20.3 (2 x 4096), 22.3 (8 x 1024), 22.9 (4 x 2048), 21.5 (4 x 2048, 8 warps);
    - eight rows: 8 rows x 128 columns, 98.7 us, against 112 (4 x 256), 174-181 (2 x 512,
      2 x 1024), 288 (1 x 1024). Other row counts keep 8 rows and the accumulator budget.
    """
    if m == 1:
        block_n, block_k = 2, 1024
    else:
        block_n = 8
        block_k = max(GROUP, 2 * _ACC_BUDGET // (triton.next_power_of_2(m) * block_n))
    block_k = min(block_k, max(GROUP, triton.next_power_of_2(k)))
    return QGemvConfig(block_n, block_k)


@dataclass(frozen=True)
class QGemvWConfig:
    """v2 kernel: rows of w per program, 32-groups per chunk, warps, pipeline depth, and whether
    4-bit codes enter as 0.5 + q / 256 (one instruction fewer per weight, corrected per group)."""

    block_n: int
    block_g: int
    num_warps: int = 4
    num_stages: int = 1
    magic: bool = False


def qgemv_w_config(m: int, n: int, k: int, fmt: str) -> QGemvWConfig:
    """Launch parameters of the v2 kernel for x [m, k] @ w[n, k].T with w in format `fmt`.

    One thread owns whole 32-groups (16 bytes of 4-bit codes, 32 of int8) of several rows of w,
    so a chunk of 32 * num_warps groups covers all threads; rows of w repeat in each thread and
    share its x values."""
    groups = k // GROUP
    num_warps = 4
    block_g = 128  # the largest power of two <= 128 that divides the groups (no masked chunk)
    while block_g > 32 and groups % block_g:
        block_g //= 2
    block_g = min(block_g, triton.next_power_of_2(groups))
    block_n = 4 if m == 1 else 2
    return QGemvWConfig(block_n, block_g, num_warps)


def qgemm_tc_config(m: int, n: int, k: int) -> tuple[int, int, int]:
    """(BLOCK_N, warps, pipeline stages) of the tensor-core kernel for x [m, k] @ w[n, k].T:
    16 rows of w per warp; 32 rows where that still gives two programs per multiprocessor of an
    H200 (132)."""
    if n // 32 >= 2 * 132:
        return 32, 2, 3
    return 16, 1, 3
