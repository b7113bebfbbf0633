"""Time `lse_topk` (kernels/logprobs.py) against torch's logsumexp + topk on the GPU.

python bench/logprobs_kernel.py [--batch 32] [--vocab 128256] [--old PATH]

Each variant runs as a CUDA graph of 10 calls; prints us per call and whether the values equal
torch.topk's, for random, bfloat16-rounded (tied) and flat logits. --old PATH: also time another
version of the kernel module (e.g. `git show REV:llm/backends/torch/kernels/logprobs.py > f.py`).
"""

from __future__ import annotations

import argparse
import importlib.util

import torch

from llm.backends.torch.kernels.logprobs import lse_topk


def _time(fn, z: torch.Tensor, iters: int = 200) -> float:
    fn(z)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(10):
            fn(z)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / iters / 10


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--old", default=None, help="another version of the kernel module to time")
    args = p.parse_args()
    variants = {"lse_topk": lambda z: lse_topk(z, 20),
                "torch": lambda z: (torch.logsumexp(z, -1), torch.topk(z, 20, dim=-1))}
    if args.old:
        spec = importlib.util.spec_from_file_location("old_logprobs", args.old)
        old = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(old)
        variants["old"] = lambda z: old.lse_topk(z, 20)
    gen = torch.Generator(device="cuda").manual_seed(0)
    shape = (args.batch, args.vocab)
    cases = {"random": torch.randn(*shape, device="cuda", generator=gen) * 3,
             "bf16-rounded": (torch.randn(*shape, device="cuda", generator=gen) * 8)
             .bfloat16().float(),
             "flat": torch.zeros(*shape, device="cuda")}
    print("| logits | " + " | ".join(f"{v} us" for v in variants) + " | values equal torch's |")
    for name, z in cases.items():
        equal = torch.equal(lse_topk(z, 20)[1], torch.topk(z, 20, dim=-1).values)
        times = " | ".join(f"{_time(fn, z):.1f}" for fn in variants.values())
        print(f"| {name} | {times} | {equal} |")


if __name__ == "__main__":
    main()
