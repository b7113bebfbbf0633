"""Decode steps of a batch holding a structured-output request on a GPU: the masked CUDA graphs
(the masks applied inside the graph, no step launched ahead) against eager decode (what a
constrained batch ran before them) and against the pipelined graphs of an unconstrained batch.

    python bench/structured_decode.py --configs 1b,8b --batches 1,8

Random weights; every user of the batch is masked (all tokens allowed, so the tokens are those of
unmasked greedy decode: checked), the mask bits handed over already computed. A cell is the
median host time of one decode step (ms), as demos/benchmark.py measures it.
"""

from __future__ import annotations

import statistics
import sys
import time
from concurrent.futures import Future
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    GREEDY,
    SHAPES,
    build_backend,
    configs_for,
    csv,
    device_for,
    dtype_for,
    parser,
    print_table,
    random_prompts,
)
from llm.engine.contract.backend import DecodeInput, PrefillInput  # noqa: E402
from llm.engine.contract.structured import TokenMasks  # noqa: E402
from llm.engine.paged_kv import PageTable, PageTableSpec  # noqa: E402


def all_allowed(rows: int, vocab: int) -> TokenMasks:
    done: Future = Future()
    done.set_result(np.full((rows, (vocab + 31) // 32), -1, dtype=np.int32))
    return TokenMasks(tuple(range(rows)), done)


def steps(backend, batch: int, prompt_len: int, n: int, masked: bool) -> tuple[float, list]:
    """Median ms per decode step over n greedy steps (2 not counted) and the tokens."""
    rt, vocab = backend.runtime, backend.config.vocab_size
    pages = PageTable(PageTableSpec(rt.total_blocks, rt.block_size, rt.blocks_per_seq),
                      rt.max_batch)
    last = []
    for slot, prompt in enumerate(random_prompts(batch, prompt_len, vocab)):
        pages.reserve(slot, prompt_len + n + 1)
        last.append(backend.prefill(PrefillInput(slot, prompt, 0, pages.row(slot), GREEDY)))
    slots, times, out = list(range(batch)), [], []
    for i in range(n):
        allowed = all_allowed(batch, vocab) if masked else None
        t = time.perf_counter()
        last = backend.decode_step(DecodeInput(slots, last, [prompt_len + i] * batch,
                                               pages.table(slots), [GREEDY] * batch,
                                               allowed)).tokens
        times.append(time.perf_counter() - t)
        out.append(list(last))
    for slot in slots:
        pages.release(slot)
    return 1e3 * statistics.median(times[2:]), out


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--configs", default="1b", help="comma list of: " + ", ".join(SHAPES))
    p.add_argument("--batches", default="1,8", help="comma list of decode batch sizes")
    p.add_argument("--prompt-len", type=int, default=128, help="tokens of each user's prompt")
    p.add_argument("--steps", type=int, default=48, help="decode steps per cell (2 not counted)")
    args = p.parse_args(argv)
    device, dtype = device_for(args), dtype_for(args)
    batches = csv(args.batches, int)
    rows = []
    for name in configs_for(args, csv(args.configs)):
        backend = build_backend(SHAPES[name], device, dtype, max(batches),
                                args.prompt_len + args.steps + 8, cuda_graphs=True)
        for b in batches:
            free, ref = steps(backend, b, args.prompt_len, args.steps, masked=False)
            graphed, tokens = steps(backend, b, args.prompt_len, args.steps, masked=True)
            graphs, backend.graphs = backend.graphs, None  # eager, as constrained batches ran
            eager, eager_tokens = steps(backend, b, args.prompt_len, args.steps, masked=True)
            backend.graphs = graphs
            same = tokens == ref == eager_tokens
            rows.append([name, b, f"{free:.3f}", f"{graphed:.3f}", f"{eager:.3f}",
                         f"{eager / graphed:.2f}x", same])
            print(rows[-1], flush=True)
        backend.close()
    print_table(["config", "batch", "unmasked, graphs ms", "masked, graphs ms",
                 "masked, eager ms", "eager / masked graphs", "tokens equal"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
