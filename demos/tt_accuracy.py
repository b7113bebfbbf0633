"""Accuracy of the tt backend's precision policies: teacher-forced top-1 / top-5 per preset.

    python demos/tt_accuracy.py                      # default model, demos/data/eval_text.txt
    python demos/tt_accuracy.py --max-tokens 64 --configs performance

Like tt_transformers' accuracy table: the text is tokenized once and scored teacher-forced in
windows of --window tokens (each window a fresh sequence, one prefill on the tt backend, mesh
1x1). Per position, the tt backend's logits are compared with the torch backend's in float32
(every weight dequantized) and in bfloat16: top-1 = both pick the same most likely token; top-5 =
the reference's most likely token is among the tt backend's five most likely. A configuration is
POLICY or POLICY:PRESET (a decoder-precision preset of llm/backends/tt/precision.py);
"performance" alone is what the policy gives this model (per model: see precision.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from demos.eval import DEFAULT_TEXT, build, engine_logits, windows  # noqa: E402
from demos.help_format import DefaultsOnce  # noqa: E402
from llm.backends.tt.precision import POLICIES, PRESETS  # noqa: E402
from llm.backends.tt.runner import TTBackend  # noqa: E402
from llm.model.checkpoint.load import load_checkpoint, resolve_checkpoint  # noqa: E402
from llm.model.config import RuntimeConfig  # noqa: E402
from llm.model.paths import default_cache_dir, default_model_path  # noqa: E402
from llm.model.tokenizer.tokenizer import Tokenizer  # noqa: E402

DEFAULT_CONFIGS = ("accuracy", "performance", "performance:bf4-mlp",
                   "performance:bf8-mlp-last-decoder", "performance:bf16-attention-bf8-mlp")


@dataclass
class Row:
    config: str
    described: str
    tokens: int
    top1_fp32: float
    top5_fp32: float
    top1_bf16: float


def parse_config(text: str) -> tuple[str, str | None]:
    """"POLICY" or "POLICY:PRESET" -> (policy, preset or None), checked."""
    policy, _, preset = text.partition(":")
    if policy not in POLICIES:
        raise ValueError(f"--configs {text!r}: policy must be one of {', '.join(POLICIES)}")
    if preset and preset not in PRESETS:
        raise ValueError(f"--configs {text!r}: preset must be one of {', '.join(PRESETS)}")
    return policy, preset or None


def tt_logits(backend: TTBackend, window: list[int]) -> torch.Tensor:
    """Teacher-forced logits [S, V] (fp32, CPU) of one window from position 0: one prefill,
    the LM head applied tile by tile."""
    ttnn, mesh, model = backend.mesh.ttnn, backend.mesh, backend.model
    n = len(window)
    s = backend.cfg.prefill_length(n)
    tok = torch.zeros(1, 1, 1, s, dtype=torch.int64)
    tok[0, 0, 0, :n] = torch.tensor(window)
    pages = torch.arange(1, backend.runtime.blocks_per_seq + 1)[None]  # [1, max_blocks]

    def put(values: torch.Tensor, dtype):
        return ttnn.from_torch(values, dtype=dtype, layout=ttnn.ROW_MAJOR_LAYOUT,
                               device=mesh.device, memory_config=ttnn.DRAM_MEMORY_CONFIG)

    hidden = model.prefill_hidden(put(tok, ttnn.uint32), put(pages, ttnn.int32),
                                  length=n)  # [1, 1, S, dim]
    tiles = [mesh.read(model.tile_logits(hidden, t)).reshape(32, -1)
             for t in range(-(-n // 32))]  # [32, V] each
    return torch.cat(tiles)[:n, :backend.config.vocab_size].float()  # [S, V]


def evaluate(args: argparse.Namespace) -> list[Row]:
    path, _ = resolve_checkpoint(args.model or default_model_path())
    configs = [parse_config(c) for c in args.configs]
    tokenizer = Tokenizer.from_path(path, cache_dir=default_cache_dir())
    ids = tokenizer.encode(args.text.read_text(encoding="utf-8"))[:args.max_tokens]
    chunks = windows(ids, args.window)
    if not chunks:
        raise ValueError(f"{args.text}: too short to score ({len(ids)} tokens)")
    refs = {}
    for dtype in ("float32", "bfloat16"):
        backend = build(path, "dequantize", "cpu", dtype, args.window)
        with torch.no_grad():
            refs[dtype] = [engine_logits(backend, w)[:-1].argmax(-1) for w in chunks]  # [S-1]
        del backend
    checkpoint = load_checkpoint(path, progress=False)
    runtime = RuntimeConfig(max_batch=1, max_seq_len=-(-args.window // 32) * 32, block_size=32)
    rows = []
    for text, (policy, preset) in zip(args.configs, configs):
        backend = TTBackend(checkpoint, runtime, precision_policy=policy,
                            decoder_precision=preset, implementation="emulator", trace=False)
        top1 = top5 = top1_bf16 = count = 0
        for window, fp32, bf16 in zip(chunks, refs["float32"], refs["bfloat16"]):
            ours = tt_logits(backend, window)[:-1]  # [S-1, V]
            top1 += int((ours.argmax(-1) == fp32).sum())
            top5 += int((ours.topk(5, dim=-1).indices == fp32[:, None]).any(-1).sum())
            top1_bf16 += int((ours.argmax(-1) == bf16).sum())
            count += len(window) - 1
        rows.append(Row(text, backend.describe(), count, top1 / count, top5 / count,
                        top1_bf16 / count))
        backend.close()
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=DefaultsOnce)
    p.add_argument("--model", default=None, help="HF directory or .gguf (default: SmolLM2-135M)")
    p.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="UTF-8 text file to score")
    p.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS),
                   help="POLICY or POLICY:PRESET, each a row of the table")
    p.add_argument("--window", type=int, default=512, help="tokens per teacher-forced window")
    p.add_argument("--max-tokens", type=int, default=1024, help="score at most this many tokens")
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.window < 2:
            raise ValueError(f"--window must be at least 2, got {args.window}")
        rows = evaluate(args)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("| configuration | tokens | top-1 vs fp32 | top-5 vs fp32 | top-1 vs bf16 |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.config} | {r.tokens} | {r.top1_fp32:.3f} | {r.top5_fp32:.3f} | "
              f"{r.top1_bf16:.3f} |")
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
