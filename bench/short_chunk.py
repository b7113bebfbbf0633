"""The short continuation chunk (a prefix-cache hit's tail: 64 tokens at 1,536 for issue 16's
shared-prefix benchmark), its two largest costs one at a time, random data of a model's shapes.

Part 1, the paged prefill attention of one layer (kernels/paged_prefill.py) under launch
variants: ROWS:SPLITS:BLOCK_N:WARPS:STAGES ("-" = the engine's choice for that field, e.g.
-:-:-:4:- is the engine's launch). Each layer has its own pools (the keys come from DRAM, not
L2, as in the model); the persistent counters as the engine passes them.

Part 2, the chunk's GEMMs (M tokens x each linear of a layer): F.linear (cuBLAS, the engine's
path; on the GPU also with torch's preferred BLAS library set to cuBLASLt, then once more as
the first: a shape's first timing can read slow), torch.mm on the weight stored transposed
(cuBLAS's other layout), and a plain Triton tile kernel (this script's, for exploration:
BLOCK_N:BLOCK_K:STAGES:SPLIT_K, split-K by fp32 atomics into a zeroed output, whose memset is
counted). Weights rotate over copies that pass L2, as the model's layers do.

Both parts: us per call, the median of CUDA-graph replays of back-to-back calls (bench.common
graph_us). docs/performance.md, "H200: the short chunk's attention and GEMMs (issue 16)":
  python bench/short_chunk.py --configs 1b --start 1536 --tokens 64
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench  # noqa: E402, F401, I001  (first: it picks Triton's interpreter where there is no GPU)
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from bench.common import (  # noqa: E402
    SHAPES,
    configs_for,
    csv,
    device_for,
    dtype_for,
    graph_us,
    l2_bytes,
    parser,
    print_table,
)
from llm.backends.torch.kernels.paged_prefill import (  # noqa: E402
    paged_prefill_attention,
    rows_per_program,
    splits_per_tile,
)

PAGE = 32
ATTENTION_VARIANTS = (
    "-:-:-:4:-,-:-:-:4:3,-:-:-:4:1,-:-:-:4:2,-:-:-:2:1,-:-:-:2:3,-:-:-:8:3,-:-:32:4:3,-:-:32:4:1,"
    "-:-:128:4:3,-:-:128:8:3,-:1:-:4:3,-:2:-:4:3,-:4:-:4:3,-:8:-:4:3,-:4:-:4:1,-:8:-:4:1,"
    "16:-:-:4:3,32:-:-:4:3,16:4:-:4:3,32:4:-:4:3,16:8:-:4:1,32:8:-:4:1,16:1:-:4:3,32:1:-:4:3,"
    "32:2:-:4:3,64:2:-:4:1,64:4:32:4:1,64:8:32:4:1,32:4:32:2:1,16:4:32:2:1")
GEMM_VARIANTS = ("16:128:4:1,16:256:3:1,32:128:4:1,32:256:3:1,64:128:4:1,16:128:4:2,"
                 "32:128:4:2,32:128:4:4,64:128:4:4,64:256:3:4,16:256:3:4,128:64:4:1")


@triton.jit
def _tile_kernel(x_ptr, w_ptr, out_ptr, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, STAGES: tl.constexpr):
    """out[M, N] (+)= x[M, K] @ w[N, K]^T over this program's BLOCK_N columns and K share."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    share = K // SPLIT_K
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in tl.range(pid_k * share, pid_k * share + share, BLOCK_K, num_stages=STAGES):
        x = tl.load(x_ptr + rm[:, None] * K + (k0 + rk)[None, :], mask=rm[:, None] < M,
                    other=0.0)  # [BLOCK_M, BLOCK_K]
        w = tl.load(w_ptr + rn[:, None].to(tl.int64) * K + (k0 + rk)[None, :])  # [BN, BK]
        acc += tl.dot(x, tl.trans(w))
    dst = out_ptr + rm[:, None] * N + rn[None, :]
    if SPLIT_K == 1:
        tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=rm[:, None] < M)
    else:
        tl.atomic_add(dst, acc, mask=rm[:, None] < M, sem="relaxed")


def tile_mm(x: torch.Tensor, w: torch.Tensor, block_n: int, block_k: int, stages: int,
            split_k: int) -> torch.Tensor:
    """x [M, K] @ w [N, K]^T by _tile_kernel; split_k > 1 returns float32."""
    m, k = x.shape
    n = w.shape[0]
    if n % block_n or k % (block_k * split_k):
        raise ValueError(f"N={n}, K={k} do not tile by {block_n} x {block_k} x {split_k}")
    out = (torch.empty(m, n, dtype=x.dtype, device=x.device) if split_k == 1
           else torch.zeros(m, n, dtype=torch.float32, device=x.device))
    block_m = max(16, triton.next_power_of_2(m))
    _tile_kernel[(n // block_n, split_k)](x, w, out, m, n, k, BLOCK_M=block_m, BLOCK_N=block_n,
                                         BLOCK_K=block_k, SPLIT_K=split_k, STAGES=stages)
    return out


def attention_rows(cfg, device, dtype, start: int, n: int, max_keys: int,
                   variants: list[str], n_sm: int) -> list[list[str]]:
    """One row per launch variant: the fields resolved, us per layer."""
    nh, n_kv, hd, layers = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.num_layers
    g = torch.Generator(device=device).manual_seed(0)
    pages = -(-max_keys // PAGE)
    pools = [(torch.randn(pages + 1, n_kv, PAGE, hd, generator=g, device=device).to(dtype),
              torch.randn(pages + 1, n_kv, PAGE, hd, generator=g, device=device).to(dtype))
             for _ in range(layers)]
    qs = [torch.randn(n, nh, hd, generator=g, device=device).to(dtype) for _ in range(layers)]
    row = torch.arange(1, pages + 1, device=device)
    start_t = torch.tensor([start], device=device)
    counters = torch.zeros(4096, dtype=torch.int32, device=device)
    group = nh // n_kv
    scale = hd ** -0.5
    reference = None
    out = []
    for variant in variants:
        f = variant.split(":")
        rows = rows_per_program(n, group, n_kv, n_sm) if f[0] == "-" else int(f[0])
        block_n = 64 if f[2] == "-" else int(f[2])
        tiles = -(-n // (rows // group))
        splits = (splits_per_tile(tiles * n_kv, pages * PAGE, block_n, n_sm) if f[1] == "-"
                  else int(f[1]))
        kw = dict(rows=rows, block_n=block_n, splits=splits, counters=counters,
                  num_warps=int(f[3]), num_stages=None if f[4] == "-" else int(f[4]))
        calls = [partial(paged_prefill_attention, q, k, v, row, start_t, scale, **kw)
                 for q, (k, v) in zip(qs, pools)]
        got = calls[0]()
        reference = got if reference is None else reference
        err = (got.float() - reference.float()).abs().max().item()
        us = graph_us(calls, device)
        out.append([variant, str(rows), str(splits), str(block_n), f[3], f[4], f"{us:.1f}",
                    f"{err:.1e}"])
    return out


@contextmanager
def blas_library(name: str | None):
    """torch's preferred BLAS library set to `name` ("cublas", "cublaslt") for the block, then
    restored; None: unchanged. It is process-wide state, so only this script's timings use it."""
    before = torch.backends.cuda.preferred_blas_library()
    if name is not None:
        torch.backends.cuda.preferred_blas_library(name)
    try:
        yield
    finally:
        torch.backends.cuda.preferred_blas_library(before)


def gemm_rows(cfg, device, dtype, m: int, variants: list[str]) -> list[list[str]]:
    """One row per linear of a layer and path: us per call and GB/s of weight bytes."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    q_out = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    shapes = {"qkv": (q_out, h), "o": (h, cfg.num_heads * cfg.head_dim), "gate_up": (2 * i, h),
              "down": (h, i)}
    g = torch.Generator(device=device).manual_seed(0)
    out = []
    for name, (n, k) in shapes.items():
        nbytes = n * k * torch.finfo(dtype).bits // 8
        copies = max(2, min(16, -(-4 * l2_bytes(device) // nbytes)))
        ws = [torch.randn(n, k, generator=g, device=device).to(dtype) for _ in range(copies)]
        wts = [w.t().contiguous() for w in ws]
        x = torch.randn(m, k, generator=g, device=device).to(dtype)
        reference = F.linear(x, ws[0]).float()
        linear = [partial(F.linear, x, w) for w in ws]
        paths = {"F.linear (cuBLAS)": linear, "mm on w^T (cuBLAS)": [
            partial(torch.mm, x, w) for w in wts]}
        if device.type == "cuda":
            paths["F.linear (cuBLASLt)"] = linear
            paths["F.linear (cuBLAS), again"] = linear  # the first timing of a shape can read slow
        for v in variants:
            bn, bk, st, sk = (int(f) for f in v.split(":"))
            if n % bn or k % (bk * sk):
                continue
            paths[f"tile {v}"] = [partial(tile_mm, x, w, bn, bk, st, sk) for w in ws]
        for path, calls in paths.items():
            with blas_library("cublaslt" if "cuBLASLt" in path else None):
                got = calls[0]().float()
                us = graph_us(calls, device)
            err = ((got - reference).abs().max() / reference.abs().max()).item()
            out.append([name, f"{n}x{k}", path, f"{us:.1f}", f"{nbytes / us / 1e3:.0f}",
                        f"{err:.1e}"])
    return out


@torch.inference_mode()
def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--configs", default="1b", help="comma list of: " + ", ".join(SHAPES))
    p.add_argument("--start", type=int, default=1536, help="the chunk's first position")
    p.add_argument("--tokens", type=int, default=64, help="the chunk's length")
    p.add_argument("--max-keys", type=int, default=2048,
                   help="keys the page row holds (the engine's splits depend on it)")
    p.add_argument("--attention", default=ATTENTION_VARIANTS,
                   help="comma list of ROWS:SPLITS:BLOCK_N:WARPS:STAGES ('-': the engine's)")
    p.add_argument("--gemm", default=GEMM_VARIANTS,
                   help="comma list of Triton tile variants BLOCK_N:BLOCK_K:STAGES:SPLIT_K "
                   "('': no GEMMs)")
    args = p.parse_args(argv)
    device, dtype = device_for(args), dtype_for(args)
    if args.tokens < 1 or args.start < 0 or args.start + args.tokens > args.max_keys:
        p.error(f"--start {args.start} + --tokens {args.tokens} must fit --max-keys "
                f"{args.max_keys}, with at least one token")
    n_sm = (torch.cuda.get_device_properties(device).multi_processor_count
            if device.type == "cuda" else 1)
    start, n = (40, 20) if args.smoke else (args.start, args.tokens)
    for name in configs_for(args, csv(args.configs)):
        cfg = SHAPES[name]
        max_keys = min(args.max_keys, 128) if args.smoke else args.max_keys
        print(f"## {name}: attention of one layer, {n} tokens at {start}, {max_keys} keys held")
        print_table(["variant", "rows", "splits", "block_n", "warps", "stages", "us/layer",
                     "max abs diff vs first"],
                    attention_rows(cfg, device, dtype, start, n, max_keys,
                                   csv(args.attention), n_sm))
        if not args.gemm:
            continue
        print(f"## {name}: the linears of one layer at M = {n}")
        print_table(["linear", "N x K", "path", "us", "GB/s", "rel err"],
                    gemm_rows(cfg, device, dtype, n, csv(args.gemm)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
