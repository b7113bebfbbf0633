"""Batches of 2..16 rows on Q4_0 weights: the weights dequantized to bf16 in registers, one long
tensor-core dot over K (an exploration beside `qgemv`'s kernels).

    python bench/qgemm_explore.py --configs 8b --batches 16 --variants auto,bf16,dq:64:4:4:3

The engine's tensor-core kernel (kernels/qgemm_tc.py) multiplies each 32-group's exact codes on
the tensor cores and scales the group's sum in float32 afterwards: a chain of short dots, one per
group. `dq` dequantizes a step's groups into bf16 weights exactly as the prefill path's
`dequantize(float32).to(bf16)` does ((q - 8) * d in float32, exact, then one rounding), and
accumulates x times them in one dot chain over K: the same function as the prefill path (the
dequantized layer through cuBLAS), up to accumulation order. Variants:
dq:BLOCK_N:GROUPS:WARPS:STAGES[:FLAG...] (GROUPS: 32-groups a step; FLAGs: b = each weight's scale
loaded in the weights' layout instead of one a group broadcast; n = no scales, a diagnostic
with wrong results; sS = split-K into S programs along K, kernels/splitk.py; t = the codes and
scales repacked so that each program's step reads one contiguous block). auto = what `qgemv`
picks today, bf16 = F.linear on the dense bf16 weight.
Microseconds per call as a CUDA graph over copies that exceed the L2 several times, % of the copy
bandwidth, and the error against x @ dequantize(W).T in float64 and against x @ bf16(W).T.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench  # noqa: E402, F401  (sets Triton's interpreter where there is no GPU)
from bench.common import SHAPES, copy_bandwidth, csv, device_for, fmt, parser, print_table  # noqa: E402
from bench.quant_decode import linear_shapes, random_quantized, variant_call  # noqa: E402
from llm.backends.torch.kernels.qgemm_dq import dq, tiled  # noqa: E402
from llm.model.quant.tensor import QuantizedTensor  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    from bench.common import graph_us, l2_bytes

    p = parser(__doc__)
    p.add_argument("--configs", default="8b")
    p.add_argument("--linears", default="qkv,o,gate_up,down")
    p.add_argument("--batches", default="16")
    p.add_argument("--variants", default="bf16,auto,dq:64:4:4:3,dq:128:4:8:3")
    args = p.parse_args(argv)
    device = device_for(args)
    bw = copy_bandwidth(device)
    g = torch.Generator(device=device).manual_seed(0)
    rows = []
    for name in csv(args.configs):
        for lin, (n, k) in linear_shapes(SHAPES[name]).items():
            if lin not in csv(args.linears):
                continue
            w0 = random_quantized("q4_0", n, k, g, device)
            copies = max(2, -(-4 * l2_bytes(device) // w0.nbytes))
            ws = [w0] + [QuantizedTensor(w0.format, w0.shape, {q: t.clone() for q, t in
                                                             w0.planes.items()})
                         for _ in range(copies - 1)]
            wd = w0.dequantize(torch.float32)
            wb = wd.to(torch.bfloat16)
            dense = [wb.clone() for _ in range(max(2, -(-4 * l2_bytes(device) // (2 * n * k))))]
            for b in csv(args.batches, int):
                x = (torch.randn(b, k, device=device) * 0.5).to(torch.bfloat16)
                ref = x.double() @ wd.double().T
                refb = x.double() @ wb.double().T
                for v in csv(args.variants):
                    f = v.split(":")
                    try:
                        if f[0] == "dq":
                            packs = [tiled(w, int(f[1]), int(f[2])) if "t" in f[5:] else None
                                     for w in ws]
                            calls = [lambda w=w, pk=pk, x=x, f=f: dq(x, w, f[1:], pk)
                                     for w, pk in zip(ws, packs)]
                            nbytes = w0.nbytes
                        elif v == "bf16":
                            calls = [lambda w=w, x=x: torch.nn.functional.linear(x, w)
                                     for w in dense]
                            nbytes = 2 * n * k
                        else:
                            call = variant_call(v, x)
                            calls = [lambda w=w, call=call: call(w) for w in ws]
                            nbytes = w0.nbytes
                        out = calls[0]().double()
                        err = float((out - ref).norm() / ref.norm())
                        errb = float((out - refb).norm() / refb.norm())
                        us = graph_us(calls, device)
                    except Exception as e:  # noqa: BLE001  (report it and go on)
                        rows.append([name, lin, b, v, "-", "-", type(e).__name__, str(e)[:60]])
                        print(rows[-1], flush=True)
                        continue
                    rows.append([name, lin, b, v, fmt(us, 1),
                                 fmt(100 * nbytes / (us * 1e-6) / bw, 0), f"{err:.1e}",
                                 f"{errb:.1e}"])
                    print(rows[-1], flush=True)
            del ws, wd, wb, dense
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s")
    print_table(["config", "linear", "batch", "variant", "us", "% copy", "err vs f64",
                 "err vs bf16 W"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
