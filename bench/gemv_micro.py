"""Decode projections at small batch: cuBLAS (plus our separate norm and SiLU*up kernels) against
the fused Triton GEMVs of llm/backends/torch/kernels/gemv.py, in us per call.

Per projection of a model's decode layer (qkv with the residual add + RMSNorm, o_proj, gate/up
with the norm and SiLU*up, down), the LM head, and a whole layer's four projections. Columns:
  torch     F.linear (cuBLAS), kernels/norm.py before qkv and gate/up, kernels/silu_mul.py after
  dot       the GEMVs with the tensor-core dot (block sizes: the engine's rule for > 1 row)
  fma rule  the GEMVs with the one-row CUDA-core path and the engine's block sizes (one row only)
  fma best  with --sweep: the fastest one-row block (BLOCK_N 2-32 x BLOCK_K 256-1024)
Each cell is a CUDA graph of back-to-back calls (at least --calls), replayed between CUDA events.
With --l2-multiple M the calls cycle over copies of the weights that together take M times the
L2 cache, so no call finds its weights in L2; with 0 every call reads the same weights.

docs/performance.md, v7 (H100) and v8 (H200):
  python bench/gemv_micro.py --configs 1b,8b --rows 1,4 --paths torch,dot --calls 20 \\
      --l2-multiple 0                                                              # v7
  python bench/gemv_micro.py --configs 1b,8b,smollm2 --rows 1 --sweep              # v8
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    SHAPES,
    configs_for,
    copy_bandwidth,
    csv,
    device_for,
    dot_config,
    dtype_for,
    fmt,
    graph_us,
    l2_bytes,
    parser,
    print_table,
)
from llm.backends.torch.kernels.gemv import (  # noqa: E402
    GemvConfig,
    gemv,
    gemv_config,
    norm_gate_up_silu_gemv,
    norm_gemv,
)
from llm.backends.torch.kernels.norm import add_rms_norm  # noqa: E402
from llm.backends.torch.kernels.silu_mul import silu_mul  # noqa: E402
from llm.model.config import ModelConfig  # noqa: E402

PROJECTIONS = ("qkv", "o", "gate_up", "down", "lm_head")
LABELS = {"qkv": "qkv + norm", "o": "o_proj", "gate_up": "gate/up + norm + SiLU*up",
          "down": "down", "lm_head": "LM head", "layer": "layer (4 projections + norms + SiLU)"}
SWEEP_N = (2, 4, 8, 16, 32)
SWEEP_K = (256, 512, 1024)
EPS = 1e-5


def weight_shape(cfg: ModelConfig, proj: str) -> tuple[int, int]:
    """[N, K] of a projection's weight (gate/up: the fused [2I, H])."""
    h, q, kv, inter = cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.intermediate_size
    return {"qkv": (q + 2 * kv, h), "o": (h, q), "gate_up": (2 * inter, h), "down": (h, inter),
            "lm_head": (cfg.vocab_size, h)}[proj]


class Projection:
    """One projection's weight copies and inputs for `rows` rows of activations."""

    def __init__(self, cfg: ModelConfig, proj: str, rows: int, copies: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        n, k = weight_shape(cfg, proj)
        self.proj, self.n, self.k = proj, n, k
        self.norm, self.glu = proj in ("qkv", "gate_up"), proj == "gate_up"
        self.out_n = n // 2 if self.glu else n  # the GEMV's output columns (gate/up: I)
        self.w = [torch.randn(n, k, device=device, dtype=dtype) * k ** -0.5
                  for _ in range(copies)]
        self.x = torch.randn(rows, k, device=device, dtype=dtype)
        self.residual = torch.randn(rows, k, device=device, dtype=dtype)
        self.norm_w = torch.ones(k, device=device, dtype=dtype)
        self.bytes = n * k * self.w[0].element_size()

    def call(self, path: str, copy: int, config: GemvConfig | None) -> Callable[[], object]:
        """One call on weight copy `copy`: path 'torch', or a GEMV with `config`."""
        w, x, r, nw = self.w[copy], self.x, self.residual, self.norm_w
        if path == "torch":
            if self.glu:
                return lambda: silu_mul(F.linear(add_rms_norm(x, r, nw, EPS)[0], w))
            if self.norm:
                return lambda: F.linear(add_rms_norm(x, r, nw, EPS)[0], w)
            return lambda: F.linear(x, w)
        if self.glu:
            return lambda: norm_gate_up_silu_gemv(x, r, nw, EPS, w, config=config)
        if self.norm:
            return lambda: norm_gemv(x, r, nw, EPS, w, config=config)
        return lambda: gemv(x, w, config=config)

    def config(self, path: str, n_sm: int) -> GemvConfig | None:
        """The engine's block sizes for `path` ('dot' or 'fma'), None for 'torch'."""
        elem = self.x.element_size()
        if path == "dot":
            return dot_config(self.out_n, self.k, self.glu, elem, n_sm, self.norm)
        if path == "fma":
            return gemv_config(1, self.out_n, self.k, self.glu, elem, n_sm, self.norm)
        return None

    def sweep(self) -> list[GemvConfig]:
        """The one-row blocks to sweep (BLOCK_K capped at K, as the engine caps it)."""
        cap = max(16, 1 << (self.k - 1).bit_length())
        blocks = sorted({(bn, min(bk, cap)) for bn in SWEEP_N for bk in SWEEP_K})
        return [GemvConfig(bn, bk, num_warps=4, num_stages=3, fma=True) for bn, bk in blocks]


def time_op(projs: list[Projection], path: str, configs: list[GemvConfig | None],
            copies: int, calls: int, device: torch.device, reps: int) -> float:
    """us per op (one projection, or a layer's projections in sequence) over the copies."""
    ops = []
    for i in range(max(calls, copies)):
        parts = [p.call(path, i % copies, c) for p, c in zip(projs, configs)]
        ops.append(parts[0] if len(parts) == 1 else (lambda parts=parts: [f() for f in parts]))
    return graph_us(ops, device, reps)


def block(c: GemvConfig | None) -> str:
    return f"{c.block_n} x {c.block_k}" if c is not None else "-"


@torch.inference_mode()
def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--configs", default="1b,8b,smollm2", help="comma list of: " + ", ".join(SHAPES))
    p.add_argument("--rows", default="1", help="comma list of activation rows (batch), <= 16")
    p.add_argument("--ops", default=",".join((*PROJECTIONS, "layer")),
                   help="comma list of: " + ", ".join((*PROJECTIONS, "layer")))
    p.add_argument("--paths", default="torch,dot,fma", help="comma list of: torch, dot, fma")
    p.add_argument("--sweep", action="store_true", help="add the fastest one-row block")
    p.add_argument("--calls", type=int, default=16, help="least calls per CUDA graph")
    p.add_argument("--l2-multiple", type=float, default=2.5,
                   help="weight copies total this many L2 caches (0: one copy)")
    p.add_argument("--reps", type=int, default=10, help="graph replays timed (median)")
    args = p.parse_args(argv)
    device, dtype = device_for(args), dtype_for(args)
    paths = csv(args.paths)
    n_sm = (torch.cuda.get_device_properties(device).multi_processor_count
            if device.type == "cuda" else 132)
    bw = copy_bandwidth(device)
    l2 = l2_bytes(device)
    print(f"# {device} {dtype}, copy bandwidth {bw / 1e9:.0f} GB/s, L2 {l2 >> 20} MiB", flush=True)
    rows_out = []
    for name in configs_for(args, csv(args.configs)):
        cfg = SHAPES[name]
        for rows in csv(args.rows, int):
            for op in csv(args.ops):
                names = PROJECTIONS[:4] if op == "layer" else (op,)
                nbytes = sum(math.prod(weight_shape(cfg, n)) for n in names) * dtype.itemsize
                copies = max(1, math.ceil(args.l2_multiple * l2 / nbytes)) if l2 else 1
                projs = [Projection(cfg, n, rows, copies, device, dtype) for n in names]
                cells: dict[str, float | None] = {}
                rule = None
                for path in paths:
                    if path == "fma" and rows != 1:
                        cells[path] = None  # the one-row path takes one row
                        continue
                    configs = [pr.config(path, n_sm) for pr in projs]
                    rule = configs[0] if path == "fma" else rule
                    cells[path] = time_op(projs, path, configs, copies, args.calls, device,
                                          args.reps)
                best, best_cfg = None, None
                if args.sweep and rows == 1 and op != "layer":
                    for c in projs[0].sweep():
                        us = time_op(projs, "fma", [c], copies, args.calls, device, args.reps)
                        if best is None or us < best:
                            best, best_cfg = us, c
                timed = [v for v in [*cells.values(), best] if v is not None]
                gbps = nbytes / (min(timed) * 1e-6) / 1e9 if timed else None
                row = [name, LABELS[op], rows, f"{nbytes / 1e6:.1f}", copies]
                row += [fmt(cells.get(path)) for path in ("torch", "dot")]
                rule_text = "-" if cells.get("fma") is None else (
                    f"{fmt(cells['fma'])} ({block(rule)})" if op != "layer" else fmt(cells["fma"]))
                row += [rule_text, f"{fmt(best)} ({block(best_cfg)})" if best else "-"]
                row += [fmt(gbps, 0), fmt(gbps and 100 * gbps * 1e9 / bw, 0)]
                rows_out.append(row)
                print(" ".join(str(x) for x in row), flush=True)
                del projs
    print_table(["config", "op", "rows", "MB", "copies", "torch us", "dot us", "fma rule us",
                 "fma best us (block)", "GB/s (fastest)", "% copy bw"], rows_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
