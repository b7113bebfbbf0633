"""Prefill A/B of the RoPE + K/V write in one process: one backend per model shape (random
weights), built once; per variant every layer's attention switched, the variants alternated
--repeats times. A cell is the time of one eager prefill of one random prompt including the
choice of its first token (backend.prefill, as TTFT; unpadded, no CUDA graph: prefill as before
v13): the median and the minimum of --prefills after --warmup.

Variants:
  torch  RoPE by torch ops (rotate-half) and the K/V write by index_put
  N      the fused Triton RoPE + K/V-write kernel with N tokens per program (a power of two;
         the engine takes 32 for prompts of more than 128 tokens; the kernel of v4 took 1)

docs/performance.md:
  python bench/prefill_rope_ab.py --configs 1b,8b --prompt-len 2048 --variants 1,torch \\
      --prefills 8 --repeats 2                                                   # v4
  python bench/prefill_rope_ab.py --configs 1b,8b --prompt-len 2048 --variants 1,8,16,32,64 \\
      --prefills 12 --repeats 2                                                  # v10
"""

from __future__ import annotations

import functools
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    GREEDY,
    SHAPES,
    build_backend,
    configs_for,
    csv,
    device_for,
    dtype_for,
    host_ms,
    parser,
    print_table,
    random_prompts,
    set_rope_tokens,
)
from llm.backends.torch.runner import TorchBackend  # noqa: E402
from llm.engine.contract.backend import PrefillInput  # noqa: E402


def apply(backend: TorchBackend, variant: str) -> None:
    """Switch every layer's prefill RoPE to `variant` ('torch' or tokens per program)."""
    fused = variant != "torch"
    if fused and (not variant.isdigit() or int(variant) & (int(variant) - 1) or variant == "0"):
        sys.exit(f"variant {variant!r}: 'torch' or a power of two (tokens per program)")
    for layer in backend.model.layers:
        layer.attn.fused_rope = fused
    set_rope_tokens(int(variant) if fused else None)


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--configs", default="1b,8b", help="comma list of: " + ", ".join(SHAPES))
    p.add_argument("--prompt-len", type=int, default=2048, help="tokens of the prompt")
    p.add_argument("--variants", default="32,torch", help="comma list of variants (see above)")
    p.add_argument("--prefills", type=int, default=12, help="prefills timed per variant and run")
    p.add_argument("--warmup", type=int, default=2, help="prefills not timed, per variant and run")
    p.add_argument("--repeats", type=int, default=2, help="alternations of all the variants")
    args = p.parse_args(argv)
    device, dtype = device_for(args), dtype_for(args)
    variants = csv(args.variants)
    rows = []
    for name in configs_for(args, csv(args.configs)):
        cfg = SHAPES[name]
        backend = build_backend(cfg, device, dtype, 1, args.prompt_len + 8)
        backend.prefill_graphs = None  # eager and unpadded
        prompt = random_prompts(1, args.prompt_len, cfg.vocab_size)[0]
        row = list(range(1, backend.runtime.blocks_per_seq + 1))
        prefill = functools.partial(backend.prefill, PrefillInput(0, prompt, 0, row, GREEDY))
        runs: dict[str, list[tuple[float, float]]] = {}
        for r in range(args.repeats):
            for v in variants:
                apply(backend, v)
                for _ in range(args.warmup):
                    prefill()
                times = [host_ms(prefill, device) for _ in range(args.prefills)]
                runs.setdefault(v, []).append((statistics.median(times), min(times)))
                print(f"{name} run {r + 1} {v}: median {runs[v][-1][0]:.2f} ms, "
                      f"min {runs[v][-1][1]:.2f} ms", flush=True)
        set_rope_tokens()
        base = statistics.median(m for m, _ in runs[variants[0]])
        for v in variants:
            med = statistics.median(m for m, _ in runs[v])
            rows.append([name, args.prompt_len, v,
                         " and ".join(f"{m:.2f}/{lo:.2f}" for m, lo in runs[v]),
                         f"{med:.2f}", f"{med - base:+.2f}"])
        del backend, prefill
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print_table(["config", "prompt", "variant", "median/min ms, each run", "median",
                 "ms vs first"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
