"""Decode A/B in one process: one backend per model shape (random weights), one engine choice
switched per variant, the decode CUDA graphs recaptured for each, the variants alternated
--repeats times. A cell is ms per decode step as demos/benchmark.py measures it: the median host
time of a greedy step through the backend (CUDA graphs, the next step launched ahead).

A variant is `default` (the engine as committed) or switches joined by '+', each away from the
default (listed first):
  gemv=fma|cublas|dot  decode batches of one row: the one-row CUDA-core GEMVs; cuBLAS
                       (gemv_max_batch 0); or the tensor-core dot GEMVs (v7's kernels; the LM
                       head goes through the GEMV too, as since v8, where v7 kept cuBLAS)
  pdl=on|off           programmatic dependent launch of the Triton kernels
  argmax=split|torch   the greedy token by the split Triton argmax, or torch.argmax
e.g. `gemv=dot+pdl=off+argmax=torch` is the v7 code path on today's kernels.

docs/performance.md:
  python bench/decode_ab.py --configs 1b,8b --batches 1 \\
      --variants gemv=cublas+pdl=off+argmax=torch,gemv=dot+pdl=off+argmax=torch   # v7 checked
  python bench/decode_ab.py --configs 1b,8b --batches 1,4 --repeats 2 \\
      --variants pdl=off+argmax=torch,argmax=torch                                # v9
  python bench/decode_ab.py --configs 1b,8b --batches 1,32 --repeats 3 \\
      --variants argmax=torch,default                                             # v11
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    SHAPES,
    build_backend,
    configs_for,
    copy_bandwidth,
    csv,
    decode_step_ms,
    device_for,
    dtype_for,
    parser,
    print_table,
    set_gemv_dot,
    set_pdl,
    step_bytes,
)
from llm.backends.torch.graphs import DecodeGraphs  # noqa: E402
from llm.backends.torch.model import GEMV_MAX_BATCH  # noqa: E402
from llm.backends.torch.runner import TorchBackend  # noqa: E402

SWITCHES = {"gemv": ("fma", "cublas", "dot"), "pdl": ("on", "off"), "argmax": ("split", "torch")}


def parse_variant(text: str) -> dict[str, str]:
    """'default' or 'key=value+key=value' -> every switch's value."""
    settings = {key: values[0] for key, values in SWITCHES.items()}
    if text == "default":
        return settings
    for part in text.split("+"):
        key, _, value = part.partition("=")
        if value not in SWITCHES.get(key, ()):
            sys.exit(f"bad switch {part!r} in variant {text!r}; switches: "
                     + ", ".join(f"{k}={'|'.join(v)}" for k, v in SWITCHES.items()))
        settings[key] = value
    return settings


def apply(backend: TorchBackend, settings: dict[str, str]) -> None:
    """Set the switches on the backend's model and kernels, then recapture the decode graphs."""
    model = backend.model
    model.gemv_max_batch = 0 if settings["gemv"] == "cublas" else GEMV_MAX_BATCH
    set_gemv_dot(settings["gemv"] == "dot")
    set_pdl(settings["pdl"] == "on")
    model.lm_head.fused_argmax = settings["argmax"] == "split"
    if backend.device.type == "cuda":
        backend.graphs = None
        torch.cuda.empty_cache()
        graphs = DecodeGraphs(model, backend.cache, backend.runtime.max_batch,
                              backend.runtime.blocks_per_seq, backend.penalties)
        graphs.capture()
        backend.graphs = graphs


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--configs", default="1b,8b", help="comma list of: " + ", ".join(SHAPES))
    p.add_argument("--batches", default="1", help="comma list of decode batch sizes")
    p.add_argument("--variants", default="default", help="comma list of variants (see above)")
    p.add_argument("--prompt-len", type=int, default=128, help="tokens of each user's prompt")
    p.add_argument("--steps", type=int, default=48, help="decode steps per cell (2 not counted)")
    p.add_argument("--repeats", type=int, default=2, help="alternations of all the variants")
    p.add_argument("--cache-len", type=int, default=None,
                   help="max_seq_len the cache is sized for, which sets the paged attention's "
                        "split count (None: prompt + steps + 8)")
    args = p.parse_args(argv)
    device, dtype = device_for(args), dtype_for(args)
    variants = csv(args.variants)
    settings = {v: parse_variant(v) for v in variants}
    batches = csv(args.batches, int)
    cache_len = args.cache_len or args.prompt_len + args.steps + 8
    bw = copy_bandwidth(device)
    print(f"# {device} {dtype}, copy bandwidth {bw / 1e9:.0f} GB/s", flush=True)
    rows = []
    for name in configs_for(args, csv(args.configs)):
        backend = build_backend(SHAPES[name], device, dtype, max(batches), cache_len)
        runs: dict[tuple[int, str], list[float]] = {}
        for r in range(args.repeats):
            for v in variants:
                apply(backend, settings[v])
                for b in batches:
                    ms = decode_step_ms(backend, b, args.prompt_len, args.steps)
                    runs.setdefault((b, v), []).append(ms)
                    print(f"{name} batch {b} run {r + 1} {v}: {ms:.3f} ms/step", flush=True)
        apply(backend, parse_variant("default"))
        for b in batches:
            base = statistics.median(runs[(b, variants[0])])
            floor = step_bytes(backend.model, b, args.prompt_len + args.steps // 2) / bw
            for v in variants:
                ms = statistics.median(runs[(b, v)])
                rows.append([name, b, v, " / ".join(f"{x:.3f}" for x in runs[(b, v)]),
                             f"{ms:.3f}", f"{100 * (ms / base - 1):+.1f}%",
                             f"{1e3 * b / ms:,.0f}", f"{100 * 1e3 * floor / ms:.1f}"])
        del backend
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print_table(["config", "batch", "variant", "ms/step, each run", "median", "vs first",
                 "tok/s total", "% roofline"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
