"""The CPU draw (`sample()`, llm/backends/torch/sampling.py `_draw_rows`) on real and synthetic
rows: ms a sampled row, one thread, best of --repeats calls of --rows rows each.

Real rows: the default model's logits (SmolLM2-135M-Instruct, `LLM()` on the CPU) captured at
every sampled step of four chat prompts (temperature 0.8, top_p 0.9, --steps tokens each);
then the same rows halved (flatter), and N(0, 3) and N(0, 1) logits of the same vocabulary.

    python bench/cpu_sampling.py                # ~1 min on 2 cores
    python bench/cpu_sampling.py --smoke        # 2 steps, 8 rows, one call
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import parser, print_table  # noqa: E402
from llm.backends.torch import sampling  # noqa: E402
from llm.engine.contract.sampling_params import SamplingParams  # noqa: E402

PROMPTS = ["Write a short story about a lighthouse keeper who finds a message in a bottle.",
           "Explain how a refrigerator works to a ten year old.",
           "List five tips for learning a new programming language.",
           "What are the main causes of the French Revolution?"]
MODES = {"temperature 0.8": SamplingParams(temperature=0.8, seed=1),
         "top_p 0.9": SamplingParams(temperature=0.8, top_p=0.9, seed=1),
         "top_k 50": SamplingParams(temperature=0.8, top_k=50, seed=1),
         "min_p 0.05": SamplingParams(temperature=0.8, min_p=0.05, seed=1)}


def captured_rows(model: str | None, steps: int) -> torch.Tensor:
    """The logits rows [n, V] the CPU draw saw while the model answered PROMPTS."""
    from llm.api.llm import LLM

    rows, draw = [], sampling._draw_rows

    def spy(logits, x, st, position):
        rows.append(logits.detach().float().clone())
        return draw(logits, x, st, position)

    sampling._draw_rows = spy
    try:
        with LLM(model, progress=False) as llm:
            llm.generate(PROMPTS, SamplingParams(temperature=0.8, top_p=0.9, seed=1,
                                                 max_new_tokens=steps), chat=True)
    finally:
        sampling._draw_rows = draw
    return torch.cat(rows)


def ms_a_row(x: torch.Tensor, params: SamplingParams, repeats: int) -> float:
    """Best of `repeats` calls of `sample()` over the rows x, ms a row."""
    n = len(x)
    col_hash = sampling.column_hashes(x.shape[1], "cpu")  # as the torch backend holds it
    st = sampling.SamplingTensors.build([params] * n, list(range(1, n + 1)), "cpu", col_hash)
    pos = torch.arange(n) + 5
    sampling.sample(x[:2], sampling.SamplingTensors.build([params] * 2, [1, 2], "cpu", col_hash),
                    pos[:2])
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        sampling.sample(x, st, pos)
        best = min(best, time.perf_counter() - t)
    return best / n * 1e3


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--model", default=None, help="model to capture rows from (default: the "
                                                 "default model)")
    p.add_argument("--steps", type=int, default=48)
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.smoke:
        args.steps, args.rows, args.repeats = 2, 8, 1
    real = captured_rows(args.model, args.steps)[: args.rows]
    g = torch.Generator().manual_seed(0)
    kinds = {"real": real, "real x 0.5": real * 0.5,
             "N(0, 3)": torch.randn(real.shape, generator=g) * 3,
             "N(0, 1)": torch.randn(real.shape, generator=g)}
    table = [[kind] + [f"{ms_a_row(x, params, args.repeats):.3f}" for params in MODES.values()]
             for kind, x in kinds.items()]
    print(f"{len(real)} rows of {real.shape[1]} tokens, {args.threads} thread(s)")
    print_table(["rows"] + list(MODES), table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
