"""The 4-bit tensor-core kernel (kernels/q4_mma.py) against `qgemv`'s Triton kernels, per shape.

For each format (Q4_0, Q4_K), linear shape of the configs (bench.common.SHAPES) and row count of
x: `auto` (what
`qgemv` picks, the tensor-core kernel included where `mma_rows` says so), `triton` (qgemv's pick
with that kernel left out) and the tensor-core kernel at each --warps and --stages, each checked
against x @ dequantize(W).T in float64 (max relative error: y's bf16 rounding, ~2e-3) and timed as
CUDA graphs over copies of the weight > 4x the L2 (`bench.common.graph_us`). The earlier designs
(v1, v2, v4) and their H100 tables are in docs/performance.md, "Q4_0 for 1..16 rows of x by
mma.sync".

    python bench/q4_mma_explore.py --formats q4_0,q4_k --configs 8b,1b --batches 1,2,4,8,16
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench  # noqa: E402, F401
from bench.common import (  # noqa: E402
    SHAPES,
    copy_bandwidth,
    csv,
    fmt,
    graph_us,
    l2_bytes,
    print_table,
)
from bench.quant_decode import (  # noqa: E402
    linear_shapes,
    random_quantized,
    weight_copies,
)
from llm.backends.torch.kernels import q4_mma, qgemv  # noqa: E402


def triton_only(x: torch.Tensor, w) -> torch.Tensor:
    """`qgemv`'s pick among its Triton kernels (the tensor-core kernel turned off)."""
    with mock.patch.object(qgemv, "q4_mma_runs", lambda *a, **k: False):
        return qgemv.qgemv(x, w)


def run(args) -> int:
    """The check and the timing table (see the module docstring)."""
    device = torch.device("cuda")
    bw = copy_bandwidth(device)
    g = torch.Generator(device=device).manual_seed(0)
    rows = []
    for name, fmt_name in [(c, f) for f in csv(args.formats) for c in csv(args.configs)]:
        for lin, (n, k) in linear_shapes(SHAPES[name]).items():
            if n % q4_mma.ROWS or k % 256:
                print(f"{name} {lin} {n}x{k}: not a multiple of 32 rows / 256 columns, skipped")
                continue
            w0 = random_quantized(fmt_name, n, k, g, device)
            ws = weight_copies(w0, l2_bytes(device))
            wd = w0.dequantize(torch.float64)
            for m in csv(args.batches, int):
                x = (torch.randn(m, k, device=device, generator=g) * 0.5).to(torch.bfloat16)
                ref = x.double() @ wd.T
                variants = [("auto", lambda w, x=x: qgemv.qgemv(x, w)),
                            ("triton", lambda w, x=x: triton_only(x, w))]
                variants += [(f"mma w{v} st{st}",
                              lambda w, x=x, v=v, st=st: q4_mma.q4_mma_matmul(x, w, warps=v,
                                                                              stages=st))
                             for v in csv(args.warps, int) for st in csv(args.stages, int)]
                for label, call in variants:
                    out = call(w0)
                    err = float((out.double() - ref).abs().max() / ref.abs().max())
                    us = graph_us([lambda w=w, call=call: call(w) for w in ws], device)
                    rows.append([f"{name} {fmt_name}", lin, f"{n}x{k}", m, label, fmt(us, 1),
                                 fmt(100 * w0.nbytes / (us * 1e-6) / bw, 0), f"{err:.1e}"])
                    print(rows[-1], flush=True)
            del ws, wd
            torch.cuda.empty_cache()
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s")
    print_table(["config", "linear", "N x K", "rows of x", "variant", "us", "% copy",
                 "max rel err"], rows)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="8b,1b")
    p.add_argument("--formats", default="q4_0,q4_k", help="comma list of q4_0, q4_k")
    p.add_argument("--batches", default="1,2,4,8,16", help="comma list of rows of x (1..16)")
    p.add_argument("--warps", default="8", help="comma list of warps a CTA (1..8)")
    p.add_argument("--stages", default="4", help="comma list of a warp's ring stages (>= 2)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("the kernel needs a CUDA GPU (tests/torch_backend/test_q4_mma.py "
                         "emulates its lanes on the CPU)")
    if any(not 1 <= v <= 8 for v in csv(args.warps, int)):
        raise SystemExit("--warps: 1..8 warps a CTA")
    if any(v < 2 for v in csv(args.stages, int)):
        raise SystemExit("--stages: at least 2")
    if any(not 1 <= v <= 16 for v in csv(args.batches, int)):
        raise SystemExit("--batches: 1..16 rows of x")
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
