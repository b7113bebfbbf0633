"""The tensor-core kernel (kernels/qmma.py) against `qgemv`'s Triton kernels, per shape.

For each format (any of qmma.FORMATS), linear shape of the configs (bench.common.SHAPES, or
--linears of them) and row count of x: `auto` (what `qgemv` picks, the tensor-core kernel included
where `mma_rows` says so; above 16 rows `qgemm_batch`'s), `triton` (the pick with that kernel left
out) and the tensor-core kernel at each --warps, --halves (32-row halves a CTA), --stages (those
whose shared memory fits), --splits along K (those with a quad of K for every warp of a split) and
--occupancy (registers fitted to 1, 2, 3 or 4 CTAs an SM), each checked against x @ dequantize(W).T
in float64 (max relative error: y's bf16 rounding, ~2e-3) and timed as CUDA graphs over copies of
the weight > 4x the L2 (`bench.common.graph_us`); `auto` once more last (a shape's first timing has
read slow on the largest shapes). Last, per shape and rows, the best kernel variant against
`triton`. --glu: on gate_up, also the launch with SiLU*up in its epilogue (the engine's), checked
against silu(x @ gate.T) * (x @ up.T). The earlier designs (v1, v2, v4) and their H100 tables are in
docs/performance.md, "Q4_0 for 1..16 rows of x by mma.sync".

    python bench/qmma_explore.py --formats q4_0,q6_k,q8_0 --configs 8b,1b --batches 2,4,8
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
from llm.backends.torch.kernels import qgemm_batch, qgemv, qmma  # noqa: E402


def occupancy_tag(occupancy: int) -> str:
    """A variant label's suffix for a kernel whose registers fit `occupancy` CTAs an SM."""
    return "" if occupancy == qmma.OCCUPANCY else f" o{occupancy}"


def triton_only(x: torch.Tensor, w) -> torch.Tensor:
    """`qgemv`'s pick among its Triton kernels (the tensor-core kernel turned off); above 16 rows
    the Triton tensor-core kernel over all of them (kernels/qgemm_batch.py with qmma off)."""
    with mock.patch.object(qgemv, "qmma_runs", lambda *a, **k: False):
        if x.shape[0] > qgemv.MAX_M:
            with mock.patch.object(qgemm_batch, "qmma_runs", lambda *a, **k: False):
                return qgemm_batch.qgemm_batch(x, w)
        return qgemv.qgemv(x, w)


def engine(x: torch.Tensor, w) -> torch.Tensor:
    """What the engine runs for x and w: `qgemv` up to 16 rows, `qgemm_batch` above."""
    return qgemv.qgemv(x, w) if x.shape[0] <= qgemv.MAX_M else qgemm_batch.qgemm_batch(x, w)


def run(args) -> int:
    """The check and the timing table (see the module docstring)."""
    device = torch.device("cuda")
    bw = copy_bandwidth(device)
    g = torch.Generator(device=device).manual_seed(0)
    rows, best = [], []
    limit = qmma._shared_limit(device.index)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    for name, fmt_name in [(c, f) for f in csv(args.formats) for c in csv(args.configs)]:
        for lin, (n, k) in linear_shapes(SHAPES[name]).items():
            if args.linears and lin not in csv(args.linears):
                continue
            if n % qmma.ROWS or k % 256:
                print(f"{name} {lin} {n}x{k}: not a multiple of 32 rows / 256 columns, skipped")
                continue
            w0 = random_quantized(fmt_name, n, k, g, device)
            ws = weight_copies(w0, l2_bytes(device))
            wd = w0.dequantize(torch.float64)
            for m in csv(args.batches, int):
                x = (torch.randn(m, k, device=device, generator=g) * 0.5).to(torch.bfloat16)
                ref = x.double() @ wd.T
                variants = [("auto", lambda w, x=x: engine(x, w)),
                            ("triton", lambda w, x=x: triton_only(x, w))]
                combos = [(v, h, sp, qmma.ring_stages(n, device, sp, h) if st == "rule"
                           else int(st))
                          for v in csv(args.warps, int)
                          for h in dict.fromkeys(1 if hv == "rule" else int(hv)
                                                 for hv in csv(args.halves))
                          if v % h == 0 and n % (qmma.ROWS * h) == 0
                          for sp in dict.fromkeys(qmma.k_splits(m, n, k, sms, v, h)
                                                  if spv == "rule" else int(spv)
                                                  for spv in csv(args.splits))
                          for st in csv(args.stages)]
                variants += [(f"mma w{v} h{h} st{st} sp{sp}" + occupancy_tag(o),
                              lambda w, x=x, v=v, h=h, st=st, sp=sp, o=o: qmma.qmma_matmul(
                                  x, w, warps=v, stages=st, splits=sp, halves=h, occupancy=o))
                             for v, h, sp, st in dict.fromkeys(combos)
                             for o in csv(args.occupancy, int)
                             if qmma.shared_bytes(fmt_name, m, v, st) <= limit
                             and sp <= max(1, k // 128 // (v // h))]
                if args.glu and lin == "gate_up":  # SiLU*up in the epilogue: two halves
                    variants += [(f"glu w{v} st{st}" + occupancy_tag(o),
                                  lambda w, x=x, v=v, st=st, o=o: qmma.qmma_matmul(
                                      x, w, warps=v, stages=st, glu=True, occupancy=o))
                                 for v in csv(args.warps, int) if v % 2 == 0
                                 for o in csv(args.occupancy, int)
                                 for st in dict.fromkeys(
                                     qmma.ring_stages(n, device, 1, 2) if sv == "rule"
                                     else int(sv) for sv in csv(args.stages))
                                 if qmma.shared_bytes(fmt_name, m, v, st) <= limit]
                if args.x_one_row and m > 1:  # every row of x the same memory (stride 0)
                    xs = x[:1].expand(m, k)
                    variants.append(("rule, x one row", lambda w, xs=xs: qmma.qmma_matmul(xs, w)))
                variants.append(("auto, again", variants[0][1]))  # a shape's first timing
                # has read 5-19% slow on the largest shapes (docs/performance.md)
                glu_ref = (torch.nn.functional.silu(ref[:, :n // 2]) * ref[:, n // 2:]
                           if args.glu and lin == "gate_up" else None)
                times = {}
                for label, call in variants:
                    out = call(w0)
                    want = (ref[:1].expand(m, n) if label.endswith("x one row")
                            else glu_ref if label.startswith("glu ") else ref)
                    err = float((out.double() - want).abs().max() / want.abs().max())
                    us = graph_us([lambda w=w, call=call: call(w) for w in ws], device)
                    times[label] = us
                    rows.append([f"{name} {fmt_name}", lin, f"{n}x{k}", m, label, fmt(us, 1),
                                 fmt(100 * w0.nbytes / (us * 1e-6) / bw, 0), f"{err:.1e}"])
                    print(rows[-1], flush=True)
                fits = [(t, lb) for lb, t in times.items() if lb.startswith("mma ")]
                if not fits:  # no variant's shared memory fits this GPU
                    continue
                mma = min(fits)
                best.append([f"{name} {fmt_name}", lin, m, fmt(times["triton"], 1),
                             fmt(mma[0], 1), mma[1], f"{times['triton'] / mma[0]:.2f}x",
                             f"{fmt(times['auto'], 1)} / {fmt(times['auto, again'], 1)}"])
            del ws, wd
            torch.cuda.empty_cache()
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s")
    print_table(["config", "linear", "N x K", "rows of x", "variant", "us", "% copy",
                 "max rel err"], rows)
    print_table(["config", "linear", "rows of x", "triton us", "best mma us", "variant",
                 "triton / mma", "auto us (first / last)"], best)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="8b,1b")
    p.add_argument("--formats", default="q4_0,q4_k",
                   help=f"comma list of {', '.join(qmma.FORMATS)}")
    p.add_argument("--linears", default="", help="comma list of the shapes to time (qkv, o, "
                   "gate_up, down, head_chunk, head; default all)")
    p.add_argument("--batches", default="1,2,4,8,16", help="comma list of rows of x (1..64)")
    p.add_argument("--warps", default="8", help="comma list of warps a CTA (1..8)")
    p.add_argument("--stages", default="rule", help="comma list of a warp's ring stages (>= 2) "
                   "or 'rule' (qmma.ring_stages: the engine's)")
    p.add_argument("--splits", default="rule", help="comma list of CTAs along K (>= 1) or "
                   "'rule' (qmma.k_splits: the engine's)")
    p.add_argument("--halves", default="rule", help="comma list of 32-row halves a CTA (1, 2) "
                   "or 'rule' (1: the engine's for a launch without the SiLU*up epilogue)")
    p.add_argument("--occupancy", default="2",
                   help="comma list of CTAs of 256 threads an SM the kernel's registers are "
                   "fitted to (2: 128 a thread, the engine's; 1: 255; 3: 85; 4: 64, spills "
                   "allowed)")
    p.add_argument("--glu", action="store_true",
                   help="on the gate_up shapes, also the launch with SiLU*up in its epilogue "
                        "(two halves, no split; the engine's) at each even --warps and --stages")
    p.add_argument("--x-one-row", action="store_true",
                   help="also time the engine's rule with x's rows all one row of memory "
                        "(stride 0): what the reads of x through the L2 cost the kernel")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("the kernel needs a CUDA GPU (tests/torch_backend/test_qmma.py "
                         "emulates its lanes on the CPU)")
    if any(h != "rule" and h not in ("1", "2") for h in csv(args.halves)):
        raise SystemExit("--halves: 1 or 2 halves of 32 rows a CTA, or 'rule'")
    if any(not 1 <= v <= 8 for v in csv(args.warps, int)):
        raise SystemExit("--warps: 1..8 warps a CTA")
    if any(v != "rule" and (not v.isdigit() or int(v) < 2) for v in csv(args.stages)):
        raise SystemExit("--stages: 'rule' or at least 2")
    if any(v != "rule" and (not v.isdigit() or int(v) < 1) for v in csv(args.splits)):
        raise SystemExit("--splits: 'rule' or at least 1")
    if any(f not in qmma.FORMATS for f in csv(args.formats)):
        raise SystemExit(f"--formats: comma list of {', '.join(qmma.FORMATS)}")
    if any(not 1 <= v <= qmma.MAX_ROWS for v in csv(args.batches, int)):
        raise SystemExit(f"--batches: 1..{qmma.MAX_ROWS} rows of x")
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
