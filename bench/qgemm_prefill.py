"""A prompt chunk's linears with quantized weights: dequantize-then-matmul (the engine's path for
calls of more than 64 rows) against the GEMM that dequantizes tiles in registers
(kernels/qgemm_prefill.py) in launch variants, and bf16 cuBLAS on the same shapes.

    python bench/qgemm_prefill.py --configs 8b --formats q4_0,q4_k,q6_k --tokens 256,2048

Per config, linear (the backend's fused qkv and gate_up), format and rows: us per call (CUDA-graph
replays of back-to-back calls, bench.common graph_us; weights rotate over copies that pass the
L2, as a model's layers do) and the TFLOP/s that time gives; the relative difference of each
variant's output from the dense path's (the same weights, sums in another order).
--variants: BM:BN:BK:WARPS:STAGES[:n] launches of the fused kernel (n: `natural`).
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench  # noqa: E402, F401, I001  (first: it picks Triton's interpreter where there is no GPU)
from bench.common import (  # noqa: E402
    SHAPES,
    configs_for,
    csv,
    device_for,
    graph_us,
    l2_bytes,
    parser,
    print_table,
)
from bench.quant_decode import linear_shapes, random_quantized, scaled  # noqa: E402
from bench.quant_prefill import fused_launch  # noqa: E402
from llm.backends.torch.kernels.dequant import dequantize_dense  # noqa: E402
from llm.backends.torch.kernels.qgemm_prefill import qgemm_prefill  # noqa: E402

VARIANTS = ("128:128:64:8:3,128:128:64:8:3:n,128:64:64:4:3,128:64:64:4:3:n,128:128:128:8:3:n,"
            "64:128:64:4:3:n,256:64:64:8:3:n")


def copies_for(nbytes: int, device: torch.device) -> int:
    """How many copies of a weight of `nbytes` make a rotation larger than twice the L2."""
    return max(1, -(-2 * l2_bytes(device) // max(nbytes, 1)))


def dense_linear(x: torch.Tensor, w) -> torch.Tensor:
    """The engine's path for a prompt chunk: a dense bf16 copy of w for the call, then cuBLAS."""
    return F.linear(x, dequantize_dense(w, torch.bfloat16))


@torch.inference_mode()
def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--configs", default="8b", help="comma list of: " + ", ".join(SHAPES))
    p.add_argument("--formats", default="q4_0,q4_k,q8_0")
    p.add_argument("--tokens", default="256", help="comma list of rows of x")
    p.add_argument("--shapes", default="qkv,o,gate_up,down")
    p.add_argument("--variants", default=VARIANTS)
    args = p.parse_args(argv)
    device = device_for(args)
    g = torch.Generator(device=device).manual_seed(0)
    rows = []
    for name in configs_for(args, csv(args.configs)):
        shapes = linear_shapes(SHAPES[name])
        for shape in csv(args.shapes):
            n, k = shapes[shape]
            copies = copies_for(2 * n * k, device)
            dense = [torch.randn(n, k, device=device, dtype=torch.bfloat16) / k ** 0.5
                     for _ in range(copies)]
            for m in csv(args.tokens, int):
                x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
                flop = 2 * m * n * k
                us = graph_us([partial(F.linear, x, w) for w in dense], device)
                rows.append([name, shape, m, "bf16", "cuBLAS", f"{us:.1f}",
                             f"{flop / us / 1e6:.0f}", "-"])
                for fmt_name in csv(args.formats):
                    ws = [scaled(random_quantized(fmt_name, n, k, g, device))
                          for _ in range(copies)]
                    ref = dense_linear(x, ws[0]).float()
                    us = graph_us([partial(dense_linear, x, w) for w in ws], device)
                    rows.append([name, shape, m, fmt_name, "dequantize + cuBLAS", f"{us:.1f}",
                                 f"{flop / us / 1e6:.0f}", "0"])
                    for variant in csv(args.variants):
                        launch = fused_launch(variant)
                        out = qgemm_prefill(x, ws[0], **launch).float()
                        err = ((out - ref).norm() / ref.norm()).item()
                        us = graph_us([partial(qgemm_prefill, x, w, **launch) for w in ws],
                                      device)
                        rows.append([name, shape, m, fmt_name, f"fused {variant}", f"{us:.1f}",
                                     f"{flop / us / 1e6:.0f}", f"{err:.1e}"])
                    print(rows[-1], flush=True)
                    del ws
            del dense
    print_table(["config", "linear", "rows", "weights", "path", "us", "TFLOP/s", "vs dense"],
                rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
