"""Prefill attention by each of torch's SDPA backends, at a model's shapes: causal, grouped-query
(enable_gqa, K/V with the model's KV heads), one prompt of --tokens tokens, as Attention.prefill
calls it. us per call: --calls calls back to back between CUDA events, median of --reps. The
last column names the kernel torch picks by itself (the longest kernel of one default call).

docs/performance.md, "Prefill profile" (2026-12-02):
  python bench/sdpa_backends.py --configs 1b,8b --tokens 2048
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    SHAPES,
    configs_for,
    csv,
    device_for,
    dtype_for,
    eager_us,
    fmt,
    kernel_times,
    parser,
    print_table,
)

BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


@torch.inference_mode()
def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--configs", default="1b,8b", help="comma list of: " + ", ".join(SHAPES))
    p.add_argument("--tokens", default="2048", help="comma list of prompt lengths")
    p.add_argument("--backends", default=",".join(BACKENDS),
                   help="comma list of: " + ", ".join(BACKENDS))
    p.add_argument("--calls", type=int, default=20, help="calls between two CUDA events")
    p.add_argument("--reps", type=int, default=5, help="timings (median)")
    args = p.parse_args(argv)
    device, dtype = device_for(args), dtype_for(args)
    names = csv(args.backends)
    rows = []
    for name in configs_for(args, csv(args.configs)):
        cfg = SHAPES[name]
        for n in csv(args.tokens, int):
            g = torch.Generator(device=device).manual_seed(0)
            q = torch.randn(1, cfg.num_heads, n, cfg.head_dim, generator=g, device=device)
            k = torch.randn(1, cfg.num_kv_heads, n, cfg.head_dim, generator=g, device=device)
            v = torch.randn(1, cfg.num_kv_heads, n, cfg.head_dim, generator=g, device=device)
            q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)

            def attend(q=q, k=k, v=v) -> torch.Tensor:
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

            cells = []
            for backend in names:
                try:
                    with sdpa_kernel(BACKENDS[backend]):
                        cells.append(eager_us(attend, device, args.calls, args.reps))
                except RuntimeError as e:  # this backend does not take these inputs
                    print(f"{name} {n} {backend}: {str(e).splitlines()[0]}", flush=True)
                    cells.append(None)
            times = kernel_times(attend, device)
            picked = max(times, key=lambda kernel: times[kernel][1]) if times else "-"
            rows.append([name, n, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                         *[fmt(c) for c in cells], picked[:60]])
            print(" ".join(str(x) for x in rows[-1]), flush=True)
    print_table(["config", "tokens", "heads", "KV heads", "head dim",
                 *[f"{b} us" for b in names], "default's kernel"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
