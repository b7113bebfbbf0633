"""Which projections int4 hurts: each kind (q, k, v, o, gate, up, down) alone quantized to int4
at a group size, the rest kept as float32, with its relative weight error and perplexity.

    python demos/export_hf.py --out /tmp/smollm2-hf
    python bench/int4_sensitivity.py --model /tmp/smollm2-hf --groups 32,64

CPU, float32 compute, torch backend; the text and windows as demos/eval.py's. Backs the
diagnosis in docs/performance.md ("Perplexity of int8 / int4 on a real model").
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from llm.backends.torch.runner import TorchBackend  # noqa: E402
from llm.model.checkpoint.common import CheckpointError  # noqa: E402
from llm.model.checkpoint.load import load_checkpoint, quantize_matrix  # noqa: E402
from llm.model.config import RuntimeConfig  # noqa: E402
from llm.model.paths import default_cache_dir  # noqa: E402
from llm.model.tokenizer.tokenizer import Tokenizer  # noqa: E402

KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def eval_demo():
    spec = importlib.util.spec_from_file_location("eval_demo", ROOT / "demos" / "eval.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="Hugging Face directory")
    p.add_argument("--text", type=Path, default=ROOT / "demos" / "data" / "eval_text.txt")
    p.add_argument("--groups", default="32,64",
                   help="comma list of int4 group sizes ('default': the loader's, 128 or 64 / 32 "
                   "where a matrix's width needs it)")
    p.add_argument("--window", type=int, default=512)
    args = p.parse_args(argv)
    ev = eval_demo()
    base = load_checkpoint(args.model, progress=False)
    ids = Tokenizer.from_path(args.model, cache_dir=default_cache_dir()).encode(
        args.text.read_text(encoding="utf-8"))
    blocks = -(-args.window // 32) * 32
    runtime = RuntimeConfig(device="cpu", dtype="float32", max_batch=1, max_seq_len=blocks,
                            block_size=32)
    dense = TorchBackend(base, runtime, cuda_graphs=False)

    def reference(part: list[int]) -> torch.Tensor:
        return ev.engine_logits(dense, part)

    s = ev.score(dense, reference, ids, args.window)
    print(f"float32: ppl {s.ppl:.3f} over {s.tokens} tokens")
    print("| kind in int4 | group | relative weight error | ppl | top-1 vs float32 |")
    print("|---|---|---|---|---|")
    for kind in KINDS:
        names = [n for n in base.tensors if n.endswith(f".{kind}.weight")]
        for group in (None if g == "default" else int(g) for g in args.groups.split(",")):
            tensors = dict(base.tensors)
            err = norm = 0.0
            for name in names:
                w = base.tensors[name].float()
                try:
                    tensors[name] = quantize_matrix(name, w, "int4", group=group)
                except CheckpointError as e:  # a group that does not divide the width
                    print(f"error: {e}", file=sys.stderr)
                    return 1
                err += float(((tensors[name].dequantize() - w) ** 2).sum())
                norm += float((w ** 2).sum())
            ours = TorchBackend(dataclasses.replace(base, tensors=tensors), runtime,
                                cuda_graphs=False)
            s = ev.score(ours, reference, ids, args.window)
            print(f"| {kind} | {group or 'default'} | {math.sqrt(err / norm):.4f} | {s.ppl:.3f} | "
                  f"{s.top1:.4f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
