"""Host time to launch one op: --calls launches back to back, timed by the host clock until the
last launch returns (nothing waits for the GPU; the queue never fills at these sizes), median of
--reps. On decode-sized tensors of a model's shapes: torch.add, F.linear, each of our Triton
kernels (the split argmax is two launches), and prefill SDPA over --tokens tokens. It says how
fast this machine's CPU can feed the GPU: a step whose kernels are shorter than their launches
is host-bound unless it runs as a CUDA graph.

docs/performance.md, "Prefill profile" (2026-12-02, host time):
  python bench/host_overhead.py --config 1b
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    SHAPES,
    configs_for,
    device_for,
    dtype_for,
    parser,
    print_table,
    sync,
)
from llm.backends.torch.kernels.argmax import max_argmax  # noqa: E402
from llm.backends.torch.kernels.gemv import gemv  # noqa: E402
from llm.backends.torch.kernels.norm import add_rms_norm  # noqa: E402
from llm.backends.torch.kernels.rope_kv import rope_and_cache  # noqa: E402
from llm.backends.torch.kernels.silu_mul import silu_mul  # noqa: E402
from llm.model.config import ModelConfig  # noqa: E402


def ops(cfg: ModelConfig, tokens: int, device: torch.device, dtype: torch.dtype) -> dict:
    """{label: a call launching the op} on one row (decode) or one prompt (SDPA)."""
    h, q, kv, hd = cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.head_dim
    g = torch.Generator(device=device).manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, device=device).to(dtype)

    x, r, w_norm, w = rand(1, h), rand(1, h), rand(h), rand(h, h)
    gate_up, logits = rand(1, 2 * cfg.intermediate_size), rand(1, cfg.vocab_size)
    qkv, cos, sin = rand(1, q + 2 * kv), rand(1, hd), rand(1, hd)
    pool_k, pool_v = rand(2, cfg.num_kv_heads, 32, hd), rand(2, cfg.num_kv_heads, 32, hd)
    page = torch.ones(1, dtype=torch.int64, device=device)
    offset = torch.zeros(1, dtype=torch.int64, device=device)
    sq = rand(1, cfg.num_heads, tokens, hd)
    sk, sv = rand(1, cfg.num_kv_heads, tokens, hd), rand(1, cfg.num_kv_heads, tokens, hd)
    return {
        "torch.add [1, H]": lambda: torch.add(x, r),
        "F.linear [1, H] x [H, H]": lambda: F.linear(x, w),
        "add_rms_norm (Triton)": lambda: add_rms_norm(x, r, w_norm, 1e-5),
        "silu_mul (Triton)": lambda: silu_mul(gate_up),
        "rope_and_cache, one token (Triton)": lambda: rope_and_cache(
            qkv, cos, sin, page, offset, pool_k, pool_v, cfg.num_heads),
        "gemv [1, H] x [H, H] (Triton)": lambda: gemv(x, w),
        "max_argmax over the vocabulary (Triton, 2 launches)": lambda: max_argmax(logits),
        f"SDPA, {tokens} tokens, causal GQA": lambda: F.scaled_dot_product_attention(
            sq, sk, sv, is_causal=True, enable_gqa=True),
    }


def host_us(fn, device: torch.device, calls: int, reps: int) -> float:
    """Median host us per launch of fn (after a warm-up that compiles)."""
    fn()
    times = []
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append(1e6 * (time.perf_counter() - t) / calls)
        sync(device)
    return statistics.median(times)


@torch.inference_mode()
def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--config", default="1b", help="one of: " + ", ".join(SHAPES))
    p.add_argument("--tokens", type=int, default=128, help="prompt length of the SDPA call")
    p.add_argument("--calls", type=int, default=200, help="launches timed together")
    p.add_argument("--reps", type=int, default=5, help="timings (median)")
    args = p.parse_args(argv)
    device, dtype = device_for(args), dtype_for(args)
    name = configs_for(args, [args.config])[0]
    rows = []
    for label, fn in ops(SHAPES[name], args.tokens, device, dtype).items():
        rows.append([name, label, f"{host_us(fn, device, args.calls, args.reps):.1f}"])
        print(" ".join(rows[-1]), flush=True)
    print_table(["config", "op", "host us per launch"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
