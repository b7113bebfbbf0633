"""Structured output's token masks on the CPU, for the default model's vocabulary (49,152 tokens).

  compute  ms to compute one user's allowed-token bitmask for the next token (llguidance, on the
           engine's worker thread), over walks through the test suite's 100 JSON schemas and a
           few regexes / grammars: each walk picks allowed tokens at random (seeded) until the
           grammar is complete or --steps tokens
  apply    ms to expand --rows bitmasks and mask the logits [rows, vocab] on the CPU (p50, min)
  wait     ms the backend waited for the masks after its forward (the part of compute left on
           the critical path), per decode step of --rows structured requests on the default
           model, beside the step's ms

docs/performance.md, "Structured output":
  python bench/structured_masks.py --rows 1,16
"""

from __future__ import annotations

import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from structured_schemas import schemas  # noqa: E402  (tests/: the 100 schemas of the tests)

import llm  # noqa: E402
from bench.common import csv, fmt, parser, print_table  # noqa: E402
from llm.backends.torch.token_masks import apply_token_masks  # noqa: E402
from llm.engine.contract.structured import StructuredOutput, TokenMasks  # noqa: E402
from llm.engine.grammar import Grammars  # noqa: E402
from llm.model.paths import default_cache_dir, default_model_path  # noqa: E402
from llm.model.tokenizer.tokenizer import Tokenizer  # noqa: E402

OTHERS = [StructuredOutput("json_object"), StructuredOutput("regex", r"[0-9]{3}-[a-z]{2,8}"),
          StructuredOutput("choice", choices=("positive", "negative", "neutral")),
          StructuredOutput("grammar", 'root ::= "(" [0-9]+ ("+" [0-9]+)* ")"')]


def _quantiles(ms: list[float]) -> list[str]:
    q = statistics.quantiles(ms, n=100)
    return [fmt(statistics.mean(ms), 3), fmt(q[49], 3), fmt(q[98], 3), fmt(max(ms), 3)]


def compute_ms(grammars: Grammars, specs: list[StructuredOutput], steps: int) -> list[float]:
    rng = random.Random(0)
    row = np.zeros(grammars.words, dtype=np.int32)
    times = []
    for spec in specs:
        m = grammars.matcher(spec)
        for _ in range(steps):
            t0 = time.perf_counter()
            m.fill(row)
            times.append((time.perf_counter() - t0) * 1e3)
            allowed = np.flatnonzero(np.unpackbits(row.view(np.uint8), bitorder="little"))
            m.consume(int(rng.choice(allowed[allowed < grammars.vocab_size])))
            if m.stopped:
                break
    return times


def apply_ms(rows: int, vocab: int, reps: int = 50) -> str:
    """'p50 (min)' ms of apply_token_masks on `rows` masked rows (the min: the machine's other
    work left out)."""
    from concurrent.futures import Future

    bits = np.full((rows, (vocab + 31) // 32), 0x55555555, dtype=np.int32)
    logits = torch.randn(rows, vocab)
    times = []
    for _ in range(reps):
        done: Future = Future()
        done.set_result(bits)
        t0 = time.perf_counter()
        apply_token_masks(logits, TokenMasks(tuple(range(rows)), done))
        times.append((time.perf_counter() - t0) * 1e3)
    return f"{statistics.median(times):.3f} ({min(times):.3f})"


def wait_ms(rows: int, steps: int) -> tuple[float, float]:
    """Median ms waited in TokenMasks.result per decode step, and median ms per decode step."""
    waits: list[float] = []
    original = TokenMasks.result

    def timed(self: TokenMasks) -> np.ndarray:
        t0 = time.perf_counter()
        out = original(self)
        waits.append((time.perf_counter() - t0) * 1e3)
        return out

    model = llm.LLM(max_batch=rows, max_seq_len=256, progress=False)
    params = [llm.SamplingParams(max_new_tokens=steps, structured=StructuredOutput.json_schema(s))
              for s in schemas()[:rows]]
    model.generate(["Reply in JSON."] * rows, params, chat=True)  # warm-up
    TokenMasks.result = timed
    try:
        t0 = time.perf_counter()
        outs = model.generate(["Reply in JSON."] * rows, params, chat=True)
        total = time.perf_counter() - t0
    finally:
        TokenMasks.result = original
    n = max(len(o.token_ids) for o in outs)
    model.close()
    return statistics.median(waits), total / n * 1e3


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--rows", default="1,16", help="comma list of structured users per step")
    p.add_argument("--steps", type=int, default=48, help="tokens per walk / request at most")
    args = p.parse_args(argv)
    tok = Tokenizer.from_path(default_model_path(), cache_dir=default_cache_dir())
    grammars = Grammars(tok, tok.vocab_size)
    t0 = time.perf_counter()
    grammars._vocabulary("bench")
    print(f"llguidance vocabulary of {tok.vocab_size} tokens built in "
          f"{time.perf_counter() - t0:.2f} s; torch threads {torch.get_num_threads()}")
    steps = 4 if args.smoke else args.steps
    json_specs = [StructuredOutput.json_schema(s) for s in schemas()]
    table = [["JSON schemas (100)", *_quantiles(compute_ms(grammars, json_specs, steps))],
             ["regex / choice / grammar / json_object",
              *_quantiles(compute_ms(grammars, OTHERS, steps))]]
    print_table(["compute, per user per step", "mean ms", "p50 ms", "p99 ms", "max ms"], table)
    rows = [1] if args.smoke else csv(args.rows, int)
    table = []
    threads = torch.get_num_threads()
    for r in rows:
        applied = []
        for n in sorted({1, threads}):
            torch.set_num_threads(n)
            applied.append(apply_ms(r, tok.vocab_size))
        torch.set_num_threads(threads)
        wait, step = wait_ms(r, 4 if args.smoke else args.steps)
        table.append([r, *applied, fmt(wait, 3), fmt(step, 1)])
    heads = [f"apply ms, {n} thread(s): p50 (min)" for n in sorted({1, threads})]
    print_table(["rows", *heads, "wait ms (p50)", "ms per token (whole run)"], table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
