"""Launch parameters of the small-batch GEMV kernels (kernels/gemv.py) and the deterministic rule
that picks them: block sizes are never autotuned, so the first call, made before CUDA-graph
capture, compiles everything the capture needs."""

from __future__ import annotations

from dataclasses import dataclass

import triton


@dataclass(frozen=True)
class GemvConfig:
    """Launch parameters: rows of w per program (per half of w for the gate/up kernels), K chunk,
    warps, software-pipeline depth; fma (one row of x only): multiply-adds on the CUDA cores into
    a [block_n, block_k] fp32 accumulator reduced once at the end, instead of a tensor-core dot
    whose 16-row minimum sets block_n >= 16."""

    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    fma: bool = False


# One row of x: (n, k, glu, norm) -> (BLOCK_N, BLOCK_K) where an H200 sweep (bf16, distinct
# weights per call; docs/performance.md v8) found a block beating the rule below by >= 3% in two
# runs: us per call, this block vs the rule's.
_TUNED_ONE_ROW = {
    (8192, 2048, True, True): (4, 256),  # Llama-3.2-1B gate/up with the norm: 20.2 vs 21.7
    (6144, 4096, False, True): (16, 512),  # Llama-3.1-8B qkv with the norm: 15.8 vs 17.2
    (4096, 4096, False, False): (4, 512),  # Llama-3.1-8B o_proj: 10.8 vs 11.1
    (576, 1536, False, False): (4, 1024),  # SmolLM2-135M down: 2.6 vs 3.2
}


def gemv_config(m: int, n: int, k: int, glu: bool = False, elem_bytes: int = 2,
                n_sm: int = 132, norm: bool = False) -> GemvConfig:
    """A deterministic choice of block sizes for x [m, k] @ w[n, k].T (n: output columns; for the
    gate/up kernels, I, each program reading BLOCK_N gate rows and BLOCK_N up rows; norm: the
    kernel has the RMSNorm prologue).

    One row of x (m = 1): the CUDA-core path, BLOCK_N = 2 rows of w per program and K chunks of
    1024, unless `_TUNED_ONE_ROW` names the shape. Swept on an H200 (bf16, Llama 1B/8B and
    SmolLM2 shapes, BLOCK_N 2-32 x BLOCK_K 256-1024, distinct weights per call so nothing is
    served from L2; docs/performance.md v8): it beat cuBLAS on every shape and the dot path on all
    but the 8B LM head (243.2 vs 237.5 us); 1B o_proj 4.5 us vs dot 5.8 vs cuBLAS 6.2. With the
    table, every swept shape is within 5% of its best block: many short programs keep many wide
    loads in flight. Most tiles of 8192 elements per K step lost, up to 40% (e.g. 8 x 1024 for
    8B gate/up); 16 x 512 for 8B qkv is the table's exception.

    More rows (the dot path): a program streams BLOCK_N x K weights through Triton's cp.async
    pipeline. Swept on an H100: BLOCK_N = 32 when that still gives >= 0.7 programs per SM (1B qkv,
    N = 3072: 96 programs, 7.4 us vs 8.3 us with 16), else 16, the dot's smallest side. BLOCK_K:
    512 bytes of each weight row per chunk, halved for the gate/up kernels when BLOCK_N = 32 (1B
    gate/up: 24.6 us vs 33 us at 16 x 256 with 4 stages). 4 warps, 4 stages (3 for gate/up).
    """
    if m == 1:
        block_n, block_k = _TUNED_ONE_ROW.get((n, k, glu, norm), (2, 1024))
        block_k = min(block_k, max(16, triton.next_power_of_2(k)))
        return GemvConfig(block_n, block_k, num_warps=4, num_stages=3, fma=True)
    block_n = 32 if triton.cdiv(n, 32) >= 0.7 * n_sm else 16
    block_k = 512 // elem_bytes
    if glu and block_n >= 32:
        block_k //= 2
    block_k = min(block_k, max(16, triton.next_power_of_2(k)))
    return GemvConfig(block_n, block_k, num_warps=4, num_stages=3 if glu else 4)
