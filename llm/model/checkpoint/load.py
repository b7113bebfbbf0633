"""Checkpoint loading: HF safetensors directories and GGUF files -> one canonical state dict.

Pickle checkpoints (`.bin`, `.pt`, `.pth`) are refused, never unpickled. GGUF files are converted
once (`llm.model.checkpoint.gguf`: dequantized, Q/K un-permuted, renamed) and cached as a
safetensors file keyed by the GGUF content's sha256 (`llm.model.checkpoint.gguf_cache`, see
`weights_cache/README.md`).
"""

from __future__ import annotations

from pathlib import Path

from llm.model.checkpoint.common import PICKLE_SUFFIXES, Checkpoint, CheckpointError, pickle_error
from llm.model.checkpoint.gguf_cache import load_gguf_cached
from llm.model.checkpoint.hf import load_hf_dir
from llm.model.paths import default_cache_dir


def load_checkpoint(
    path: str | Path, *, cache_dir: str | Path | None = None, progress: bool = True
) -> Checkpoint:
    """Load a Hugging Face safetensors directory or a GGUF file into canonical HF tensors.

    GGUF files are converted once and cached in `cache_dir` (default: `default_cache_dir()`).
    `progress` shows tqdm bars while hashing, converting and loading.
    """
    path, kind = resolve_checkpoint(path)
    if kind == "dir":
        config, tensors = load_hf_dir(path, progress)
        return Checkpoint(config=config, tensors=tensors, source=path)

    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    config, tensors, digest = load_gguf_cached(path, cache, progress)
    return Checkpoint(config=config, tensors=tensors, source=path, source_sha256=digest)


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
