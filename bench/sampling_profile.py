"""Where a sampled decode step's token selection goes: `sample()` (llm/backends/torch/sampling.py)
and its pieces, each timed alone in a CUDA graph of --calls calls back to back (us per call), on
random fp32 logits [rows, vocab]; greedy argmax beside them.

  python bench/sampling_profile.py --vocabs 128256 --rows 1,32
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import csv, device_for, graph_us, parser, print_table  # noqa: E402
from llm.backends.torch.sampling import SamplingTensors, counter_uniform, sample  # noqa: E402
from llm.engine.contract.sampling_params import SamplingParams  # noqa: E402

MODES = {  # name -> SamplingParams of every row
    "top_p": SamplingParams(temperature=0.8, top_p=0.9),
    "plain": SamplingParams(temperature=0.8),
    "top_k": SamplingParams(temperature=0.8, top_k=50),
    "min_p": SamplingParams(temperature=0.8, min_p=0.05),
}


def pieces(logits: torch.Tensor, st: SamplingTensors, pos: torch.Tensor) -> dict:
    """The sampler's stages as separate callables (the same torch ops as `sample`)."""
    x = logits / st.temperature[:, None]
    sorted_x, order = torch.sort(x, dim=-1, descending=True)
    u = counter_uniform(st.seed, pos, x.shape[-1])

    def filters() -> torch.Tensor:
        probs = torch.softmax(sorted_x, dim=-1)
        keep = torch.cumsum(probs, dim=-1) - probs < st.top_p[:, None]
        return torch.full_like(x, float("-inf")).scatter(-1, order,
                                                         sorted_x.masked_fill(~keep, -1e30))

    return {
        "greedy argmax": lambda: torch.argmax(logits, dim=-1),
        "min_p mask": lambda: x.masked_fill(
            x < (x.amax(dim=-1) + torch.log(st.min_p))[:, None], float("-inf")),
        "sort": lambda: torch.sort(x, dim=-1, descending=True),
        "softmax+cumsum+scatter": filters,
        "counter_uniform": lambda: counter_uniform(st.seed, pos, x.shape[-1]),
        "gumbel+argmax": lambda: torch.argmax(x.double() - torch.log(-torch.log(u)), dim=-1),
        **gumbel_kernel(sorted_x, order, st, pos),
    }


def gumbel_kernel(sorted_x: torch.Tensor, order: torch.Tensor, st: SamplingTensors,
                  pos: torch.Tensor) -> dict:
    """kernels/gumbel.py in place of counter_uniform + gumbel + argmax + scatter, where it runs."""
    try:
        from llm.backends.torch.kernels.gumbel import gumbel_argmax
    except ImportError:
        return {}
    return {"gumbel kernel (sorted)": lambda: gumbel_argmax(sorted_x, st.seed, pos, tokens=order)}


@torch.inference_mode()
def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--vocabs", default="128256", help="comma list of row widths")
    p.add_argument("--rows", default="1,32", help="comma list of rows (batch)")
    p.add_argument("--modes", default=",".join(MODES), help="comma list of: " + ", ".join(MODES))
    p.add_argument("--calls", type=int, default=8, help="calls per CUDA graph")
    p.add_argument("--reps", type=int, default=10, help="graph replays timed (median)")
    args = p.parse_args(argv)
    device = device_for(args)
    rows = []
    for vocab in [512] if args.smoke else csv(args.vocabs, int):
        for n in csv(args.rows, int):
            logits = torch.randn(n, vocab, device=device) * 3
            pos = torch.arange(n, device=device) + 100
            for mode in csv(args.modes):
                st = SamplingTensors.build([MODES[mode]] * n, list(range(n)), device)
                us = graph_us([partial(sample, logits, st, pos, all_greedy=False)] * args.calls,
                              device, args.reps)
                rows.append([vocab, n, f"sample ({mode})", f"{us:.1f}"])
                print(*rows[-1], flush=True)
            for name, fn in pieces(logits, st, pos).items():
                us = graph_us([fn] * args.calls, device, args.reps)
                rows.append([vocab, n, name, f"{us:.1f}"])
                print(*rows[-1], flush=True)
    print_table(["vocab", "rows", "what", "us per call"], rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
