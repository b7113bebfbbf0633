"""Write a GGUF model as a Hugging Face directory (config.json, model.safetensors, tokenizer files).

    python demos/export_hf.py --out /tmp/smollm2-hf                  # the default model, float32
    python demos/export_hf.py --model path/to/model.gguf --out DIR --dtype bfloat16

The conversion is transformers' own (`from_pretrained(..., gguf_file=...)` dequantizes every
tensor and undoes llama.cpp's Q/K permutation; `save_pretrained` writes the directory), not this
engine's GGUF reader, so the engine loading the result is checked against an independent reader.
Its use: a real floating-point Hugging Face checkpoint to measure `--weights int8` / `int4` on
(demos/eval.py), where no model hub is reachable. The default model's weights were Q4_1 in the
GGUF: the directory holds those dequantized values (float32 keeps them exactly), not the
original fp16 SmolLM2.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout

from demos.help_format import DefaultsOnce  # noqa: E402
from llm.model.checkpoint.gguf import open_gguf  # noqa: E402
from llm.model.checkpoint.load import resolve_checkpoint  # noqa: E402
from llm.model.files import umask  # noqa: E402
from llm.model.paths import default_model_path  # noqa: E402

DTYPES = ("float32", "bfloat16", "float16")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=DefaultsOnce)
    p.add_argument("--model", default=None, help=".gguf file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--out", type=Path, required=True, help="directory to write (new or empty)")
    p.add_argument("--dtype", default="float32", choices=DTYPES,
                   help="dtype of the written weights (float32 keeps dequantized values exactly)")
    return p.parse_args(argv)


def export_hf(gguf: Path, out: Path, dtype: str = "float32") -> Path:
    """Convert `gguf` with transformers and save it as a Hugging Face directory `out`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    path, kind = resolve_checkpoint(gguf)
    if kind != "gguf":
        raise ValueError(f"{path}: not a GGUF file (this exports GGUF models only)")
    _check_out(out)
    open_gguf(path)  # a corrupt or truncated file: an error naming it (and the cut tensor)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    return save_hf(model, tokenizer, out)


def save_hf(model, tokenizer, out: Path) -> Path:
    """Save a transformers model loaded from a GGUF, and its tokenizer, as directory `out`.

    The GGUF load leaves a "gguf" quantization marker that save_pretrained refuses, though the
    tensors are plain floating point: the same architecture without it takes them unchanged.
    """
    from transformers import AutoModelForCausalLM

    _check_out(out)
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    plain.load_state_dict(model.state_dict(), strict=True)
    out.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    for weights in out.glob("*.safetensors"):  # safetensors writes them 0600, the rest 0666
        weights.chmod(0o666 & ~umask())
    return out


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is a file, not a directory")
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out}: the directory is not empty")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        out = export_hf(Path(args.model) if args.model else default_model_path(), args.out,
                        args.dtype)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}: " + ", ".join(sorted(p.name for p in out.iterdir())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
