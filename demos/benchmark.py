"""Benchmark our engine against transformers on the same weights, in one process, on one device.

    python demos/benchmark.py --configs default --batches 1,4 --prompt-lens 128   # CPU
    python demos/benchmark.py --device cuda --dtype bfloat16 --configs 1b,8b \\
        --batches 1,8,32,64 --prompt-lens 128,2048 --json results.json                # GPU
    torchrun --nproc-per-node 2 demos/benchmark.py --tp 2 --device cuda --dtype bfloat16 \\
        --configs 8b --batches 1,32 --engines llm                      # tensor parallel, 2 GPUs

Per model config and batch size: TTFT (prefill of one prompt, incl. choosing the first token), ms
per decode step, tok/s per user and in total, and % of the memory roofline: the bytes one decode
step must move (every weight once, plus the KV cache read and written) over the bandwidth of a large
device-to-device copy measured in the same run; that byte count (quantized weights as held:
codes and scales) is printed as "MB a step". transformers runs the same weights through
`generate` (eager, dynamic cache), timed per token by a streamer; medians throughout.

With --tp N (under torchrun) every rank builds the same random weights and keeps its slices; rank
0 drives the benchmark and prints, the others follow. The roofline is then per GPU: the bytes one
rank moves per step (its weights and KV heads) over one GPU's copy bandwidth.

--sampling full gives every user presence, frequency and repetition penalties, a logit bias and 5
logprobs per token (the penalty / logprobs path; greedy, so the tokens stay comparable): run it
next to the default --sampling greedy to measure what that path costs per step. --sampling top_p
(temperature 0.8, top_p 0.9, seeded), min_p (the same with min_p 0.05) and temperature (0.8
alone) time the sampled path.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from demos.help_format import DefaultsOnce  # noqa: E402
from llm.backends.torch.parallel.leader import LeaderBackend, follow  # noqa: E402
from llm.backends.torch.parallel.mesh import Mesh  # noqa: E402
from llm.backends.torch.runner import TorchBackend  # noqa: E402
from llm.backends.torch.weight import nbytes  # noqa: E402
from llm.engine.contract.backend import Backend, DecodeInput, PrefillInput, SequenceSampling  # noqa: E402
from llm.engine.contract.sampling_params import SamplingParams  # noqa: E402
from llm.engine.drive import decode_together  # noqa: E402
from llm.engine.paged_kv import PageTable, PageTableSpec  # noqa: E402
from llm.model.checkpoint.common import (  # noqa: E402
    QUANTIZE_MODES,
    WEIGHT_MODES,
    Checkpoint,
    expected_tensors,
)
from llm.model.checkpoint.load import load_checkpoint, quantize_matrices  # noqa: E402
from llm.model.config import ModelConfig, RuntimeConfig  # noqa: E402
from llm.model.paths import default_model_path  # noqa: E402
from llm.model.quant.tensor import QuantizedTensor  # noqa: E402

_LLAMA = dict(arch="llama", vocab_size=128256, num_heads=32, num_kv_heads=8, head_dim=64,
              max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0)
SHAPES = {  # random-weight models with the shapes of real ones (no download needed)
    "1b": ModelConfig(**_LLAMA, hidden_size=2048, intermediate_size=8192, num_layers=16,
                      tie_word_embeddings=True),
    "8b": ModelConfig(**{**_LLAMA, "head_dim": 128}, hidden_size=4096, intermediate_size=14336,
                      num_layers=32),
}
GREEDY = SequenceSampling(SamplingParams(), 0)
SAMPLINGS = {
    "greedy": GREEDY,
    "full": SequenceSampling(SamplingParams(presence_penalty=0.5, frequency_penalty=0.5,
                                            repetition_penalty=1.1, logit_bias={0: -1.0},
                                            logprobs=5), 0),
    "top_p": SequenceSampling(SamplingParams(temperature=0.8, top_p=0.9, seed=1), 1),
    "min_p": SequenceSampling(SamplingParams(temperature=0.8, top_p=0.9, min_p=0.05, seed=1), 1),
    "temperature": SequenceSampling(SamplingParams(temperature=0.8, seed=1), 1),
}


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
    step_mb: float  # the roofline's bytes a step: weights as held (codes and scales) + K/V


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


def step_bytes(backend: TorchBackend, batch: int, context: int) -> int:
    """Fewest bytes one decode step moves on one rank: each of its weights once (embedding: only
    B rows), plus its K/V heads.
    """
    model = backend.model
    cfg, local = model.config, model.local
    elem = torch.finfo(model.dtype).bits // 8  # activations and KV cache
    weights = model.weight_bytes  # quantized ones as held: codes and scales
    if not cfg.tie_word_embeddings:
        weights -= nbytes(model.embed.weight)
    kv = 2 * cfg.num_layers * local.kv_size * elem * batch * (context + 1)
    return weights + kv + batch * cfg.hidden_size * elem


def bench_ours(backend: Backend, batch: int, prompt_len: int, steps: int, vocab: int,
               sampling: SequenceSampling = GREEDY) -> tuple[float, float]:
    """(TTFT seconds for one prompt, seconds per decode step at `batch`), every user with
    `sampling`."""
    rt = backend.runtime
    pages = PageTable(PageTableSpec(rt.total_blocks, rt.block_size, rt.blocks_per_seq),
                      rt.max_batch)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, vocab, (prompt_len,), generator=g).tolist() for _ in range(batch)]
    pages.reserve(0, prompt_len + steps + 1)
    ttfts = []
    for _ in range(3):  # TTFT: the first prefill of this length warms up, the median of the rest
        t = time.perf_counter()
        backend.prefill(PrefillInput(0, prompts[0], 0, pages.row(0), sampling))
        ttfts.append(time.perf_counter() - t)
    firsts = []
    for slot in range(batch):
        pages.reserve(slot, prompt_len + steps + 1)
        firsts.append(backend.prefill(PrefillInput(slot, prompts[slot], 0, pages.row(slot),
                                                   sampling)))
    slots = list(range(batch))
    tokens, times = firsts, []
    for i in range(steps):
        t = time.perf_counter()
        tokens = backend.decode(DecodeInput(slots, tokens, [prompt_len + i] * batch,
                                            pages.table(slots), [sampling] * batch))
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
                                formatter_class=DefaultsOnce)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--configs", default="default", help="comma list of: default, 1b, 8b")
    p.add_argument("--batches", default="1,4", help="comma list of decode batch sizes")
    p.add_argument("--prompt-lens", default="128", help="comma list of prompt lengths")
    p.add_argument("--steps", type=int, default=32, help="decode steps timed per batch")
    p.add_argument("--sampling", default="greedy", choices=sorted(SAMPLINGS),
                   help="every user's sampling: greedy, full (penalties, bias, logprobs), "
                   "top_p, min_p or temperature (sampled)")
    p.add_argument("--engines", default="llm,transformers",
                   help="comma list of: llm (CUDA graphs where available), llm-sync (graphs, "
                        "no step launched ahead), llm-eager, "
                        "transformers, transformers-static (static cache, compiled by "
                        "transformers)")
    p.add_argument("--check-greedy", type=int, default=0, metavar="STEPS",
                   help="greedy tokens of 4 users over STEPS steps: check CUDA-graph decode "
                        "against eager decode (one rank) and against --greedy-ref")
    p.add_argument("--greedy-out", default=None, metavar="PATH",
                   help="with --check-greedy: write the greedy tokens (CUDA graphs) here")
    p.add_argument("--greedy-ref", default=None, metavar="PATH",
                   help="with --check-greedy: compare the greedy tokens with those of --greedy-out "
                        "of an earlier run (e.g. tp=1)")
    p.add_argument("--tp", type=int, default=1,
                   help="tensor-parallel ranks; start with `torchrun --nproc-per-node N` "
                        "(engines: llm only)")
    p.add_argument("--all-reduce", default="auto", choices=["auto", "nccl"],
                   help="--tp: decode all-reduces by symmetric memory where available, or NCCL")
    p.add_argument("--gemv-max-batch", type=int, default=None,
                   help="decode batches up to this size use the fused Triton GEMVs "
                        "(default: the engine's; 0 = never)")
    p.add_argument("--busy", type=int, default=0, metavar="N",
                   help="CPU: run N competing busy processes (`while True: pass`) for the whole "
                        "benchmark, stopped at its end, also on error or Ctrl-C")
    p.add_argument("--weights", default="auto",
                   choices=["auto", *WEIGHT_MODES],
                   help="our engine's weights (as LLM(weights=...)): auto = the default model's "
                        "GGUF blocks as stored on the CPU, dense on CUDA; stored: the GGUF's "
                        "blocks (default model only); int8 / int4 / int4_mix: quantized at load. "
                        "transformers runs the same values dequantized")
    p.add_argument("--json", default=None, help="write all rows and the environment here")
    args = p.parse_args(argv)
    check_args(p, args)
    if args.busy < 0:
        p.error("--busy must be >= 0")
    if args.busy and not args.device.startswith("cpu"):
        p.error("--busy applies to the CPU benchmark (--device cpu) only")
    if args.tp > 1 and args.engines == p.get_default("engines"):
        args.engines = "llm"  # transformers runs one process: not a tensor-parallel peer
    mesh, dev = Mesh.from_env(args.tp, args.device)
    if args.tp > 1 and args.engines != "llm":
        p.error("--tp > 1 runs --engines llm only (every rank must take the same path)")
    if not mesh.leader:
        return follow_configs(args, mesh, torch.device(dev))
    with busy_processes(args.busy):
        return run_benchmark(args, mesh, dev)


ENGINES = ("llm", "llm-sync", "llm-eager", "transformers", "transformers-static")


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse (argparse's error, naming the flag) what the benchmark cannot run."""
    for flag, text in (("--batches", args.batches), ("--prompt-lens", args.prompt_lens)):
        try:
            values = [int(v) for v in text.split(",")]
        except ValueError:
            p.error(f"{flag} must be a comma list of integers, got {text!r}")
        if min(values) < 1:
            p.error(f"{flag} must be >= 1, got {text!r}")
    if args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    unknown = [c for c in args.configs.split(",") if c not in ("default", *SHAPES)]
    if unknown:
        p.error(f"--configs: unknown {', '.join(unknown)} (known: default, {', '.join(SHAPES)})")
    unknown = [e for e in args.engines.split(",") if e not in ENGINES]
    if unknown:
        p.error(f"--engines: unknown {', '.join(unknown)} (known: {', '.join(ENGINES)})")
    if args.gemv_max_batch is not None and args.gemv_max_batch < 0:
        p.error(f"--gemv-max-batch must be >= 0, got {args.gemv_max_batch}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: no CUDA device here")
    if args.weights.startswith("int") and "default" in args.configs.split(","):
        p.error(f"--weights {args.weights} quantizes a floating-point checkpoint at load; the "
                "default model is a GGUF (run as stored or dequantized): use --configs 1b / 8b "
                "(random shapes) for int8 / int4 / int4_mix")


@contextmanager
def busy_processes(n: int) -> Iterator[None]:
    """Run the block with `n` busy-looping Python processes competing for the CPU; they are
    killed on the way out, whatever ends the block (Ctrl-C also stops them silently: they keep the
    default SIGINT action and our process group)."""
    loop = "import signal\nsignal.signal(signal.SIGINT, signal.SIG_DFL)\nwhile True: pass"
    procs: list[subprocess.Popen] = []
    try:
        for _ in range(n):
            procs.append(subprocess.Popen([sys.executable, "-c", loop]))
        if procs:
            print(f"# started {n} busy process(es) competing for the CPU: pids "
                  f"{', '.join(str(q.pid) for q in procs)}", flush=True)
        yield
    finally:
        for q in procs:
            q.kill()
        for q in procs:
            q.wait()
        if procs:
            print(f"# stopped the {len(procs)} busy process(es)", flush=True)


def run_benchmark(args: argparse.Namespace, mesh: Mesh, dev: str) -> int:
    """The leader's benchmark: every config, prompt length, batch and engine; prints the rows."""
    device, dtype = torch.device(dev), getattr(torch, args.dtype)
    batches = [int(b) for b in args.batches.split(",")]
    plens = [int(n) for n in args.prompt_lens.split(",")]
    bw = copy_bandwidth(device, (1 << 30) if device.type == "cuda" else (256 << 20))
    env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "dtype": args.dtype, "copy_GBps": bw / 1e9,
           "threads": torch.get_num_threads(), "busy": args.busy,
           "date": time.strftime("%Y-%m-%d"),
           "tp": args.tp, "all_reduce": args.all_reduce, "gemv_max_batch": args.gemv_max_batch,
           "weights": args.weights, "sampling": args.sampling}
    print(f"# {env}", flush=True)
    rows: list[Row] = []
    for name in args.configs.split(","):
        ck = make_checkpoint(name, device, dtype, args.weights)
        cfg = ck.config
        engines = args.engines.split(",")
        backend = build_backend(ck, args, batches, plens, mesh)
        driver: Backend = LeaderBackend(backend, mesh) if mesh.size > 1 else backend
        graphs = backend.graphs
        env.setdefault("capture_s", {})[name] = graphs.capture_s if graphs else None
        env.setdefault("llm", {})[name] = driver.describe()
        print(f"# {name}: {driver.describe()}", flush=True)
        ref = hf_model(dequantized(ck, device, dtype), device, dtype) if any(
            e.startswith("transformers") for e in engines) else None
        if args.check_greedy:
            check_greedy(name, cfg, driver, backend, args, env)
        bench_ours(driver, 1, 16, 4, cfg.vocab_size, SAMPLINGS[args.sampling])  # warm-up
        for plen in plens:
            for b in batches:
                for engine in engines:
                    if engine.startswith("llm"):
                        backend.graphs = None if engine == "llm-eager" else graphs
                        if backend.prefill_graphs is not None:
                            backend.prefill_graphs.replay = engine != "llm-eager"
                        if graphs is not None:
                            graphs.pipeline = engine != "llm-sync"
                        ttft, step = bench_ours(driver, b, plen, args.steps, cfg.vocab_size,
                                                SAMPLINGS[args.sampling])
                        backend.graphs = graphs
                        if backend.prefill_graphs is not None:
                            backend.prefill_graphs.replay = True
                    else:
                        ttft, step = bench_hf(ref, b, plen, args.steps, cfg.vocab_size, device,
                                              static=engine == "transformers-static")
                    moved = step_bytes(backend, b, plen + args.steps // 2)
                    rows.append(Row(name, b, plen, engine, ttft * 1e3, step * 1e3, 1 / step,
                                    b / step, 100 * moved / bw / step, moved / 1e6))
                    r = rows[-1]
                    print(f"{name:8} B={b:<3} prompt={plen:<5} {engine:12} TTFT {r.ttft_ms:8.1f} ms"
                          f"  step {r.step_ms:8.2f} ms  {r.tok_s_user:8.1f} tok/s/user"
                          f"  {r.tok_s_total:9.1f} tok/s  {r.roofline_pct:5.1f}% roofline"
                          f" ({r.step_mb:.1f} MB a step)", flush=True)
        if mesh.size > 1:
            driver.close()
        del backend, driver, graphs, ref, ck
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps({"env": env, "rows": [asdict(r) for r in rows]},
                                              indent=1))
    return 0


def make_checkpoint(name: str, device: torch.device, dtype: torch.dtype,
                    weights: str = "auto") -> Checkpoint:
    """The default model's weights, or random weights with the shapes of config `name`, loaded or
    quantized as `weights` says (quantized matrices stay on the CPU: the backend places them)."""
    if name != "default":
        if weights == "stored":
            raise SystemExit("--weights stored needs a GGUF (--configs default); random GGUF "
                             "blocks on the GPU: bench/quant_decode.py")
        ck = random_checkpoint(SHAPES[name], device, dtype)
        if weights in QUANTIZE_MODES:
            ck = Checkpoint(ck.config, quantize_matrices(ck.tensors, weights, False), ck.source)
        return ck
    if weights == "auto":
        weights = "stored" if device.type == "cpu" else "dequantize"
    ck = load_checkpoint(default_model_path(), progress=False, weights=weights)
    return Checkpoint(ck.config, {k: v if isinstance(v, QuantizedTensor) else v.to(device, dtype)
                                  for k, v in ck.tensors.items()}, ck.source)


def dequantized(ck: Checkpoint, device: torch.device, dtype: torch.dtype) -> Checkpoint:
    """The same weights, every quantized matrix dequantized to `dtype` on `device`."""
    return Checkpoint(ck.config, {k: v.dequantize(torch.float32).to(device, dtype)
                                  if isinstance(v, QuantizedTensor) else v
                                  for k, v in ck.tensors.items()}, ck.source)


def build_backend(ck: Checkpoint, args: argparse.Namespace, batches: list[int],
                  plens: list[int], mesh: Mesh) -> TorchBackend:
    max_len = max(max(plens) + args.steps, 130 + args.check_greedy) + 8
    rt = RuntimeConfig(device=str(ck.tensors["model.norm.weight"].device), dtype=args.dtype,
                       max_batch=max(batches + [4]), max_seq_len=max_len, block_size=32)
    return TorchBackend(ck, rt, mesh=mesh, all_reduce=args.all_reduce,
                        gemv_max_batch=args.gemv_max_batch)


def follow_configs(args: argparse.Namespace, mesh: Mesh, device: torch.device) -> int:
    """A follower rank: build each config's backend as the leader does and run its calls."""
    batches = [int(b) for b in args.batches.split(",")]
    plens = [int(n) for n in args.prompt_lens.split(",")]
    for name in args.configs.split(","):
        backend = build_backend(make_checkpoint(name, device, getattr(torch, args.dtype),
                                                args.weights), args, batches, plens, mesh)
        follow(backend, mesh)
        del backend
        torch.cuda.empty_cache() if device.type == "cuda" else None
    mesh.close()
    return 0


def check_greedy(name: str, cfg: ModelConfig, driver: Backend, backend: TorchBackend,
                 args: argparse.Namespace, env: dict) -> None:
    """Greedy tokens of 4 users (CUDA graphs where used): == eager decode (one rank; also one user
    alone, the batch-1 GEMV path), == a saved run's tokens (--greedy-ref), saved for a later run
    (--greedy-out).
    """
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist()
               for n in (5, 64, 130, 17)]
    tokens = decode_together(driver, prompts, args.check_greedy, [GREEDY] * 4)
    checks = env.setdefault("greedy", {}).setdefault(name, {})
    if driver is backend and backend.graphs is not None:  # one rank: eager on the same weights
        alone = decode_together(driver, prompts[2:3], args.check_greedy, [GREEDY])  # batch 1
        graphs, backend.graphs = backend.graphs, None
        checks["graphs_equal_eager"] = tokens == decode_together(backend, prompts,
                                                                 args.check_greedy, [GREEDY] * 4)
        checks["graphs_equal_eager_batch1"] = alone == decode_together(
            backend, prompts[2:3], args.check_greedy, [GREEDY])
        backend.graphs = graphs
    if args.greedy_ref:
        ref = json.loads(Path(args.greedy_ref).read_text())[name]
        checks["equal_reference"] = tokens == ref
        checks["first_difference"] = [next((i for i, (a, b) in enumerate(zip(t, r)) if a != b),
                                           None) for t, r in zip(tokens, ref)]
    if args.greedy_out:
        out = Path(args.greedy_out)
        saved = json.loads(out.read_text()) if out.exists() else {}
        out.write_text(json.dumps({**saved, name: tokens}))
    print(f"# {name}: greedy tokens over {args.check_greedy} steps x 4 users: {checks}",
          flush=True)


def print_table(rows: list[Row]) -> None:
    """Markdown table, ours next to transformers with the speed ratio."""
    print("\n| config | batch | prompt | engine | TTFT ms | ms/step | tok/s/user | tok/s total "
          "| MB a step | % roofline | ours / ref |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    ref = {(r.config, r.batch, r.prompt_len): r for r in rows if r.engine == "transformers"}
    for r in rows:
        other = ref.get((r.config, r.batch, r.prompt_len))
        ratio = f"{other.step_ms / r.step_ms:.2f}x" if other and r.engine == "llm" else ""
        print(f"| {r.config} | {r.batch} | {r.prompt_len} | {r.engine} | {r.ttft_ms:.1f} | "
              f"{r.step_ms:.2f} | {r.tok_s_user:.1f} | {r.tok_s_total:.1f} | "
              f"{r.step_mb:.1f} | {r.roofline_pct:.1f} | {ratio} |")


if __name__ == "__main__":
    sys.exit(main())
