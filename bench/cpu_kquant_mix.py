"""A K-quant mix (llama-quantize's Q4_K_M / Q5_K_M layouts: q, k, o and gate / up in Q4_K / Q5_K,
attn_v and ffn_down in Q6_K in half the layers, the head in Q6_K) decoded on the CPU in float32 by
the C kernels: one C call a layer (`layer_decode`, whose projections may be row blocks of two
formats) against the per-op path (`_layer_plans` off), alternated in one process.

    python bench/cpu_kquant_mix.py
    python bench/cpu_kquant_mix.py --mix q5_k_m --batches 1 --repeats 3

Random planes with the shapes of a ~100M-parameter Llama (hidden 768: K-quants need multiples of
256, which SmolLM2's 576 is not). Reports the median ms of a decode step and tok/s per path.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.common import csv, decode_step_ms, parser, random_checkpoint  # noqa: E402
from bench.quant_decode import MIXES, quantized_checkpoint  # noqa: E402
from llm.backends.torch.runner import TorchBackend  # noqa: E402
from llm.backends.torch.weight import RowBlocks  # noqa: E402
from llm.model.config import ModelConfig, RuntimeConfig  # noqa: E402

CONFIG = ModelConfig(arch="llama", vocab_size=49152, hidden_size=768, intermediate_size=2048,
                     num_layers=12, num_heads=12, num_kv_heads=4, head_dim=64,
                     max_position_embeddings=4096, rope_theta=100000.0, tie_word_embeddings=True)


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--mix", default="q4_k_m", choices=sorted(MIXES))
    p.add_argument("--batches", default="1,4")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--repeats", type=int, default=2, help="A/B alternations")
    args = p.parse_args(argv)
    cpu = torch.device("cpu")
    ck = quantized_checkpoint(random_checkpoint(CONFIG, cpu, torch.float32), args.mix, cpu)
    rt = RuntimeConfig(device="cpu", dtype="float32", max_batch=max(csv(args.batches, int)),
                       max_seq_len=args.prompt_len + args.steps + 32, block_size=32)
    backend = TorchBackend(ck, rt)
    model = backend.model
    mixed = sum(isinstance(layer.attn.wqkv, RowBlocks) for layer in model.layers)
    print(f"{args.mix}: {mixed} of {CONFIG.num_layers} layers with a QKV of two formats, "
          f"weights {model.weight_bytes / 1e6:.0f} MB", flush=True)
    plans = model._layer_plans
    if not plans(backend.cache):
        raise SystemExit("the C layer path does not take this model")
    rows = []
    for r in range(args.repeats):
        for name, rule in (("one C call a layer", plans), ("per op", lambda cache: None)):
            model._layer_plans = rule
            for b in csv(args.batches, int):
                ms = decode_step_ms(backend, b, args.prompt_len, args.steps)
                rows.append((r, name, b, ms))
                print(f"run {r} | {name} | batch {b} | {ms:.2f} ms | {b * 1e3 / ms:.1f} tok/s",
                      flush=True)
    model._layer_plans = plans
    backend.close()
    print("| path | batch | ms a step (runs) | tok/s total (best) |\n|---|---|---|---|")
    for name in ("one C call a layer", "per op"):
        for b in csv(args.batches, int):
            ms = [m for _, n, bb, m in rows if n == name and bb == b]
            print(f"| {name} | {b} | {', '.join(f'{m:.2f}' for m in ms)} | "
                  f"{b * 1e3 / min(ms):.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
