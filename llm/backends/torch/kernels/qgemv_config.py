"""Launch parameters of the quantized small-batch GEMV (kernels/qgemv.py) and the deterministic rule
that picks them (never autotuned, so the first call, made before CUDA-graph capture, compiles
everything the capture needs)."""

from __future__ import annotations

from dataclasses import dataclass, replace

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
    """v2 kernel: rows of w per program, 32-groups per chunk, warps, pipeline depth (chunks
    staged in shared memory by Triton's software pipeline; 1: none), whether codes enter with
    their offset, corrected per group (`magic`: 4-bit as 0.5 + q / 256, 8-bit as 2^15 + 128 + q;
    one instruction fewer per weight; 8-bit: ~1e-4 of the output's norm, off by default, see
    docs/performance.md), and whether codes
    are prefetched (the first chunk before the PDL wait, each next chunk before the current
    one's arithmetic; not with num_stages > 1), and how many row tiles of block_n rows a
    program takes in turn (`tiles` > 1 where K is one chunk: x read once a program)."""

    block_n: int
    block_g: int
    num_warps: int = 4
    num_stages: int = 1
    magic: bool = False
    prefetch: bool = False
    tiles: int = 1

    def __post_init__(self) -> None:
        if self.tiles < 1:
            raise ValueError(f"a v2 config takes at least one row tile a program: {self}")
        if self.prefetch and self.num_stages > 1:  # both load ahead: registers or shared memory
            raise ValueError(f"a v2 config loads ahead by prefetch or num_stages > 1, not both: "
                             f"{self}")


def qgemv_w_config(m: int, n: int, k: int, fmt: str) -> QGemvWConfig:
    """Launch parameters of the v2 kernel for x [m, k] @ w[n, k].T (m <= 4), w in format `fmt`.

    Threads spread over the 32-groups of a chunk (64 per CTA at 4 warps: 2 threads a group), the
    rows of w repeat in each thread and share its x values. A chunk is at most 128 groups and,
    where K allows, divides K's groups (no masked partial chunk). Measured on an H200
    (2026-12-03/04, `bench/quant_decode.py --kernels`, 8B and 1B shapes, graph replay over
    copies > L2; docs/performance.md v2, v3):
    - 4-bit: codes as 0.5 + q / 256 (`magic`), prefetched; 8 rows x 128 groups: 8B gate_up Q4_0
      23.2 us (69% of copy bandwidth) against 25.8 (exact codes), 25.7 (4 rows), 30.1 (8
      warps), 36.0 (the first kernel); o 7.0 -> 5.2 and qkv 7.8 -> 6.6 with the prefetch.
      Several chunks (down): 4 rows, 8B 4 x 64 groups 15.0 us against 17.5 (8 x 128). K of 64
      groups and N >= 16384 (1B gate_up, LM head): 16 rows, 8.7-8.8 us against 9.0-9.3 (8);
    - Q8_0: 4 rows (8 where K has at most 64 groups: 1B gate_up 12.5 us against 13.3);
      prefetched where K has several chunks (8B down 4 x 64 groups 18.7 against 24.0 at 4 x
      128) or the matrix is small (1B qkv 3.8 against 4.0), not on the large one-chunk ones,
      where it cost (8B gate_up 34.3 us without, 35.9 with).
    - Q5_0 / Q5_1 / Q5_K take it too (2026-12-05, H100: 8B gate_up Q5_K 38.7 us, 73% of copy
      bandwidth; down 26.8 at 4 x 64 against 23.9 at 4 x 128, one run, not changed).
    - Q6_K takes the 4-bit rule (Triton 3.6 for sm_90: 8 x 128 groups 128 registers a thread
      against Q4_0's 79, no spills; 16 x 64 at K = 2048 105). Timed at 1B shapes (2026-12-04):
      16 x 64 the fastest of 7 configs, head chunk 11.8 us (59% of the copy bandwidth) against
      12.4 (8 rows), 13.0 (4), 12.9 (no prefetch), 21.4-24.9 (32-group chunks, 8 warps).
    - Q4_0 at one row, K of 128 groups and N >= 16384 (8B gate_up, the head): 2 row tiles a
      program (x read once for both); end to end 8B Q4_0 1.972 -> 1.955 ms a step (gate_up 24.0
      -> 22.8 us alone). Every other shape timed lost with tiles (fewer programs, fewer code bytes
      in flight): 8B Q8_0 gate_up 34.0 -> 34.8-45.6 us, 1B gate_up end to end +19 us a step.
    - m = 2..4 rows of x: the same chunks, the rows of w halved per doubling of m but at least 4
      (8B Q4_0 at m = 2: gate_up 4 x 128 49.0 us against 8 x 128 49.9 and 2 x 128 57.2, down
      4 x 64 22.3 against 2 x 64 28.1; Q8_0 at m = 4: gate_up 4 x 128 79.8 against 2 x 128
      86.3)."""
    groups = k // GROUP
    block_g = min(128, triton.next_power_of_2(groups))
    whole = groups & -groups  # the largest power of two dividing the groups
    if 32 <= whole < block_g:
        block_g = whole
    several = groups > block_g  # chunks along K
    if fmt in ("q8_0", "int8"):
        cfg = QGemvWConfig(8 if groups <= 64 else 4, block_g, 4,
                           prefetch=several or n * groups <= 4096 * 64)
    else:
        rows = 4 if several else (16 if groups <= 64 and n >= 16384 else 8)
        cfg = QGemvWConfig(rows, block_g, 4, magic=True, prefetch=True)
    if m > 1:  # an accumulator and x values per row of x: fewer rows of w, the same chunks
        cfg = replace(cfg, block_n=max(4, cfg.block_n // triton.next_power_of_2(m)))
    elif fmt == "q4_0" and groups == 128 and n >= 16384:
        cfg = replace(cfg, tiles=2)
    return cfg


def norm_epilogue(m: int, n: int, fmt: str) -> bool:
    """Whether a projection of m rows of x, width n, in format `fmt` with a residual add and
    RMSNorm after it takes them into the v2 kernel's epilogue (`qgemv_words(norm=...)`) rather
    than the norm's own launch: one row (the batches of 2..4 the kernel takes were not timed),
    rows of 4,096 and wider, codes narrower than 8 bits. Measured at batch 1 on an
    H100 (2026-12-07, decode with the norms in o's and down's epilogue against apart, ms a
    step): 8B Q4_0 2.09 / 2.14-2.15, Q4_K_M 2.38-2.40 / 2.47, int4_g128 2.23-2.25 / 2.27, Q6_K
    3.01-3.04 / 3.12; but 8B Q8_0 3.27 / 3.25 and 1B (2,048 wide) Q4_0 0.60 / 0.56: there the
    programs' round trip to the counter costs more than the norm's launch (docs/performance.md).
    """
    return m == 1 and n >= 4096 and fmt not in ("q8_0", "int8")


def words_rows_max(fmt: str) -> int:
    """The most rows of x `qgemv` sends to the v2 kernel for weights in format `fmt` (one
    launch; more rows go to the tensor-core kernel where it runs, else the first kernel).
    Measured on an H200 (2026-12-04, 8B shapes, kernels alone over copies > L2, us, v2 with
    the rule above against the tensor-core kernel's default; docs/performance.md): Q4_0 at 3
    rows qkv 14.4 / 19.6, o 10.9 / 15.0, down 27.1 / 36.9, head chunk 35.3 / 37.4, gate_up
    59.8 / 54.0 (a layer 13 us less), at 4 rows gate_up 83-98 / 54.8, head chunk 49 / 37 (the
    per-row accumulators and x values take registers: fewer programs an SM, fewer bytes in
    flight); Q8_0 at 4 rows still ahead: gate_up 79.8 / 93.2, down 45.0 / 48.6, o 14.4 / 19.7;
    Q4_K and Q6_K (no tensor-core kernel picked) against the first kernel at 2 and 4 rows: every
    shape ahead (Q6_K head chunk 36.5 / 60.0 and 62.8 / 75.4; the least, Q4_K gate_up at 4 rows,
    105.5 / 112.4)."""
    return 3 if fmt == "q4_0" else 4


@dataclass(frozen=True)
class QGemmTcConfig:
    """One launch of the tensor-core kernel (kernels/qgemm_tc.py): rows of w per program, warps,
    pipeline depth, and split_k: programs along K (each sums a range of K's 32-groups into a
    float32 partial; the last of a tile's programs to finish adds the partials in a fixed
    order). 1: each program walks the whole of K."""

    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 3
    split_k: int = 1


@dataclass(frozen=True)
class QGemmTcRule:
    """How `qgemm_tc_config` picks a launch: one block shape for every matrix, and split-K either
    fixed (`split_k`, where programs is 0) or by the grid: K's groups are halved until the grid
    has at least `programs` programs, while each split keeps >= `min_groups` 32-groups. Never a
    function of the batch, so a row's sums are the same at every batch of 2..16."""

    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 3
    split_k: int = 1
    programs: int = 0
    min_groups: int = 16

    def split_for(self, n: int, k: int) -> int:
        """Programs along K for w [n, k]."""
        if self.programs <= 0:
            return self.split_k
        tiles, groups, split = -(-n // self.block_n), k // GROUP, 1
        while tiles * split < self.programs and groups // (2 * split) >= self.min_groups:
            split *= 2
        return split


# Measured on an H200 (2026-12-04, 8B Q4_0, batch 16, `bench/quant_decode.py --tc-configs`):
# 64 rows, 4 warps, 3 stages 7.33 ms a decode step, against 8.09 for 32 / 2 / 3 and 10.13 for
# 16 / 2 / 3. Split-K (same lease, kernels alone at batch 16, us, no split / best split): qkv 25.0
# / 16.0 (4), o 24.5 / 12.2 (4), gate_up 67.0 / 60.3 (2), down 82.3 / 33.2 (4), head chunk 34.8
# (none; 2 splits 54.6). End to end the whole step decides (graphs, one lease, 8B Q4_0 batch 16):
# a grid of >= 528 programs (4x the H200's 132 SMs: 8, 8, 2, 16, 4 splits) 5.16-5.20 ms a step,
# >= 264 5.27-5.28, >= 256 (the kernels' best but gate_up) 5.61-5.94. docs/performance.md.
TC_RULE = QGemmTcRule(programs=528)


# Calls of more than 16 rows (decode batches, short prompt chunks) take the tensor-core kernel over
# all their rows at once (kernels/qgemm_batch.py, x padded to 32 or 64 rows) up to this many;
# larger calls dequantize the matrix and multiply by cuBLAS. docs/performance.md, "Decode batches
# above 16 on the codes".
TC_BATCH_MAX_ROWS = 64


def qgemm_tc_config(m: int, n: int, k: int, rule: QGemmTcRule = TC_RULE) -> QGemmTcConfig:
    """The tensor-core kernel's launch for x [m, k] @ w[n, k].T (m <= TC_BATCH_MAX_ROWS: the
    kernel pads x to 16, 32 or 64 rows; m does not change the launch) by `rule`."""
    return QGemmTcConfig(rule.block_n, rule.num_warps, rule.num_stages, rule.split_for(n, k))
