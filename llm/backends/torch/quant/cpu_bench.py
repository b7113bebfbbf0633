"""Timing of the CPU quantized linears against dense `F.linear` at the default model's shapes.

    python -m llm.backends.torch.quant.cpu_bench [--threads 1 2] [--ms 1 4 16 128] [--sweep]
    python -m llm.backends.torch.quant.cpu_bench --q6k [--threads 1 2] [--ms 1 4]

Prints ms per call (best of 5 rounds) for float32 / bfloat16 / float16 `F.linear` and for
`prepare_cpu(w, bfloat16)` (`q`), then the decode estimate at batch 1 from the M = 1 column:
1000 / (layers * sum of the per-layer linears + LM head) tokens/s (linears only). `--sweep` times
whole steps over 30 distinct layers instead (cold caches, as in the model). `--q6k`: a Q6_K
matrix on the C kernels (`native`) against its dense float32 copy (what Q6_K ran as before), float32
activations, warm (one matrix) and cold (LAYERS distinct copies in turn), with the bytes each holds.
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from llm.backends.torch.quant.cpu import prepare_cpu
from llm.model.quant.registry import get_format
from llm.model.quant.tensor import QuantizedTensor

LAYERS = 30
# name -> (format, N out, K in): SmolLM2-135M (Q4_1 layers, Q8_0 tied embedding as LM head)
SHAPES = {
    "qkv": ("q4_1", 1728, 576),
    "gate_up": ("q4_1", 3072, 576),
    "down": ("q4_1", 576, 1536),
    "o": ("q4_1", 576, 576),
    "lm_head": ("q8_0", 49152, 576),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def random_weight(fmt: str, n: int, k: int) -> QuantizedTensor:
    """Random codes and small random scales (timing does not depend on the values)."""
    planes = {}
    for p in get_format(fmt).planes:
        shape = (n, p.width(k))
        if p.dtype.is_floating_point:
            planes[p.name] = (torch.rand(shape) * 0.01).to(p.dtype)
        else:
            info = torch.iinfo(p.dtype)
            planes[p.name] = torch.randint(info.min, info.max + 1, shape, dtype=p.dtype)
    return QuantizedTensor(fmt, (n, k), planes)


def best_ms(fn: Callable[[], object], calls: int, rounds: int = 5) -> float:
    """Best over `rounds` of the mean time of `calls` calls, in ms."""
    for _ in range(2):
        fn()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e3


def bench_shape(fmt: str, n: int, k: int, m: int, calls: int) -> dict[str, float]:
    """{"fp32" | "bf16" | "fp16" | "q": ms per call} for one [n, k] weight at batch m."""
    w = random_weight(fmt, n, k)
    x = torch.randn(m, k)
    row = {}
    for key, dtype in DTYPES.items():
        dense, xd = w.dequantize(dtype), x.to(dtype)
        row[key] = best_ms(lambda: F.linear(xd, dense), calls)  # noqa: B023 (called right here)
    q, xb = prepare_cpu(w, torch.bfloat16), x.to(torch.bfloat16)
    row["q"] = best_ms(lambda: q(xb), calls)
    return row


def bench(ms: list[int], calls: int) -> dict[tuple[str, int], dict[str, float]]:
    """{(shape name, M): {"fp32" | "bf16" | "fp16" | "q": ms}}."""
    results = {}
    for name, (fmt, n, k) in SHAPES.items():
        for m in ms:
            reps = max(1, calls // (1 + m // 8) // (10 if name == "lm_head" else 1))
            results[(name, m)] = bench_shape(fmt, n, k, m, reps)
    return results


def sweep(m: int, rounds: int = 5) -> dict[str, float]:
    """{"fp32" | "bf16" | "fp16" | "q": ms} for the linears of one whole forward step at batch m:
    LAYERS distinct layers and the LM head, so that, as in the model, no weight is still in the
    caches when it is read again (a loop over one weight keeps a few MB in L2/L3).
    """
    layers = [[random_weight(*SHAPES[s]) for s in SHAPES if s != "lm_head"] for _ in range(LAYERS)]
    weights = [w for layer in layers for w in layer] + [random_weight(*SHAPES["lm_head"])]
    x = {k: torch.randn(m, k) for k in {w.in_features for w in weights}}
    result = {}
    for key, dtype in (*DTYPES.items(), ("q", torch.bfloat16)):
        if key == "q":
            linears = [prepare_cpu(w, dtype) for w in weights]
            calls = [(lin, x[lin.in_features].to(dtype)) for lin in linears]
        else:
            calls = [(functools.partial(F.linear, weight=w.dequantize(dtype)),
                      x[w.in_features].to(dtype)) for w in weights]

        def step(calls=calls) -> None:
            for fn, xs in calls:
                fn(xs)

        result[key] = best_ms(step, 1, rounds)
        del calls
    return result


# Q6_K needs K a multiple of 256: of the default model's matrices only down (K = 1536) can be
# Q6_K; the LM head's K = 576 cannot, so its stand-in has the next legal K
Q6K_SHAPES = {"down": (576, 1536), "head_k768": (49152, 768)}


def _q6k_row(x: torch.Tensor, dense: list, native: list, reps: int) -> str:
    """Warm (the first matrix again and again) and cold (each matrix in turn) ms per call."""
    warm = (best_ms(lambda: F.linear(x, dense[0]), reps), best_ms(lambda: native[0](x), reps))
    cold = tuple(best_ms(lambda fn=fn, ws=ws: [fn(w) for w in ws], 1) / len(ws) for fn, ws in
                 ((lambda d: F.linear(x, d), dense), (lambda q: q(x), native)))
    return (f"warm fp32 {warm[0]:.3f} native {warm[1]:.3f} ms ({warm[0] / warm[1]:.2f}x); "
            f"cold fp32 {cold[0]:.3f} native {cold[1]:.3f} ms ({cold[0] / cold[1]:.2f}x)")


def bench_q6k(ms: list[int], calls: int) -> None:
    """Prints ms per call of dense float32 `F.linear` and of the C kernels on Q6_K weights, and
    the MB each form holds (distinct copies: LAYERS, or 3 of the LM head, beyond the L3)."""
    import tempfile

    from llm.backends.torch.quant.native import load_kernels

    kernels = load_kernels(Path(tempfile.mkdtemp()))
    for name, (n, k) in Q6K_SHAPES.items():
        copies = [random_weight("q6_k", n, k) for _ in range(LAYERS if n * k < 2**22 else 3)]
        dense = [w.dequantize(torch.float32) for w in copies]
        native = [prepare_cpu(w, torch.float32, kernels=kernels) for w in copies]
        mb = (4 * n * k / 2**20, native[0].nbytes / 2**20, copies[0].nbytes / 2**20)
        print(f"  {name:9s} {n}x{k}: MB dense fp32 {mb[0]:.1f}, native {mb[1]:.1f}, "
              f"stored {mb[2]:.1f}")
        for m in ms:
            reps = max(1, calls // (10 if n > 10000 else 1))
            print(f"    M={m}: " + _q6k_row(torch.randn(m, k), dense, native, reps))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--ms", type=int, nargs="+", default=[1, 4, 16, 128])
    parser.add_argument("--calls", type=int, default=40)
    parser.add_argument("--sweep", action="store_true",
                        help="time whole steps over distinct layer weights instead")
    parser.add_argument("--q6k", action="store_true",
                        help="Q6_K on the C kernels against its dense float32 copy")
    args = parser.parse_args()
    if args.q6k:
        for threads in args.threads:
            torch.set_num_threads(threads)
            print(f"threads {threads}")
            bench_q6k(args.ms, args.calls)
        return
    if args.sweep:
        for threads in args.threads:
            torch.set_num_threads(threads)
            for m in args.ms:
                row = sweep(m)
                print(f"threads {threads} M={m}: " + ", ".join(
                    f"{k} {v:.1f} ms ({1e3 / v:.0f} steps/s)" for k, v in row.items()))
        return
    for threads in args.threads:
        torch.set_num_threads(threads)
        results = bench(args.ms, args.calls)
        print(f"threads {threads}")
        print(f"  {'shape':8s} {'N x K':>11s} {'M':>4s}" + "".join(f"{c:>9s}" for c in
                                                              (*DTYPES, "q")))
        for (name, m), row in results.items():
            _, n, k = SHAPES[name]
            print(f"  {name:8s} {f'{n}x{k}':>11s} {m:4d}" + "".join(f"{v:9.3f}" for v in
                                                                 row.values()))
        if 1 in args.ms:
            for key in (*DTYPES, "q"):
                layer = sum(results[(s, 1)][key] for s in SHAPES if s != "lm_head")
                total = LAYERS * layer + results[("lm_head", 1)][key]
                print(f"  decode M=1 {key:5s}: {total:7.2f} ms/token -> {1e3 / total:6.1f} tok/s")


if __name__ == "__main__":
    main()
