"""The default model on the CPU in each dtype and weights mode: load time, weight bytes, decode
tok/s and TTFT at batch 1, and where its greedy tokens first differ from float32's.

    python bench/cpu_modes.py
    python bench/cpu_modes.py --modes float32:dequantize,bfloat16:stored --tokens 48

The prompts are the golden prompts of tests/test_default_model.py (whose float32 tokens equal
transformers'). Backs the CPU table of docs/performance.md ("Quantized weights as stored").
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import llm  # noqa: E402

PROMPTS = [
    "Once upon a time",
    "The capital of France is",
    "Here is a short list of reasons why people enjoy hiking in the mountains during summer:",
]
DEFAULT_MODES = ("float32:dequantize,float16:dequantize,bfloat16:dequantize,bfloat16:stored,"
                 "float16:stored")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--modes", default=DEFAULT_MODES, help="comma list of DTYPE:WEIGHTS; the "
                   "first is the reference for the greedy comparison")
    p.add_argument("--tokens", type=int, default=48, help="new tokens per prompt")
    args = p.parse_args(argv)
    params = llm.SamplingParams(max_new_tokens=args.tokens)
    reference = None
    print("| dtype | weights | load s | weight MB | decode tok/s | TTFT ms | first difference |")
    print("|---|---|---|---|---|---|---|")
    for mode in args.modes.split(","):
        dtype, weights = mode.split(":")
        t = time.perf_counter()
        model = llm.LLM(max_batch=1, max_seq_len=256, progress=False, dtype=dtype,
                        weights=weights)
        load = time.perf_counter() - t
        outs = [model.generate([q], params)[0] for q in PROMPTS]
        reference = reference or outs
        diffs = [next((i for i, (a, b) in enumerate(zip(o.token_ids, r.token_ids)) if a != b),
                      None) for o, r in zip(outs, reference)]
        rate = statistics.median(o.decode_tok_s for o in outs)
        ttft = statistics.median(o.ttft_s for o in outs)
        print(f"| {dtype} | {weights} | {load:.1f} | {model.backend.weight_bytes / 1e6:.1f} | "
              f"{rate:.1f} | {1e3 * ttft:.0f} | {diffs} |", flush=True)
        model.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
