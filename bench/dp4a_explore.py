"""One row of x times Q4_0 / Q8_0 weights by `dp4a` on x's exact byte planes
(bench/dp4a_gemv.py, an exploration outside the engine), against `qgemv`'s one-row Triton kernel.

Per 8B / 1B linear shape (`bench.quant_decode.linear_shapes`): `auto` (what `qgemv` picks at one
row) and the kernel at each --tiles (BLOCK_N:BLOCK_G:WARPS), each checked against x @
dequantize(W).T in float64 and timed as CUDA graphs (`bench.common.graph_us`) two ways: over
copies of the weight > 4x the L2 (`dram`: what a decode step does) and over one weight read again
and again (`l2`: the shapes that fit twice in the L2; there the SMs are the limit); Q4_0 also as
`dp4as` (`dp4a_gemv_split`, x's planes split into each group's low and high columns; `p`: the
next chunk's codes prefetched). The kernel's
time excludes making x's planes (`x_planes`, timed alone per K: in an engine that work would be
one launch per x, or folded into the kernel that writes x).

    python bench/dp4a_explore.py --configs 8b,1b --formats q4_0,q8_0 --tiles 16:32:4,32:32:4
    python bench/dp4a_explore.py --smoke      # CPU: the interpreter, small shapes
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench  # noqa: E402,F401  (Triton's interpreter where there is no GPU)
from bench.common import SHAPES, csv, fmt, graph_us, print_table  # noqa: E402
from bench.dp4a_gemv import dp4a_gemv, dp4a_gemv_split, x_planes, x_planes_split  # noqa: E402
from bench.quant_decode import linear_shapes, random_quantized, weight_copies  # noqa: E402


def run(args) -> int:
    from llm.backends.torch.kernels import qgemv

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    smoke = device.type != "cuda"
    if smoke:
        bw, l2 = 1e12, 1 << 30
        shapes = {"smoke": {"qkv": (48, 128), "down": (32, 256)}}
    else:
        from bench.common import copy_bandwidth, l2_bytes

        bw, l2 = copy_bandwidth(device), l2_bytes(device)
        shapes = {name: linear_shapes(SHAPES[name]) for name in csv(args.configs)}
    gen = torch.Generator(device=device).manual_seed(0)
    tiles = [tuple(int(v) for v in t.split(":")) for t in csv(args.tiles)]
    rows, best, prep = [], [], {}
    for name, lins in shapes.items():
        for lin, (n, k) in lins.items():
            if args.linears and not smoke and lin not in csv(args.linears):
                continue
            x = (torch.randn(1, k, device=device, generator=gen) * 0.5).to(torch.bfloat16)
            planes = x_planes(x)
            if k not in prep:
                prep[k] = graph_us([lambda x=x: x_planes(x)] * 8, device)
            for fmt_name in csv(args.formats):
                w0 = random_quantized(fmt_name, n, k, gen, device)
                ws = [w0] if smoke else weight_copies(w0, l2)
                ref = x.double() @ w0.dequantize(torch.float64).T
                variants = [("auto", lambda w, x=x: qgemv.qgemv(x, w))]
                variants += [(f"dp4a {bn}:{bg}:{wp}",
                              lambda w, bn=bn, bg=bg, wp=wp, planes=planes: dp4a_gemv(
                                  planes, w, block_n=bn, block_g=bg, num_warps=wp))
                             for bn, bg, wp in tiles]
                if fmt_name == "q4_0":  # x's split planes: no exchange of x's words
                    split = x_planes_split(x)
                    variants += [(f"dp4as {bn}:{bg}:{wp}{' p' if pf else ''}",
                                  lambda w, bn=bn, bg=bg, wp=wp, split=split, pf=pf:
                                  dp4a_gemv_split(split, w, block_n=bn, block_g=bg,
                                                  num_warps=wp, prefetch=pf))
                                 for bn, bg, wp in tiles for pf in (False, True)]
                variants.append(("auto, again", variants[0][1]))
                times = {}
                for label, call in variants:
                    out = call(w0).double()
                    err = float((out - ref).abs().max() / ref.abs().max())
                    dram = graph_us([lambda w=w, call=call: call(w) for w in ws], device)
                    hot = (graph_us([lambda call=call, w0=w0: call(w0)] * 8, device)
                           if w0.nbytes * 2 < l2 and not smoke else None)
                    times[label] = dram
                    rows.append([name, lin, fmt_name, f"{n}x{k}", label, fmt(dram, 1),
                                 fmt(100 * w0.nbytes / (dram * 1e-6) / bw, 0),
                                 "-" if hot is None else fmt(hot, 1), f"{err:.1e}"])
                    print(rows[-1], flush=True)
                dp = min((t, lb) for lb, t in times.items() if lb.startswith("dp4a"))
                best.append([name, lin, fmt_name, fmt(times["auto"], 1),
                             fmt(times["auto, again"], 1), fmt(dp[0], 1), dp[1],
                             f"{min(times['auto'], times['auto, again']) / dp[0]:.2f}x"])
                del ws
                if not smoke:
                    torch.cuda.empty_cache()
    if not smoke:
        print(f"{torch.cuda.get_device_name(device)}, copy bandwidth {bw / 1e12:.2f} TB/s")
    print_table(["config", "linear", "format", "N x K", "variant", "us (dram)", "% copy",
                 "us (l2)", "max rel err"], rows)
    print_table(["config", "linear", "format", "auto us", "auto again", "best dp4a us",
                 "variant", "auto / dp4a"], best)
    print_table(["K", "x_planes us"], [[k, fmt(t, 2)] for k, t in prep.items()])
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="8b,1b")
    p.add_argument("--formats", default="q4_0,q8_0")
    p.add_argument("--linears", default="", help="only these (qkv, o, gate_up, down, head...)")
    p.add_argument("--tiles", default="16:32:4,32:32:4,16:64:4,32:32:8",
                   help="BLOCK_N:BLOCK_G:WARPS launches of the dp4a kernel")
    p.add_argument("--smoke", action="store_true", help="CPU check on small shapes")
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
