"""Decode-sized all-reduces across the GPUs of one host: NCCL (dist.all_reduce) against the
symmetric-memory one-shot all-reduce the tensor-parallel decode uses (SymmetricAllReduce in
llm/backends/torch/parallel/mesh.py), in us per op: a CUDA graph of --calls all-reduces back to
back on every rank, replayed between CUDA events (median of --reps; rank 0's times). The tensors
hold zeros, so repeated sums stay finite. Run one process per GPU under torchrun (with --smoke:
gloo ranks on the CPU, NCCL column only).

docs/performance.md, v6 (2 x H200):
  NCCL_NVLS_ENABLE=0 torchrun --nproc-per-node 2 bench/allreduce_micro.py --shapes 1x4096,32x4096
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import csv, dtype_for, fmt, graph_us, parser, print_table  # noqa: E402
from llm.backends.torch.parallel.mesh import Mesh  # noqa: E402


def shape(text: str) -> tuple[int, ...]:
    return tuple(int(d) for d in text.split("x"))


@torch.inference_mode()
def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--shapes", default="1x4096,32x4096", help="comma list of tensor shapes")
    p.add_argument("--calls", type=int, default=64, help="all-reduces per CUDA graph")
    p.add_argument("--reps", type=int, default=10, help="graph replays timed (median)")
    args = p.parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world < 2:
        sys.exit("run one process per GPU: torchrun --nproc-per-node 2 bench/allreduce_micro.py")
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("allreduce_micro.py needs CUDA GPUs (--smoke: gloo ranks on the CPU)")
    mesh, dev = Mesh.from_env(world, "cpu" if args.smoke else "cuda")
    device, dtype = torch.device(dev), dtype_for(args)
    shapes = [shape(s) for s in csv(args.shapes)]
    symmetric = mesh.with_symmetric(dtype, device, max(math.prod(s) for s in shapes)).symmetric
    rows = []
    for s in shapes:
        x = torch.zeros(s, dtype=dtype, device=device)
        nccl = graph_us([lambda x=x: dist.all_reduce(x, group=mesh.group)] * args.calls, device,
                        args.reps)
        sym = None
        if symmetric is not None:
            sym = graph_us([lambda x=x: symmetric(x)] * args.calls, device, args.reps)
        rows.append(["x".join(map(str, s)), str(dtype).removeprefix("torch."),
                     f"{x.numel() * x.element_size() / 1024:g}", fmt(nccl), fmt(sym),
                     "-" if sym is None else f"{nccl / sym:.2f}x"])
    if mesh.leader:
        print(f"# {world} ranks, {mesh.library}; symmetric memory: "
              f"{'yes' if symmetric is not None else 'not available'}")
        print_table(["shape", "dtype", "KiB", f"{mesh.library} us/op", "symmetric us/op",
                     "speed-up"], rows)
    mesh.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
