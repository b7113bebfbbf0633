"""Benchmark our engine against transformers on the same weights, in one process, on one device.

    python demos/benchmark.py --configs default --batches 1,4 --prompt-lens 128   # CPU
    python demos/benchmark.py --device cuda --dtype bfloat16 --configs 1b,8b \\
        --batches 1,8,32,64 --prompt-lens 128,2048 --json results.json                # GPU

Per model config and batch size: TTFT (prefill of one prompt, incl. choosing the first token), ms
per decode step, tok/s per user and in total, and % of the memory roofline: the bytes one decode
step must move (every weight once, plus the KV cache read and written) over the bandwidth of a large
device-to-device copy measured in the same run. transformers runs the same weights through
`generate` (eager, dynamic cache), timed per token by a streamer; medians throughout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llm.backends.base import DecodeInput, PrefillInput, SequenceSampling  # noqa: E402
from llm.backends.drive import decode_together  # noqa: E402
from llm.backends.torch.runner import TorchBackend  # noqa: E402
from llm.checkpoint import (  # noqa: E402
    Checkpoint,
    default_model_path,
    expected_tensors,
    load_checkpoint,  # noqa: E402
)
from llm.config import ModelConfig, RuntimeConfig  # noqa: E402
from llm.paged_kv import PageTable, PageTableSpec  # noqa: E402
from llm.sampling import SamplingParams  # noqa: E402

_LLAMA = dict(arch="llama", vocab_size=128256, num_heads=32, num_kv_heads=8, head_dim=64,
              max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0)
SHAPES = {  # random-weight models with the shapes of real ones (no download needed)
    "1b": ModelConfig(**_LLAMA, hidden_size=2048, intermediate_size=8192, num_layers=16,
                      tie_word_embeddings=True),
    "8b": ModelConfig(**{**_LLAMA, "head_dim": 128}, hidden_size=4096, intermediate_size=14336,
                      num_layers=32),
}
GREEDY = SequenceSampling(SamplingParams(), 0)


@dataclass
class Row:
    config: str
    batch: int
    prompt_len: int
    engine: str
    ttft_ms: float
    step_ms: float
    tok_s_user: float
    tok_s_total: float
    roofline_pct: float


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Bytes/s of a large device-to-device copy, counting bytes read plus bytes written."""
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(6):
        sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - t)
    return 2 * src.numel() * 4 / statistics.median(times[1:])


def random_checkpoint(config: ModelConfig, device: torch.device, dtype: torch.dtype) -> Checkpoint:
    g = torch.Generator(device=device).manual_seed(0)
    tensors = {}
    for name, shape in expected_tensors(config).items():
        if name.endswith("norm.weight"):
            tensors[name] = torch.ones(shape, device=device, dtype=dtype)
        else:
            t = torch.randn(shape, generator=g, device=device, dtype=torch.float32)
            tensors[name] = (t * shape[-1] ** -0.5).to(dtype)
    return Checkpoint(config, tensors, Path(f"random-{config.hidden_size}"))


def step_bytes(config: ModelConfig, ck: Checkpoint, batch: int, context: int) -> int:
    """Fewest bytes one decode step moves: every weight once (embedding: only B rows), plus K/V."""
    weights = sum(t.numel() * t.element_size() for n, t in ck.tensors.items()
                  if n != "model.embed_tokens.weight" or config.tie_word_embeddings)
    elem = next(iter(ck.tensors.values())).element_size()
    kv = 2 * config.num_layers * config.kv_size * elem * batch * (context + 1)
    return weights + kv + batch * config.hidden_size * elem


def bench_ours(backend: TorchBackend, batch: int, prompt_len: int, steps: int,
               vocab: int) -> tuple[float, float]:
    """(TTFT seconds for one prompt, seconds per decode step at `batch`)."""
    rt = backend.runtime
    pages = PageTable(PageTableSpec(rt.total_blocks, rt.block_size, rt.blocks_per_seq),
                      rt.max_batch)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, vocab, (prompt_len,), generator=g).tolist() for _ in range(batch)]
    pages.reserve(0, prompt_len + steps + 1)
    ttfts = []
    for _ in range(3):  # TTFT: the first prefill of this length warms up, the median of the rest
        t = time.perf_counter()
        backend.prefill(PrefillInput(0, prompts[0], 0, pages.row(0), GREEDY))
        ttfts.append(time.perf_counter() - t)
    firsts = []
    for slot in range(batch):
        pages.reserve(slot, prompt_len + steps + 1)
        firsts.append(backend.prefill(PrefillInput(slot, prompts[slot], 0, pages.row(slot),
                                                   GREEDY)))
    slots = list(range(batch))
    tokens, times = firsts, []
    for i in range(steps):
        t = time.perf_counter()
        tokens = backend.decode(DecodeInput(slots, tokens, [prompt_len + i] * batch,
                                            pages.table(slots), [GREEDY] * batch))
        times.append(time.perf_counter() - t)
    for slot in slots:
        pages.release(slot)
    warm = times[min(2, steps - 1):]
    return statistics.median(ttfts[1:]), statistics.median(warm)


def hf_model(ck: Checkpoint, device: torch.device, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    d = ck.config.to_hf_dict()
    d.pop("model_type")
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**d, dtype=dtype))
    model.load_state_dict(ck.tensors, strict=False, assign=True)
    if ck.config.tie_word_embeddings:
        model.tie_weights()
    # RoPE buffers are not in the state dict: build them for real (on the CPU, then move).
    model.model.rotary_emb = type(model.model.rotary_emb)(model.config).to(device)
    return model.eval()


class _Clock:
    """A transformers streamer that timestamps every token `generate` emits (prompt first)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.stamps = device, []

    def put(self, value: torch.Tensor) -> None:
        self.stamps.append(time.perf_counter())  # put() receives host tensors: already synced

    def end(self) -> None:
        pass


def bench_hf(model, batch: int, prompt_len: int, steps: int, vocab: int,
             device: torch.device, static: bool = False) -> tuple[float, float]:
    """transformers `generate` (greedy, no early stop): (TTFT, median seconds between tokens).

    static: a static KV cache, which transformers compiles the decode step for.
    """
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (batch, prompt_len), generator=g).to(device)

    def run(n: int, x: torch.Tensor) -> list[float]:
        clock = _Clock(device)
        sync(device)
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           eos_token_id=None, pad_token_id=0, streamer=clock,
                           cache_implementation="static" if static else None)
        return [t, *clock.stamps]  # start, prompt echoed, token 1, token 2, ...

    run(2, ids[:1])  # warm-up (and compilation, with a static cache)
    if static:
        run(steps + 1, ids)
    ttft = statistics.median(s[2] - s[0] for s in (run(1, ids[:1]) for _ in range(3)))
    full = run(steps + 1, ids)
    stamps = full[2:]
    step = statistics.median(b - a for a, b in zip(stamps, stamps[1:]))
    one = run(1, ids)
    print(f"  (transformers cross-check without per-token stamps: "
          f"{1e3 * ((full[-1] - full[0]) - (one[-1] - one[0])) / steps:.2f} ms/step)")
    return ttft, step


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--configs", default="default", help="comma list of: default, 1b, 8b")
    p.add_argument("--batches", default="1,4", help="comma list of decode batch sizes")
    p.add_argument("--prompt-lens", default="128", help="comma list of prompt lengths")
    p.add_argument("--steps", type=int, default=32, help="decode steps timed per batch")
    p.add_argument("--engines", default="llm,transformers",
                   help="comma list of: llm (CUDA graphs where available), llm-sync (graphs, "
                        "no step launched ahead), llm-eager, "
                        "transformers, transformers-static (static cache, compiled by "
                        "transformers)")
    p.add_argument("--check-greedy", type=int, default=0, metavar="STEPS",
                   help="also check that CUDA-graph decode gives the same greedy tokens as eager "
                        "decode over STEPS steps for 4 users")
    p.add_argument("--json", default=None, help="write all rows and the environment here")
    args = p.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    batches = [int(b) for b in args.batches.split(",")]
    plens = [int(n) for n in args.prompt_lens.split(",")]
    bw = copy_bandwidth(device, (1 << 30) if device.type == "cuda" else (256 << 20))
    env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "dtype": args.dtype, "copy_GBps": bw / 1e9,
           "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d")}
    print(f"# {env}", flush=True)
    rows: list[Row] = []
    for name in args.configs.split(","):
        if name == "default":
            ck = load_checkpoint(default_model_path(), progress=False)
            ck = Checkpoint(ck.config, {k: v.to(device, dtype) for k, v in ck.tensors.items()},
                            ck.source)
        else:
            ck = random_checkpoint(SHAPES[name], device, dtype)
        cfg = ck.config
        max_len = max(max(plens) + args.steps, 130 + args.check_greedy) + 8
        rt = RuntimeConfig(device=args.device, dtype=args.dtype, max_batch=max(batches + [4]),
                           max_seq_len=max_len, block_size=32)
        engines = args.engines.split(",")
        backend = TorchBackend(ck, rt)
        graphs = backend.graphs
        env.setdefault("capture_s", {})[name] = graphs.capture_s if graphs else None
        print(f"# {name}: {backend.describe()}", flush=True)
        ref = hf_model(ck, device, dtype) if any(e.startswith("transformers")
                                                 for e in engines) else None
        if args.check_greedy and graphs is not None:
            g = torch.Generator().manual_seed(7)
            prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist()
                       for n in (5, 64, 130, 17)]
            with_graphs = decode_together(backend, prompts, args.check_greedy, [GREEDY] * 4)
            backend.graphs = None
            eager = decode_together(backend, prompts, args.check_greedy, [GREEDY] * 4)
            backend.graphs = graphs
            same = with_graphs == eager
            env.setdefault("greedy_graphs_equal_eager", {})[name] = same
            print(f"# {name}: greedy tokens, CUDA graphs == eager over {args.check_greedy} steps "
                  f"x 4 users: {same}", flush=True)
        bench_ours(backend, 1, 16, 4, cfg.vocab_size)  # warm-up
        for plen in plens:
            for b in batches:
                for engine in engines:
                    if engine.startswith("llm"):
                        backend.graphs = None if engine == "llm-eager" else graphs
                        if graphs is not None:
                            graphs.pipeline = engine != "llm-sync"
                        ttft, step = bench_ours(backend, b, plen, args.steps, cfg.vocab_size)
                        backend.graphs = graphs
                    else:
                        ttft, step = bench_hf(ref, b, plen, args.steps, cfg.vocab_size, device,
                                              static=engine == "transformers-static")
                    floor = step_bytes(cfg, ck, b, plen + args.steps // 2) / bw
                    rows.append(Row(name, b, plen, engine, ttft * 1e3, step * 1e3, 1 / step,
                                    b / step, 100 * floor / step))
                    r = rows[-1]
                    print(f"{name:8} B={b:<3} prompt={plen:<5} {engine:12} TTFT {r.ttft_ms:8.1f} ms"
                          f"  step {r.step_ms:8.2f} ms  {r.tok_s_user:8.1f} tok/s/user"
                          f"  {r.tok_s_total:9.1f} tok/s  {r.roofline_pct:5.1f}% roofline",
                          flush=True)
        del backend, graphs, ref, ck
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps({"env": env, "rows": [asdict(r) for r in rows]},
                                              indent=1))
    return 0


def print_table(rows: list[Row]) -> None:
    """Markdown table, ours next to transformers with the speed ratio."""
    print("\n| config | batch | prompt | engine | TTFT ms | ms/step | tok/s/user | tok/s total "
          "| % roofline | ours / ref |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    ref = {(r.config, r.batch, r.prompt_len): r for r in rows if r.engine == "transformers"}
    for r in rows:
        other = ref.get((r.config, r.batch, r.prompt_len))
        ratio = f"{other.step_ms / r.step_ms:.2f}x" if other and r.engine == "llm" else ""
        print(f"| {r.config} | {r.batch} | {r.prompt_len} | {r.engine} | {r.ttft_ms:.1f} | "
              f"{r.step_ms:.2f} | {r.tok_s_user:.1f} | {r.tok_s_total:.1f} | "
              f"{r.roofline_pct:.1f} | {ratio} |")


if __name__ == "__main__":
    sys.exit(main())
