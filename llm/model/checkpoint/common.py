"""What every checkpoint reader shares: the Checkpoint, its error, and the strict tensor check.

The canonical state dict uses Hugging Face names and layout
(`model.layers.{i}.self_attn.q_proj.weight`, (out, in) matrices, rotate-half RoPE order of Q/K
rows). Loading is strict: a missing, unexpected or wrong-shape tensor is a `CheckpointError` naming
the tensor and the file.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from llm.model.config import ModelConfig

if TYPE_CHECKING:
    import torch

    from llm.model.quant.tensor import QuantizedTensor

# How load_checkpoint hands the weights over: "dequantize" (every tensor floating point; a GGUF's
# quantized tensors dequantized), "stored" (a GGUF's quantized tensors kept as stored), "int8" /
# "int4" (a floating-point checkpoint's matrices quantized at load, per channel / per group),
# "int4_mix" (int4 with v_proj and down_proj in int8, the projections int4 hurts most).
WEIGHT_MODES = ("dequantize", "stored", "int8", "int4", "int4_mix")
QUANTIZE_MODES = ("int8", "int4", "int4_mix")  # the modes that quantize at load
INT4_MODES = ("int4", "int4_mix")  # ... with int4 matrices (an int4 group applies)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
# Non-persistent RoPE buffers some old exports saved: not weights (transformers ignores them too).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    """A checkpoint cannot be loaded: unsupported format, unreadable file or mismatched tensors."""


@dataclass(frozen=True)
class Checkpoint:
    """Loaded weights: canonical HF names and layout, CPU tensors in their stored dtype.

    Dtypes: an HF directory keeps its file dtypes (often bf16); a GGUF gives float16/bfloat16 for
    F16/BF16 tensors, float32 for F32 ones, and for quantized ones float32 (dequantized) or, loaded
    with weights="stored", a `llm.model.quant.QuantizedTensor` holding the stored blocks (as do
    matrices quantized at load with weights="int8" / "int4" / "int4_mix"). Backends cast float
    tensors to their runtime dtype.
    """

    config: ModelConfig
    tensors: dict[str, torch.Tensor | QuantizedTensor]
    source: Path
    source_sha256: str | None = None  # content hash of a GGUF source (its cache key)


def expected_tensors(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The canonical tensor names of a model and their shapes, in checkpoint order."""
    h, ffn, q, kv = config.hidden_size, config.intermediate_size, config.q_size, config.kv_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, h)}
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (h,)
        for proj, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            shapes[f"{p}self_attn.{proj}.weight"] = (rows, h)
            if config.qkv_bias:
                shapes[f"{p}self_attn.{proj}.bias"] = (rows,)
        if config.qk_norm:
            shapes[p + "self_attn.q_norm.weight"] = (config.head_dim,)
            shapes[p + "self_attn.k_norm.weight"] = (config.head_dim,)
        shapes[p + "self_attn.o_proj.weight"] = (h, q)
        if config.o_bias:
            shapes[p + "self_attn.o_proj.bias"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        for proj, rows, cols in (("gate_proj", ffn, h), ("up_proj", ffn, h), ("down_proj", h, ffn)):
            shapes[f"{p}mlp.{proj}.weight"] = (rows, cols)
            if config.mlp_bias:
                shapes[f"{p}mlp.{proj}.bias"] = (rows,)
    shapes["model.norm.weight"] = (h,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    return shapes


def check_tensors(
    shapes: Mapping[str, tuple[int, ...]],
    config: ModelConfig,
    origin: Mapping[str, str],
    source: Path | str,
) -> None:
    """Raise `CheckpointError` unless `shapes` (name -> shape) are exactly what `config` expects.

    `origin` names the file (and original tensor name) each tensor came from; `source` is named for
    missing tensors. Call after dropping the tensors a loader ignores (`is_ignored`).
    """
    expected = expected_tensors(config)
    problems = []
    for name, shape in expected.items():
        if name not in shapes:
            problems.append(f"missing tensor {name!r} (expected shape {list(shape)}) in {source}")
        elif tuple(shapes[name]) != shape:
            problems.append(
                f"tensor {name!r} in {origin[name]} has shape {list(shapes[name])}, "
                f"expected {list(shape)}"
            )
    problems += [
        f"unexpected tensor {name!r} in {origin[name]}" for name in shapes if name not in expected
    ]
    if problems:
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise CheckpointError(
            f"{source}: tensors do not match the {config.arch} config "
            f"({config.num_layers} layers, hidden {config.hidden_size}):\n  "
            + "\n  ".join(problems[:10]) + more
        )


def is_ignored(name: str, config: ModelConfig) -> bool:
    """Tensors a loader drops silently: RoPE buffers, and a duplicate lm_head of a tied model."""
    tied_head = name == "lm_head.weight" and config.tie_word_embeddings
    return tied_head or name.endswith(_IGNORED_SUFFIXES)


def pickle_error(where: Path, names: list[str]) -> CheckpointError:
    return CheckpointError(
        f"{where}: pickle checkpoints ({', '.join(names)}) are not loaded, because unpickling "
        "can run arbitrary code; convert them to safetensors first (e.g. transformers' "
        "`model.save_pretrained(dir, safe_serialization=True)`)"
    )


_FINITE_CHUNK = 1 << 24  # elements per isfinite pass: a bounded temporary for big matrices


def check_finite(tensors: Mapping[str, torch.Tensor | QuantizedTensor], where: Path) -> None:
    """CheckpointError naming the first tensor of `tensors` (read from `where`) that holds a NaN
    or an infinity: a floating-point tensor's values, or a quantized tensor's floating-point
    planes (its scales and offsets). A corrupt file would otherwise load and generate garbage."""
    import torch

    from llm.model.quant.tensor import QuantizedTensor

    for name, t in tensors.items():
        parts = t.planes.items() if isinstance(t, QuantizedTensor) else (("", t),)
        for plane, values in parts:
            if not values.is_floating_point():
                continue
            flat = values.reshape(-1)
            for start in range(0, flat.numel(), _FINITE_CHUNK):
                chunk = flat[start:start + _FINITE_CHUNK]
                lo, hi = torch.aminmax(chunk)  # NaN propagates: ~20x faster than isfinite
                if bool(torch.isfinite(lo) & torch.isfinite(hi)):
                    continue
                first = start + int((~torch.isfinite(chunk)).nonzero()[0, 0])
                what = f"{name!r}" + (f" (plane {plane!r})" if plane else "")
                raise CheckpointError(f"{where}: tensor {what} holds a non-finite value (NaN or "
                                      f"inf), the first at flat index {first}: the file is "
                                      "corrupt")
