"""Reading and writing safetensors files with errors that name the file and tensor."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from tqdm import tqdm

from llm.model.checkpoint.common import CheckpointError
from llm.model.files import atomic_write


def open_safetensors(file: Path) -> safetensors.safe_open:
    """safe_open, with a corrupt or truncated file reported as a CheckpointError naming it."""
    try:
        return safetensors.safe_open(str(file), framework="pt")
    except Exception as e:  # SafetensorError, OSError: the library's message is kept in ours
        raise CheckpointError(
            f"{file}: cannot read safetensors file (corrupt or truncated?): {e}"
        ) from e


def get_tensor(handle: safetensors.safe_open, name: str, file: Path,
               floating: bool = True) -> torch.Tensor:
    """One tensor; with `floating`, a CheckpointError unless it has a floating-point dtype."""
    try:
        tensor = handle.get_tensor(name)
    except Exception as e:
        raise CheckpointError(f"{file}: cannot read tensor {name!r}: {e}") from e
    if floating and not tensor.is_floating_point():
        raise CheckpointError(
            f"{file}: tensor {name!r} has dtype {tensor.dtype}, expected floating point"
        )
    return tensor


def read_safetensors(
    file: Path, progress: bool, desc: str = "loading weights", floating: bool = True
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of one safetensors file (CheckpointError if unreadable;
    `floating`: every tensor must have a floating-point dtype)."""
    with open_safetensors(file) as f:
        metadata = f.metadata() or {}
        names = list(f.keys())
        bar = tqdm(names, desc=desc, unit="tensor", disable=not progress)
        tensors = {name: get_tensor(f, name, file, floating) for name in bar}
    return tensors, metadata


def write_safetensors_atomic(
    file: Path, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str]
) -> None:
    """Write a safetensors `file` so that it either appears complete or not at all."""
    atomic_write(file, lambda tmp: safetensors.torch.save_file(dict(tensors), str(tmp),
                                                               metadata=metadata))
