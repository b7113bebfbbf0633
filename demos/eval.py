"""Accuracy of this engine on a text: perplexity, and top-1 / top-5 agreement with a reference run.

    python demos/eval.py                                     # default model as stored, vs fp32
    python demos/eval.py --weights dequantize --dtype bfloat16 --reference transformers
    python demos/eval.py --model path/to/hf_dir --weights int4 --device cuda --dtype bfloat16
    python demos/eval.py --model path/to/hf_dir --weights int4 --int4-group 32   # finer groups

The text (default: demos/data/eval_text.txt, 775 words of English prose) is tokenized once and
scored teacher-forced in windows of --window tokens (each window starts a fresh sequence). Per
position the engine's logits are compared with the reference's: top-1 agreement = both pick the
same most likely token; top-5 = the reference's most likely token is among the engine's five most
likely. Perplexity is exp(mean negative log-likelihood of the text's next tokens) for both.

References: "dequantized" = this engine, torch backend, fp32 on the CPU, every weight dequantized
(weights="dequantize"): it isolates what the quantization and the dtype change; "transformers" =
transformers' own fp32 model of the same checkpoint (its GGUF loader for a .gguf).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from demos.help_format import DefaultsOnce  # noqa: E402
from llm.backends.torch.runner import TorchBackend, check_device  # noqa: E402
from llm.model.checkpoint.common import WEIGHT_MODES  # noqa: E402
from llm.model.checkpoint.load import load_checkpoint, resolve_checkpoint  # noqa: E402
from llm.model.config import RuntimeConfig  # noqa: E402
from llm.model.paths import default_cache_dir, default_model_path  # noqa: E402
from llm.model.tokenizer.tokenizer import Tokenizer  # noqa: E402

DEFAULT_TEXT = Path(__file__).resolve().parent / "data" / "eval_text.txt"


@dataclass
class Result:
    model: str
    device: str
    dtype: str
    weights: str
    reference: str
    tokens: int
    ppl: float
    ppl_reference: float
    top1: float
    top5: float
    weight_bytes: int


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=DefaultsOnce)
    p.add_argument("--model", default=None, help="HF directory or .gguf (default: SmolLM2-135M)")
    p.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="UTF-8 text file to score")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--weights", default="stored", choices=list(WEIGHT_MODES),
                   help="how this engine holds the weights (see llm.LLM)")
    p.add_argument("--int4-group", type=int, default=None,
                   help="with --weights int4 / int4_mix: columns per int4 group, a multiple of 32 "
                        "(default: 128, or 64 / 32 where a matrix's width needs it)")
    p.add_argument("--reference", default="dequantized", choices=["dequantized", "transformers"])
    p.add_argument("--window", type=int, default=512, help="tokens per teacher-forced window")
    p.add_argument("--max-tokens", type=int, default=4096, help="score at most this many tokens")
    p.add_argument("--json", type=Path, default=None, help="also write the result here")
    return p.parse_args(argv)


def windows(ids: list[int], size: int) -> list[list[int]]:
    """Consecutive windows of at most `size` tokens, each long enough to predict one token."""
    return [ids[i:i + size] for i in range(0, len(ids), size) if len(ids[i:i + size]) > 1]


def engine_logits(backend: TorchBackend, window: list[int]) -> torch.Tensor:
    """Teacher-forced logits [S, V] (fp32, CPU) of one window, from position 0."""
    pages = torch.arange(1, backend.runtime.blocks_per_seq + 1, device=backend.device)
    tokens = torch.tensor(window, device=backend.device)
    return backend.model.prefill(tokens, 0, pages, backend.cache, all_logits=True).float().cpu()


def transformers_scorer(path: Path):
    """Teacher-forced fp32 logits of transformers' own model of the checkpoint."""
    from transformers import AutoModelForCausalLM

    if path.is_dir():
        model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                     torch_dtype=torch.float32)
    model.eval()

    def score(window: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return model(torch.tensor([window])).logits[0].float()

    return score


def build(path: Path, weights: str, device: str, dtype: str, window: int,
          int4_group: int | None = None) -> TorchBackend:
    checkpoint = load_checkpoint(path, weights=weights, progress=False, int4_group=int4_group)
    context = checkpoint.config.max_context
    if window > context:
        raise ValueError(f"--window {window} is longer than the model's context of {context} "
                         "tokens")
    blocks = -(-window // 32) * 32
    return TorchBackend(checkpoint, RuntimeConfig(device=device, dtype=dtype, max_batch=1,
                                                  max_seq_len=blocks, block_size=32),
                        cuda_graphs=False)


def evaluate(args: argparse.Namespace) -> Result:
    path, _ = resolve_checkpoint(args.model or default_model_path())
    if args.window < 2:
        raise ValueError(f"--window must be at least 2, got {args.window}")
    if args.max_tokens < 2:
        raise ValueError(f"--max-tokens must be at least 2, got {args.max_tokens}")
    check_device(args.device)  # before the model loads
    try:
        text = args.text.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{args.text}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    # the model first: its loader names a damaged file's tensor, the tokenizer's reader does not
    ours = build(path, args.weights, args.device, args.dtype, args.window, args.int4_group)
    tokenizer = Tokenizer.from_path(path, cache_dir=default_cache_dir())
    ids = tokenizer.encode(text)[:args.max_tokens]
    if len(ids) < 2:
        raise ValueError(f"{args.text}: too short to score ({len(ids)} tokens)")
    if args.reference == "transformers":
        reference = transformers_scorer(path)
    else:
        ref_backend = build(path, "dequantize", "cpu", "float32", args.window)

        def reference(window: list[int]) -> torch.Tensor:
            return engine_logits(ref_backend, window)

    s = score(ours, reference, ids, args.window)
    weights = args.weights if args.int4_group is None else f"{args.weights}_g{args.int4_group}"
    return Result(model=path.name, device=args.device, dtype=args.dtype, weights=weights,
                  reference=args.reference, tokens=s.tokens, ppl=s.ppl,
                  ppl_reference=s.ppl_reference, top1=s.top1, top5=s.top5,
                  weight_bytes=ours.weight_bytes)


@dataclass(frozen=True)
class Scores:
    tokens: int  # next tokens scored
    ppl: float
    ppl_reference: float
    top1: float
    top5: float


def score(ours: TorchBackend, reference: Callable[[list[int]], torch.Tensor], ids: list[int],
          window: int) -> Scores:
    """Perplexities of `ours` and `reference` (teacher-forced logits [S, V] of a window) on
    `ids` in windows of `window` tokens, and how often ours agrees with the reference's top-1."""
    nll = nll_ref = top1 = top5 = count = 0.0
    for part in windows(ids, window):
        a, b = engine_logits(ours, part)[:-1], reference(part)[:-1]  # [S-1, V]
        target = torch.tensor(part[1:])
        nll += float(torch.nn.functional.cross_entropy(a, target, reduction="sum"))
        nll_ref += float(torch.nn.functional.cross_entropy(b, target, reduction="sum"))
        best = b.argmax(-1)  # [S-1]
        top1 += float((a.argmax(-1) == best).sum())
        top5 += float((a.topk(5, dim=-1).indices == best[:, None]).any(-1).sum())
        count += len(part) - 1
    return Scores(tokens=int(count), ppl=math.exp(nll / count),
                  ppl_reference=math.exp(nll_ref / count), top1=top1 / count,
                  top5=top5 / count)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = evaluate(args)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("| model | device | dtype | weights | weight MB | reference | tokens | ppl | ppl ref | "
          "top-1 | top-5 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    r = result
    print(f"| {r.model} | {r.device} | {r.dtype} | {r.weights} | {r.weight_bytes / 1e6:.1f} | "
          f"{r.reference} | {r.tokens} | {r.ppl:.3f} | {r.ppl_reference:.3f} | {r.top1:.4f} | "
          f"{r.top5:.4f} |")
    if args.json is not None:
        args.json.write_text(json.dumps(asdict(result), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
