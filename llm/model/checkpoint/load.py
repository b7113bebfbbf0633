"""Checkpoint loading: HF safetensors directories and GGUF files -> one canonical state dict.

Pickle checkpoints (`.bin`, `.pt`, `.pth`) are refused, never unpickled. GGUF files are converted
once (`llm.model.checkpoint.gguf`: dequantized, Q/K un-permuted, renamed) and cached as a
safetensors file keyed by the GGUF content's sha256 (`llm.model.checkpoint.gguf_cache`, see
`weights_cache/README.md`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from llm.model.checkpoint.common import (
    INT4_MODES,
    PICKLE_SUFFIXES,
    QUANTIZE_MODES,
    WEIGHT_MODES,
    Checkpoint,
    CheckpointError,
    check_finite,
    pickle_error,
)
from llm.model.checkpoint.gguf_cache import load_gguf_cached
from llm.model.checkpoint.hf import load_hf_dir
from llm.model.paths import default_cache_dir
from llm.model.quant.int_formats import INT4_PACK
from llm.model.quant.quantize import quantize_int4, quantize_int8
from llm.model.quant.tensor import QuantizedTensor


def load_checkpoint(
    path: str | Path, *, cache_dir: str | Path | None = None, progress: bool = True,
    weights: str = "dequantize", int4_group: int | None = None,
) -> Checkpoint:
    """Load a Hugging Face safetensors directory or a GGUF file into canonical HF tensors.

    GGUF files are converted once and cached in `cache_dir` (default: `default_cache_dir()`).
    `progress` shows tqdm bars while hashing, converting and loading. `weights` (one of
    WEIGHT_MODES): "dequantize" gives floating-point tensors only; "stored" keeps a GGUF's
    quantized tensors as stored (QuantizedTensor); "int8" / "int4" / "int4_mix" quantize a
    floating-point checkpoint's 2-D weights at load (a GGUF is already quantized: use "stored";
    `matrix_mode` says which matrices of "int4" / "int4_mix" are int8). `int4_group`: with
    weights="int4" / "int4_mix", the group size of every int4 matrix (a multiple of 32 dividing
    its in_features; default: `int4_group`'s choice per matrix).
    """
    check_weights(weights, int4_group)
    path, kind = resolve_checkpoint(path)
    if kind == "dir":
        config, tensors = load_hf_dir(path, progress)
        check_finite(tensors, path)
        if weights in QUANTIZE_MODES:
            tensors = quantize_matrices(tensors, weights, progress, int4_group)
        return Checkpoint(config=config, tensors=tensors, source=path)
    if weights in QUANTIZE_MODES:
        raise CheckpointError(f"{path}: weights={weights!r} quantizes a floating-point Hugging "
                              "Face checkpoint; a GGUF runs as stored (weights='stored') or "
                              "dequantized")
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    config, tensors, digest = load_gguf_cached(path, cache, progress, stored=weights == "stored")
    return Checkpoint(config=config, tensors=tensors, source=path, source_sha256=digest)


WIDER_IN_INT4 = ("model.embed_tokens.weight", "lm_head.weight")  # int8 in "int4" mode
# int8 in "int4_mix" too: on stories15M (docs/performance.md) v_proj alone in int4 costs +5.9%
# perplexity, down_proj with its 128-column groups +3.0%, each other projection 0.3-1.9%
WIDER_IN_INT4_MIX = ("self_attn.v_proj.weight", "mlp.down_proj.weight")


def matrix_mode(name: str, mode: str) -> str:
    """The format kind, "int8" or "int4", of matrix `name` quantized at load in `mode` (one of
    QUANTIZE_MODES): "int4" and "int4_mix" keep the embedding and LM head in int8, "int4_mix"
    also v_proj and down_proj."""
    if mode == "int8" or name in WIDER_IN_INT4:
        return "int8"
    if mode == "int4_mix" and name.endswith(WIDER_IN_INT4_MIX):
        return "int8"
    return "int4"


def check_weights(weights: str, int4_group: int | None = None) -> None:
    """CheckpointError unless `weights` is one of WEIGHT_MODES and `int4_group` (None, or with
    "int4" / "int4_mix" a positive multiple of 32) goes with it."""
    if weights not in WEIGHT_MODES:
        raise CheckpointError(f"weights must be one of {', '.join(WEIGHT_MODES)}, got "
                              f"{weights!r}")
    if int4_group is not None and (isinstance(int4_group, bool) or not isinstance(int4_group, int)):
        raise CheckpointError(f"int4_group must be an int, got {int4_group!r}")
    if int4_group is not None and weights not in INT4_MODES:
        raise CheckpointError(f"int4_group applies to weights='int4' or 'int4_mix', not "
                              f"{weights!r}")
    if int4_group is not None and (int4_group <= 0 or int4_group % INT4_PACK):
        raise CheckpointError(f"int4_group must be a positive multiple of {INT4_PACK}, got "
                              f"{int4_group}")


def quantize_matrices(tensors: dict[str, torch.Tensor], mode: str, progress: bool,
                      group: int | None = None) -> dict[str, torch.Tensor | QuantizedTensor]:
    """Every 2-D weight (projections, embedding, LM head) quantized at load (`quantize_matrix`);
    norms and biases stay as they are. group: the int4 group of every int4 matrix (default:
    `int4_group`'s choice per matrix)."""
    out: dict[str, torch.Tensor | QuantizedTensor] = {}
    bar = tqdm(tensors.items(), desc=f"quantizing to {mode}", unit="tensor", disable=not progress)
    for name, t in bar:
        out[name] = t if t.dim() != 2 else quantize_matrix(name, t, mode, group=group)
    return out


def quantize_matrix(name: str, t: torch.Tensor, mode: str, in_features: int | None = None,
                    absmax: torch.Tensor | None = None, group: int | None = None
                    ) -> QuantizedTensor:
    """Matrix `name` (or a slice of it: rows, or columns at whole int4 groups) quantized at load:
    "int8" per output channel; "int4" / "int4_mix" per group of `group` columns (default
    `int4_group`'s), with the matrices `matrix_mode` names in int8 (the embedding and LM head
    as llama.cpp's K-quant mixes keep them wider: on the default model's weights, perplexity
    53.4 with them in int4, 47.6 in int8, bf16 29.3; demos/eval.py). in_features: the whole
    matrix's (default t's; it picks the int4 group). absmax: for an int8 column slice, the whole
    rows' max |w| (`quantize_int8`)."""
    if matrix_mode(name, mode) == "int8":
        return quantize_int8(t, absmax)
    if group is None:
        group = int4_group(name, in_features or t.shape[1])
    elif t.shape[1] % group:
        raise CheckpointError(f"{name}: in_features {t.shape[1]} is no multiple of the int4 "
                              f"group {group}")
    return quantize_int4(t, group)


def int4_group(name: str, in_features: int) -> int:
    """The int4 group of a matrix with `in_features` columns: 128, or 64 / 32 where
    in_features is no multiple of 128; CheckpointError naming `name` if none divides it."""
    group = next((g for g in (128, 64, 32) if in_features % g == 0), None)
    if group is None:
        raise CheckpointError(f"{name}: in_features {in_features} is no multiple of 32, the "
                              "smallest int4 group")
    return group


def resolve_checkpoint(path: str | Path) -> tuple[Path, str]:
    """The resolved path of a checkpoint and its kind, "dir" (Hugging Face) or "gguf"; anything
    else (missing path, pickle, a lone safetensors file, unknown file) is a CheckpointError.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    path = path.resolve()
    if path.is_dir():
        return path, "dir"
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise pickle_error(path, [path.name])
    if path.suffix.lower() == ".gguf" or _has_gguf_magic(path):
        return path, "gguf"
    if path.suffix == ".safetensors":
        raise CheckpointError(
            f"{path}: a safetensors file alone has no model config; "
            "pass its directory (with config.json)"
        )
    raise CheckpointError(
        f"{path}: not a checkpoint (expected a Hugging Face directory with safetensors "
        "or a .gguf file)"
    )


def _has_gguf_magic(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"
