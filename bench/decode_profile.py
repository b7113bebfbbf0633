"""A decode step taken apart, on one GPU or, under torchrun, on --tp tensor-parallel ranks
(random weights, Llama shapes, CUDA graphs):

  host loop    ms per step through the backend as demos/benchmark.py drives it (rank 0 leads,
               the other ranks follow; the next step launched ahead)
  graph alone  ms per step replaying the step's CUDA graph --replays times back to back between
               CUDA events, on every rank, no host work between steps
  kernels      the step's kernels under the torch profiler (--profile-steps replays), per step:
               by category and the largest ones (rank 0's)

When the host loop takes no longer than the graph alone, the host (and, with --tp, the leader's
broadcast of each step) is hidden and the GPU is the limit.

docs/performance.md, v6 (probe and kernel profile):
  python bench/decode_profile.py --config 8b --batch 1
  python bench/decode_profile.py --config 8b --batch 16 --quant q4_0 --pdl off
  NCCL_NVLS_ENABLE=0 torchrun --nproc-per-node 2 bench/decode_profile.py --tp 2 --config 8b \\
      --batch 1
"""

from __future__ import annotations

import sys
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    SHAPES,
    build_backend,
    configs_for,
    decode_step_ms,
    dtype_for,
    eager_us,
    kernel_times,
    parser,
    print_kernel_tables,
    print_table,
    sync,
)
from llm.backends.torch.kernels import pdl  # noqa: E402
from llm.backends.torch.parallel.leader import LeaderBackend, follow  # noqa: E402
from llm.backends.torch.parallel.mesh import Mesh  # noqa: E402
from llm.backends.torch.runner import TorchBackend  # noqa: E402


def step_fn(backend: TorchBackend, batch: int, position: int):
    """One decode step with no host work: the captured graph's replay (its static inputs are
    those of the last step run); on the CPU (--smoke), the eager step on fixed inputs."""
    graphs = backend.graphs
    if graphs is not None:
        bucket = next(b for b in graphs.buckets if b >= batch)
        return graphs.graphs[(bucket, True, False, False)].replay  # greedy, no sort, no penalties
    dev, per = backend.device, backend.runtime.blocks_per_seq
    tokens = torch.zeros(batch, dtype=torch.int64, device=dev)
    positions = torch.full((batch,), position, dtype=torch.int64, device=dev)
    table = torch.arange(1, 1 + batch * per, device=dev).view(batch, per)
    return lambda: backend.model.decode(tokens, positions, table, backend.cache, position)


def main(argv: list[str] | None = None) -> int:
    """Parse the flags; with --pdl off, run the whole profile with PDL reported unsupported
    (every kernel then waits for its predecessor at launch, so the profiler's kernel times no
    longer overlap)."""
    args = _parse(argv)
    if args.pdl == "on":
        return _profile(args)
    with mock.patch.object(pdl, "_supported", lambda device: False):
        return _profile(args)


def _parse(argv: list[str] | None):
    p = parser(__doc__)
    p.add_argument("--config", default="8b", help="one of: " + ", ".join(SHAPES))
    p.add_argument("--batch", type=int, default=1, help="decode batch size")
    p.add_argument("--prompt-len", type=int, default=128, help="tokens of each user's prompt")
    p.add_argument("--steps", type=int, default=48, help="host-loop steps (2 not counted)")
    p.add_argument("--replays", type=int, default=100, help="graph replays timed together")
    p.add_argument("--profile-steps", type=int, default=5, help="steps under the profiler")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (under torchrun)")
    p.add_argument("--all-reduce", default="auto", choices=["auto", "nccl"],
                   help="--tp: decode all-reduces by symmetric memory where available, or NCCL")
    p.add_argument("--top", type=int, default=15, help="largest kernels listed")
    p.add_argument("--quant", default="", help="weights in random planes of this GGUF format or "
                   "mix (bench/quant_decode.py's names: q4_0, q8_0, q4_k_m, ...); bf16 if empty")
    p.add_argument("--pdl", default="on", choices=["on", "off"],
                   help="programmatic dependent launch; off: kernel times without overlap")
    return p.parse_args(argv)


def _profile(args) -> int:
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("decode_profile.py needs a CUDA GPU (--smoke checks the script on the CPU)")
    if args.smoke:  # each step runs Triton's interpreter on the CPU: a few suffice
        args.prompt_len, args.steps, args.replays, args.profile_steps = 16, 4, 2, 1
    mesh, dev = Mesh.from_env(args.tp, "cpu" if args.smoke and not torch.cuda.is_available()
                              else "cuda")
    device, dtype = torch.device(dev), dtype_for(args)
    name = configs_for(args, [args.config])[0]
    backend = build_backend(SHAPES[name], device, dtype, args.batch,
                            args.prompt_len + args.steps + 8, cuda_graphs=True, mesh=mesh,
                            all_reduce=args.all_reduce, quant=args.quant)
    if mesh.leader:
        print(f"# {backend.describe()}", flush=True)
        driver = LeaderBackend(backend, mesh) if mesh.size > 1 else backend
        loop_ms = decode_step_ms(driver, args.batch, args.prompt_len, args.steps)
        if mesh.size > 1:
            driver.close()
    else:
        follow(backend, mesh)
    with torch.inference_mode():
        step = step_fn(backend, args.batch, args.prompt_len + args.steps)
        alone_ms = eager_us(step, device, args.replays, reps=3) / 1e3

        def profiled() -> None:
            for _ in range(args.profile_steps):
                step()

        if mesh.leader:
            print(f"\n## {name}, tp={mesh.size}, batch {args.batch}: kernels per step",
                  flush=True)
            kernels_ms = print_kernel_tables(kernel_times(profiled, device),
                                             per=args.profile_steps, top=args.top) / 1e3
        else:
            profiled()
            sync(device)
    if mesh.leader:
        print_table(["config", "tp", "batch", "host loop ms/step", "graph alone ms/step",
                     "kernel sum ms/step"],
                    [[name, mesh.size, args.batch, f"{loop_ms:.3f}", f"{alone_ms:.3f}",
                      f"{kernels_ms:.3f}"]])
    mesh.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
