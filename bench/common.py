"""Shared setup of the bench/ scripts: random-weight models with Llama shapes, the device, timing
(CUDA graphs of back-to-back calls, CUDA events, host clocks), decode steps driven as
demos/benchmark.py drives them, the copy-bandwidth roofline, switches for one engine choice at a
time (for A/B runs in one process), a kernel table from the torch profiler, and the markdown
table every script ends with.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from llm.backends.torch.kernels import gemv as gemv_kernels
from llm.backends.torch.kernels import pdl, rope_kv
from llm.backends.torch.kernels.gemv_config import GemvConfig
from llm.backends.torch.model import Transformer
from llm.backends.torch.parallel.mesh import Mesh
from llm.backends.torch.runner import TorchBackend
from llm.backends.torch.weight import nbytes
from llm.engine.contract.backend import Backend, DecodeInput, PrefillInput, SequenceSampling
from llm.engine.contract.sampling_params import SamplingParams
from llm.engine.paged_kv import PageTable, PageTableSpec
from llm.model.checkpoint.common import Checkpoint, expected_tensors
from llm.model.config import ModelConfig, RuntimeConfig

_LLAMA = dict(arch="llama", vocab_size=128256, num_heads=32, num_kv_heads=8, head_dim=64,
              max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0)
SHAPES = {  # the shapes of real models (random weights: nothing to download)
    "1b": ModelConfig(**_LLAMA, hidden_size=2048, intermediate_size=8192, num_layers=16,
                      tie_word_embeddings=True),  # Llama-3.2-1B
    "8b": ModelConfig(**{**_LLAMA, "head_dim": 128}, hidden_size=4096, intermediate_size=14336,
                      num_layers=32),  # Llama-3.1-8B
    "smollm2": ModelConfig(arch="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                           num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
                           max_position_embeddings=8192, rope_theta=100000.0,
                           tie_word_embeddings=True),  # SmolLM2-135M, the default model
    "tiny": ModelConfig(arch="llama", vocab_size=512, hidden_size=64, intermediate_size=128,
                        num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                        max_position_embeddings=4096, tie_word_embeddings=True),  # --smoke
}
GREEDY = SequenceSampling(SamplingParams(), 0)
DTYPES = ("bfloat16", "float16", "float32")


# --- command line and device ---------------------------------------------------------------

class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring as written, and every option's default."""


def parser(doc: str) -> argparse.ArgumentParser:
    """An argument parser whose description is the script's docstring, with --dtype and --smoke."""
    p = argparse.ArgumentParser(description=doc, formatter_class=_HelpFormatter)
    p.add_argument("--dtype", default="bfloat16", choices=DTYPES, help="weights and activations")
    p.add_argument("--smoke", action="store_true",
                   help="check that the script runs: 'tiny' shapes in fp32, on the CPU (Triton's "
                        "interpreter) where there is no GPU; its numbers mean nothing")
    return p


def csv(text: str, kind: Callable = str) -> list:
    """'1,4,32' -> [1, 4, 32] (with kind=int)."""
    return [kind(x) for x in text.split(",") if x]


def device_for(args: argparse.Namespace) -> torch.device:
    """The GPU, or the CPU for --smoke without one; otherwise exit with the reason."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if args.smoke:
        return torch.device("cpu")
    sys.exit(f"{Path(sys.argv[0]).name}: needs a CUDA GPU, and torch.cuda.is_available() is "
             f"False here (--smoke checks the script on this CPU; its numbers mean nothing)")


def dtype_for(args: argparse.Namespace) -> torch.dtype:
    return torch.float32 if args.smoke else getattr(torch, args.dtype)


def configs_for(args: argparse.Namespace, names: Sequence[str]) -> list[str]:
    """The shapes to run: `names` (checked against SHAPES), or 'tiny' alone with --smoke."""
    if args.smoke:
        return ["tiny"]
    unknown = [n for n in names if n not in SHAPES]
    if unknown:
        sys.exit(f"unknown config(s) {unknown}; known: {', '.join(SHAPES)}")
    return list(names)


# --- models ---------------------------------------------------------------------------------

def random_checkpoint(config: ModelConfig, device: torch.device, dtype: torch.dtype) -> Checkpoint:
    """Weights with config's shapes, drawn as demos/benchmark.py draws them: N(0, 1 / fan_in)
    from seed 0, norm weights 1."""
    g = torch.Generator(device=device).manual_seed(0)
    tensors = {}
    for name, shape in expected_tensors(config).items():
        if name.endswith("norm.weight"):
            tensors[name] = torch.ones(shape, device=device, dtype=dtype)
        else:
            t = torch.randn(shape, generator=g, device=device, dtype=torch.float32)
            tensors[name] = (t * shape[-1] ** -0.5).to(dtype)
    return Checkpoint(config, tensors, Path(f"random-{config.hidden_size}"))


def build_backend(config: ModelConfig, device: torch.device, dtype: torch.dtype, max_batch: int,
                  max_seq_len: int, cuda_graphs: bool = False, mesh: Mesh | None = None,
                  all_reduce: str = "auto", quant: str = "") -> TorchBackend:
    """A torch backend on random weights (pages of 32 tokens); `quant`: its 2-D weights in random
    planes of that format or mix (`bench/quant_decode.py`'s names, e.g. q4_0, q4_k_m). On the CPU
    (--smoke) its model is rebuilt with the Triton kernel paths, which then run in Triton's
    interpreter, so that the switches below act there too."""
    rt = RuntimeConfig(device=str(device), dtype=str(dtype).removeprefix("torch."),
                       max_batch=max_batch, max_seq_len=max_seq_len, block_size=32)
    ck = random_checkpoint(config, device, dtype)
    if quant:
        from bench.quant_decode import quantized_checkpoint  # it imports this module

        ck = quantized_checkpoint(ck, quant, device)
    backend = TorchBackend(ck, rt, cuda_graphs=cuda_graphs, mesh=mesh, all_reduce=all_reduce)
    if device.type == "cpu":
        backend.model = Transformer(config, ck.tensors, rt, decode_kernel=True, mesh=backend.mesh)
    return backend


def random_prompts(n: int, length: int, vocab: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (length,), generator=g).tolist() for _ in range(n)]


def decode_step_ms(driver: Backend, batch: int, prompt_len: int, steps: int) -> float:
    """Median host time of one decode step, in ms, as demos/benchmark.py measures it: `batch`
    users prefilled with random prompts of prompt_len tokens, then `steps` greedy steps through
    `driver.decode`, the first two not counted. Their pages are released afterwards."""
    if steps < 3:
        raise ValueError(f"steps must be at least 3, got {steps}")
    rt = driver.runtime
    pages = PageTable(PageTableSpec(rt.total_blocks, rt.block_size, rt.blocks_per_seq),
                      rt.max_batch)
    tokens = []
    for slot, prompt in enumerate(random_prompts(batch, prompt_len, driver.config.vocab_size)):
        pages.reserve(slot, prompt_len + steps + 1)
        tokens.append(driver.prefill(PrefillInput(slot, prompt, 0, pages.row(slot), GREEDY)))
    slots = list(range(batch))
    times = []
    for i in range(steps):
        t = time.perf_counter()
        tokens = driver.decode(DecodeInput(slots, tokens, [prompt_len + i] * batch,
                                           pages.table(slots), [GREEDY] * batch))
        times.append(time.perf_counter() - t)
    for slot in slots:
        pages.release(slot)
    return 1e3 * statistics.median(times[2:])


# --- timing ---------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def graph_us(calls: Sequence[Callable[[], object]], device: torch.device,
             reps: int = 10) -> float:
    """Microseconds per element of `calls`, run back to back: warmed up (and compiled) on a side
    stream, captured once as one CUDA graph, replayed `reps` times between CUDA events; the
    median replay over len(calls). On the CPU: one eager pass after a warm-up, by the host
    clock."""
    def run() -> None:
        for call in calls:
            call()

    if device.type != "cuda":
        run()
        t = time.perf_counter()
        run()
        return 1e6 * (time.perf_counter() - t) / len(calls)
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        run()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    graph.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(1e3 * start.elapsed_time(end))
    return statistics.median(times) / len(calls)


def eager_us(fn: Callable[[], object], device: torch.device, calls: int = 20,
             reps: int = 5) -> float:
    """Microseconds per call of fn launched `calls` times back to back without a graph, between
    two CUDA events (the median of `reps`); after one warm-up call. Device time when the host
    launches faster than the device runs; on the CPU, host time."""
    fn()
    sync(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            end.synchronize()
            times.append(1e3 * start.elapsed_time(end) / calls)
        else:
            t = time.perf_counter()
            for _ in range(calls):
                fn()
            times.append(1e6 * (time.perf_counter() - t) / calls)
    return statistics.median(times)


def host_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Wall time of one call of fn until the device has finished it, in ms."""
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return 1e3 * (time.perf_counter() - t)


def l2_bytes(device: torch.device) -> int:
    """The GPU's L2 cache size (0 on the CPU)."""
    if device.type != "cuda":
        return 0
    return getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)


# --- roofline -------------------------------------------------------------------------------

def copy_bandwidth(device: torch.device) -> float:
    """Bytes/s of a large device-to-device copy (bytes read plus bytes written), as
    demos/benchmark.py measures it: 1 GiB on a GPU, 256 MiB on the CPU, median of 5."""
    nbytes = (1 << 30) if device.type == "cuda" else (256 << 20)
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    times = [host_ms(lambda: dst.copy_(src), device) for _ in range(6)]
    return 2 * nbytes / (1e-3 * statistics.median(times[1:]))


def step_bytes(model: Transformer, batch: int, context: int) -> int:
    """Fewest bytes one decode step moves on one rank (demos/benchmark.py's roofline): each of
    its weights once (embedding: only B rows), plus its K/V heads."""
    cfg, local = model.config, model.local
    elem = torch.empty((), dtype=model.dtype).element_size()
    weights = model.weight_bytes  # quantized weights count their stored bytes
    if not cfg.tie_word_embeddings:
        weights -= nbytes(model.embed.weight)
    kv = 2 * cfg.num_layers * local.kv_size * elem * batch * (context + 1)
    return weights + kv + batch * cfg.hidden_size * elem


# --- switches: one engine choice at a time, for A/B runs in one process ---------------------
# They replace module-level functions of the engine's kernel modules; every switch has a default
# that restores the committed behaviour. Kernels captured in CUDA graphs keep the choice made at
# capture: recapture after switching.

_PDL_SUPPORTED = pdl._supported
_ROPE_RULE = rope_kv.tokens_per_program
_GEMV_RULE = gemv_kernels.gemv_config


def set_pdl(enabled: bool = True) -> None:
    """Programmatic dependent launch for the Triton kernels launched from now on: where the GPU
    supports it (the engine's default), or never."""
    pdl._supported = _PDL_SUPPORTED if enabled else (lambda device: False)


def set_rope_tokens(tokens: int | None = None) -> None:
    """Tokens per program of the RoPE + K/V-write kernel for prompts (> 128 tokens; decode keeps
    one): `tokens`, or the engine's rule (None)."""
    if tokens is None:
        rope_kv.tokens_per_program = _ROPE_RULE
    else:
        rope_kv.tokens_per_program = lambda n: 1 if n <= 128 else tokens


def dot_config(n: int, k: int, glu: bool, elem_bytes: int, n_sm: int, norm: bool) -> GemvConfig:
    """The block sizes of the GEMV's tensor-core dot path (the engine's rule for more than one row
    of x, which does not depend on the number of rows)."""
    return _GEMV_RULE(2, n, k, glu, elem_bytes, n_sm, norm)


def set_gemv_dot(enabled: bool = False) -> None:
    """GEMV block sizes from now on: the engine's rule (one row: the CUDA-core path), or the dot
    path's at every number of rows (the kernels of v7, before the one-row path)."""
    if enabled:
        gemv_kernels.gemv_config = lambda m, n, k, glu=False, elem_bytes=2, n_sm=132, norm=False: (
            dot_config(n, k, glu, elem_bytes, n_sm, norm))
    else:
        gemv_kernels.gemv_config = _GEMV_RULE


# --- kernel table ---------------------------------------------------------------------------

_CATEGORIES = (  # (part of the lower-cased kernel name, category): the first match wins
    ("_gemv_kernel", "GEMV (Triton)"),
    ("_rope_kv", "RoPE + K/V write"),
    ("_add_rms_norm", "add + RMSNorm"),
    ("_silu_mul", "SiLU*up"),
    ("_combine_kernel", "paged attention (merge)"),
    ("_partial_kernel", "paged attention / split argmax (both Triton '_partial_kernel')"),
    ("_final_kernel", "split argmax (final)"),
    ("sdpa", "attention (SDPA)"),
    ("flash", "attention (SDPA)"),
    ("fmha", "attention (SDPA)"),
    ("nccl", "all-reduce"),
    ("all_reduce", "all-reduce"),
    ("allreduce", "all-reduce"),
    ("gemm", "GEMM (cuBLAS)"),
    ("gemv", "GEMM (cuBLAS)"),
    ("nvjet", "GEMM (cuBLAS)"),
    ("xmma", "GEMM (cuBLAS)"),
    ("cutlass", "GEMM (cuBLAS)"),
    ("splitk", "GEMM (cuBLAS)"),
    ("argmax", "torch argmax"),
    ("memcpy", "memcpy / memset"),
    ("memset", "memcpy / memset"),
    ("aten::linear", "GEMM (CPU)"),
    ("aten::scaled_dot_product", "attention (SDPA)"),
)


def category(kernel: str) -> str:
    """The category of a kernel (or, on the CPU, a top-level op) by its name."""
    low = kernel.lower()
    return next((c for part, c in _CATEGORIES if part in low), "other")


def kernel_times(fn: Callable[[], object], device: torch.device) -> dict[str, list[float]]:
    """{kernel name: [launches, total us]} of one call of fn under the torch profiler: the GPU's
    kernels and copies; on the CPU, the top-level ops' own times."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    sync(device)
    with profile(activities=activities) as prof:
        fn()
        sync(device)
    out: dict[str, list[float]] = {}
    for e in prof.events():
        if device.type == "cuda":
            if e.device_type != DeviceType.CUDA:
                continue
            us = e.time_range.elapsed_us()
        else:
            if e.cpu_parent is not None or not e.name.startswith("aten::"):
                continue
            us = e.cpu_time_total
        entry = out.setdefault(e.name, [0, 0.0])
        entry[0] += 1
        entry[1] += us
    return out


def print_kernel_tables(times: dict[str, list[float]], per: int = 1, top: int = 15) -> float:
    """Print the kernel time by category and the `top` kernels, divided by `per` (e.g. steps
    profiled); returns the total in us (divided too)."""
    total = sum(us for _, us in times.values()) / per
    cats: dict[str, list[float]] = {}
    for name, (n, us) in times.items():
        c = cats.setdefault(category(name), [0, 0.0])
        c[0] += n / per
        c[1] += us / per
    print_table(["category", "launches", "us", "% of kernel time"],
                [[c, f"{n:g}", f"{us:.1f}", f"{100 * us / max(total, 1e-9):.1f}"]
                 for c, (n, us) in sorted(cats.items(), key=lambda kv: -kv[1][1])])
    ranked = sorted(times.items(), key=lambda kv: -kv[1][1])[:top]
    print_table(["kernel", "category", "launches", "us"],
                [[name if len(name) <= 70 else name[:67] + "...", category(name), f"{n / per:g}",
                  f"{us / per:.1f}"] for name, (n, us) in ranked])
    return total


# --- output ---------------------------------------------------------------------------------

def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A markdown table (a blank line before it)."""
    print("\n| " + " | ".join(headers) + " |")
    print("|" + "---|" * len(headers))
    for row in rows:
        print("| " + " | ".join(str(x) for x in row) + " |")
    sys.stdout.flush()


def fmt(x: float | None, digits: int = 1) -> str:
    """A number with `digits` decimals, or '-' for None."""
    return "-" if x is None else f"{x:.{digits}f}"
