"""Where a prefill's time goes: one prompt of --tokens random tokens through a random-weight model
(one user), including the greedy choice of its first token on the device.

Per model shape:
  CUDA events   from before the first launch to after the last (median of --reps): what the GPU
                took, idle gaps included
  host enqueue  host time until the call returned, nothing read back (median)
  kernel sum    the GPU kernels and copies of one prefill under the torch profiler; the events'
                time minus this is GPU idle time (the host launching slower than the GPU runs)
then the kernel time by category and the largest kernels, and the GEMMs' TFLOP/s over the
projections' FLOPs (2 x tokens x the layers' projection weights; the LM head, one row, aside).

Prefill runs eagerly and unpadded, as before v13; --graph replays the CUDA graph of the padded
length bucket (llm/backends/torch/prefill_graphs.py) instead. --rope-tokens N sets the RoPE +
K/V-write kernel's tokens per program (1 = the kernel before v10); --torch-argmax chooses the
first token by torch.argmax (before v11) instead of the split Triton argmax.

docs/performance.md, "Prefill profile" (2026-12-02, before v10) and v10, v13:
  python bench/prefill_profile.py --configs 1b,8b --tokens 2048 --rope-tokens 1 --torch-argmax
  python bench/prefill_profile.py --configs 1b,8b --tokens 2048
  python bench/prefill_profile.py --configs 1b,8b --tokens 128,2048 --graph
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    SHAPES,
    build_backend,
    category,
    configs_for,
    csv,
    device_for,
    dtype_for,
    kernel_times,
    parser,
    print_kernel_tables,
    print_table,
    random_prompts,
    set_rope_tokens,
    sync,
)
from llm.backends.torch.runner import TorchBackend  # noqa: E402
from llm.model.config import ModelConfig  # noqa: E402


def projection_flops(cfg: ModelConfig, tokens: int) -> float:
    """2 x tokens x the weights of every layer's qkv, o, gate/up and down projections."""
    h, q, kv, inter = cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.intermediate_size
    per_layer = h * (q + 2 * kv) + q * h + h * 2 * inter + inter * h
    return 2.0 * tokens * cfg.num_layers * per_layer


def prefill_fn(backend: TorchBackend, prompt: list[int], graph: bool, start: int = 0):
    """A call that enqueues the prefill of `prompt` at position `start` (a chunk continuing a
    sequence whose earlier K/V the cache holds) and its greedy first token, reading nothing."""
    model, device = backend.model, backend.device
    row = list(range(1, backend.runtime.blocks_per_seq + 1))
    tokens_t = torch.tensor(prompt, device=device)
    row_t = torch.tensor(row, device=device)

    def run() -> torch.Tensor:
        if graph:
            logits = backend.prefill_graphs.run(prompt, row, start)
        else:
            logits = model.prefill(tokens_t, start, row_t, backend.cache)
        return model.lm_head.argmax(logits[None])

    return run


def measure(run, device: torch.device, reps: int) -> tuple[float, float]:
    """(median CUDA-event ms, median host enqueue ms) of `run`; on the CPU both host times."""
    for _ in range(2):
        run()
    events, host = [], []
    for _ in range(reps):
        sync(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t = time.perf_counter()
        run()
        host.append(1e3 * (time.perf_counter() - t))
        if device.type == "cuda":
            end.record()
            end.synchronize()
            events.append(start.elapsed_time(end))
        else:
            events.append(host[-1])
    return statistics.median(events), statistics.median(host)


@torch.inference_mode()
def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--configs", default="1b,8b", help="comma list of: " + ", ".join(SHAPES))
    p.add_argument("--tokens", default="2048", help="comma list of prompt lengths")
    p.add_argument("--reps", type=int, default=10, help="prefills timed (median)")
    p.add_argument("--graph", action="store_true", help="the CUDA-graph prefill (v13)")
    p.add_argument("--start", type=int, default=0,
                   help="the prompt's first position (> 0: a chunk after cached tokens)")
    p.add_argument("--rope-tokens", type=int, default=None,
                   help="tokens per program of the prefill RoPE kernel (default: the engine's)")
    p.add_argument("--torch-argmax", action="store_true", help="the first token by torch.argmax")
    p.add_argument("--top", type=int, default=12, help="largest kernels listed")
    args = p.parse_args(argv)
    device, dtype = device_for(args), dtype_for(args)
    if args.graph and device.type != "cuda":
        sys.exit("--graph needs a CUDA GPU")
    lengths = csv(args.tokens, int)
    set_rope_tokens(args.rope_tokens)
    summary = []
    for name in configs_for(args, csv(args.configs)):
        cfg = SHAPES[name]
        backend = build_backend(cfg, device, dtype, 1, max(max(lengths) + args.start, 2048) + 8,
                                cuda_graphs=args.graph)
        if not args.graph:
            backend.prefill_graphs = None
        backend.model.lm_head.fused_argmax = not args.torch_argmax
        for n in lengths:
            run = prefill_fn(backend, random_prompts(1, n, cfg.vocab_size)[0], args.graph,
                             args.start)
            events_ms, host = measure(run, device, args.reps)
            print(f"\n## {name}, {n} tokens at {args.start}: CUDA events {events_ms:.2f} ms, "
                  f"host enqueue {host:.2f} ms", flush=True)
            times = kernel_times(run, device)
            kernels_ms = print_kernel_tables(times, top=args.top) / 1e3
            gemm_us = sum(us for k, (_, us) in times.items() if "GEMM" in category(k))
            tflops = projection_flops(cfg, n) / (gemm_us * 1e-6) / 1e12 if gemm_us else None
            summary.append([name, n, "graph" if args.graph else "eager", f"{events_ms:.2f}",
                            f"{host:.2f}", f"{kernels_ms:.2f}", f"{events_ms - kernels_ms:.2f}",
                            f"{gemm_us / 1e3:.2f}", "-" if tflops is None else f"{tflops:.0f}"])
        del backend, run
        if device.type == "cuda":
            torch.cuda.empty_cache()
    set_rope_tokens()
    print_table(["config", "tokens", "prefill", "CUDA events ms", "host enqueue ms",
                 "kernel sum ms", "GPU idle ms", "GEMM ms", "GEMM TFLOP/s"], summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
