"""A prompt chunk that continues a sequence (a prefix-cache hit's tail, a long prompt's later
chunks): eager as before against the CUDA-graph continuation chunk (llm/backends/torch/
prefill_graphs.py), random weights of a model's shapes, one user.

Paths, each including the greedy choice of the first token on the device:
  eager         model.prefill at an int start: the cached keys gathered, SDPA with a bool mask
                [S, start + S] (the path of every continuation chunk before)
  padded eager  the padded chunk with the start on the device, the Triton paged prefill
                attention, launched op by op (the backend's eager mode; same bits as the graph)
  graph         the same as one CUDA-graph replay
Columns: CUDA events around the call (GPU time plus idle gaps: what a user waits for), host
enqueue time, and the kernels' sum under the torch profiler (GPU work; a replay's kernels are
recorded as graph nodes where CUPTI supports it, else the graph row's sum reads ~0: then its
CUDA events are the GPU time). Then the attention of one
layer alone, gather + SDPA against the paged prefill kernel (its tiling and key splits as the
engine picks them, and the same tiles unsplit), each captured in a CUDA graph.

docs/performance.md, "H200: prefix caching (issue 16)", continuation chunks in CUDA graphs:
  python bench/continuation_prefill.py --configs 1b --starts 1536 --tokens 64
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    SHAPES,
    build_backend,
    configs_for,
    csv,
    device_for,
    dtype_for,
    graph_us,
    kernel_times,
    parser,
    print_table,
    random_prompts,
)
from bench.prefill_profile import measure  # noqa: E402
from llm.backends.torch.kernels.paged_prefill import (  # noqa: E402
    paged_prefill_attention,
    rows_per_program,
    splits_per_tile,
)
from llm.backends.torch.prefill_graphs import bucket_for, prefill_buckets  # noqa: E402
from llm.backends.torch.runner import TorchBackend  # noqa: E402


def paths(backend: TorchBackend, chunk: list[int], start: int, bucket: int) -> dict:
    """name -> a call that enqueues the chunk's prefill at `start` and its greedy token."""
    model, cache, device = backend.model, backend.cache, backend.device
    row = list(range(1, backend.runtime.blocks_per_seq + 1))
    row_t = torch.tensor(row, device=device)
    tokens_t = torch.tensor(chunk, device=device)
    padded = torch.zeros(bucket, dtype=torch.int64, device=device)
    padded[:len(chunk)] = tokens_t
    start_t = torch.tensor([start], device=device)
    last = torch.tensor([len(chunk) - 1], device=device)
    argmax = model.lm_head.argmax
    calls = {
        "eager": lambda: argmax(model.prefill(tokens_t, start, row_t, cache)[None]),
        "padded eager": lambda: argmax(model.prefill(padded, start_t, row_t, cache,
                                                     last=last)[None]),
    }
    pg = backend.prefill_graphs
    if pg is not None and pg.graphs:
        calls["graph"] = lambda: argmax(pg.run(chunk, row, start)[None])
    return calls


def attention_us(backend: TorchBackend, start: int, n: int) -> list[str]:
    """One layer's attention for n queries at `start`: the paged kernel's rows and splits, then
    us of gather + masked SDPA (eager path), the paged prefill kernel as the engine launches it,
    and the same tiles without the split over the keys."""
    model, cache, device = backend.model, backend.cache, backend.device
    cfg = model.local
    nh, n_kv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(n, nh, hd, generator=g, device=device).to(model.dtype)
    row = torch.arange(1, backend.runtime.blocks_per_seq + 1, device=device)
    total, bs = start + n, model.block_size
    pos = torch.arange(start, total, device=device)
    mask = torch.arange(total, device=device)[None, :] <= pos[:, None]
    scale = hd ** -0.5

    def eager() -> torch.Tensor:
        k, v = cache.gather(0, row[None, : -(-total // bs)])  # [1, n_kv, nb * bs, hd]
        return F.scaled_dot_product_attention(q.transpose(0, 1)[None], k[:, :, :total],
                                              v[:, :, :total], attn_mask=mask, enable_gqa=True,
                                              scale=scale)

    start_t = torch.tensor([start], device=device)
    rows = rows_per_program(n, nh // n_kv, n_kv, model.n_sm)
    splits = splits_per_tile(-(-n // (rows // (nh // n_kv))) * n_kv, row.numel() * bs, 64,
                             model.n_sm)

    def paged(split: int | None) -> torch.Tensor:
        return paged_prefill_attention(q, cache.k[0], cache.v[0], row, start_t, scale,
                                       n_sm=model.n_sm, splits=split)

    times = [graph_us([fn], device) for fn in (eager, lambda: paged(None), lambda: paged(1))]
    return [str(rows), str(splits)] + [f"{us:.1f}" for us in times]


@torch.inference_mode()
def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--configs", default="1b", help="comma list of: " + ", ".join(SHAPES))
    p.add_argument("--starts", default="256,1536", help="comma list of chunk start positions")
    p.add_argument("--tokens", default="64,256", help="comma list of chunk lengths")
    p.add_argument("--reps", type=int, default=20, help="calls timed (median)")
    args = p.parse_args(argv)
    device, dtype = device_for(args), dtype_for(args)
    starts, lengths = csv(args.starts, int), csv(args.tokens, int)
    if args.smoke:
        starts, lengths = [40], [20]
    max_seq_len = max(starts) + max(lengths) + 64
    summary, attention = [], []
    for name in configs_for(args, csv(args.configs)):
        cfg = SHAPES[name]
        backend = build_backend(cfg, device, dtype, 1, max_seq_len,
                                cuda_graphs=device.type == "cuda")
        if backend.prefill_graphs is not None:
            print(f"{name}: {backend.describe()}", flush=True)
        buckets = prefill_buckets(max_seq_len)
        for start in starts:
            for n in lengths:
                bucket = bucket_for(buckets, n, start, max_seq_len)
                if bucket is None:
                    print(f"{name}: {n} tokens at {start} fit no bucket; skipped", flush=True)
                    continue
                chunk = random_prompts(1, n, cfg.vocab_size)[0]
                for path, run in paths(backend, chunk, start, bucket).items():
                    events_ms, host = measure(run, device, args.reps)
                    kernels_ms = sum(us for _, us in kernel_times(run, device).values()) / 1e3
                    summary.append([name, start, n, bucket, path, f"{events_ms:.2f}",
                                    f"{host:.2f}", f"{kernels_ms:.2f}"])
                attention.append([name, start, n, *attention_us(backend, start, n)])
        backend.close()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print_table(["config", "start", "tokens", "bucket", "path", "CUDA events ms",
                 "host enqueue ms", "kernel sum ms"], summary)
    print_table(["config", "start", "tokens", "rows", "splits", "gather + SDPA us/layer",
                 "paged prefill us/layer", "paged, no split us/layer"], attention)
    return 0


if __name__ == "__main__":
    sys.exit(main())
