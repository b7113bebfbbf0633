"""Greedy argmax over a vocabulary row: torch.argmax (one reduction) against the split Triton
argmax of llm/backends/torch/kernels/argmax.py (a max per 2048 columns, then the first best).

  graph  us per call in a CUDA graph of --calls calls back to back (median of --reps replays):
         the GPU time, as inside a decode step's graph
  alone  one eager call from the host until the GPU has finished (median of --alone): on a slow
         host this is the launches, not the kernels

docs/performance.md, v11:
  python bench/argmax_micro.py --vocabs 128256,49152 --rows 1,4,32
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    csv,
    device_for,
    dtype_for,
    graph_us,
    host_ms,
    parser,
    print_table,
)
from llm.backends.torch.kernels.argmax import max_argmax  # noqa: E402


@torch.inference_mode()
def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--vocabs", default="128256,49152", help="comma list of row widths")
    p.add_argument("--rows", default="1,4,32", help="comma list of rows (batch)")
    p.add_argument("--calls", type=int, default=16, help="calls per CUDA graph")
    p.add_argument("--reps", type=int, default=10, help="graph replays timed (median)")
    p.add_argument("--alone", type=int, default=20, help="single calls timed (median)")
    args = p.parse_args(argv)
    device, dtype = device_for(args), dtype_for(args)
    vocabs = [512] if args.smoke else csv(args.vocabs, int)
    rows = []
    for vocab in vocabs:
        for n in csv(args.rows, int):
            logits = torch.randn(n, vocab, device=device).to(dtype)
            variants = {"torch.argmax": lambda x=logits: torch.argmax(x, dim=-1),
                        "split": lambda x=logits: max_argmax(x)}
            cells = []
            for fn in variants.values():
                cells.append(graph_us([fn] * args.calls, device, args.reps))
            for fn in variants.values():
                cells.append(1e3 * statistics.median(host_ms(fn, device)
                                                     for _ in range(args.alone)))
            rows.append([vocab, n, *[f"{c:.1f}" for c in cells]])
            print(" ".join(str(x) for x in rows[-1]), flush=True)
    print_table(["vocab", "rows", "torch.argmax graph us", "split graph us",
                 "torch.argmax alone us", "split alone us"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
