"""Hugging Face checkpoint directories: config.json plus one or sharded safetensors files."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import safetensors.torch
import torch
from tqdm import tqdm

from llm.model.checkpoint.common import (
    PICKLE_SUFFIXES,
    CheckpointError,
    check_tensors,
    expected_tensors,
    is_ignored,
    pickle_error,
)
from llm.model.checkpoint.fused import Part, canonical_index, fuse
from llm.model.checkpoint.safetensors_io import get_tensor, open_safetensors
from llm.model.config import ModelConfig

_INDEX_FILE = "model.safetensors.index.json"
_SINGLE_FILE = "model.safetensors"


def _hf_weight_files(directory: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files of an HF directory and its index's weight map (None: no index)."""
    index = directory / _INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e!r})") from e
        missing = [f for f in files if not (directory / f).is_file()]
        if missing:
            raise CheckpointError(f"{index}: names shard files that do not exist: {missing}")
        return [directory / f for f in files], weight_map
    if (directory / _SINGLE_FILE).is_file():
        return [directory / _SINGLE_FILE], None
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise pickle_error(directory, pickles)
    ggufs = sorted(p.name for p in directory.glob("*.gguf"))
    hint = f"; to load a GGUF, pass the file itself ({ggufs[0]})" if ggufs else ""
    raise CheckpointError(f"{directory}: no {_SINGLE_FILE} or {_INDEX_FILE}{hint}")


def hf_dir_headers(directory: Path) -> tuple[ModelConfig, dict[str, tuple[Path, Part]]]:
    """Config and checked tensor index (canonical name -> file and where in it) of an HF
    directory, from headers only.

    Rejects a bad checkpoint (missing, unexpected, wrong-shape tensors; an inconsistent index)
    before any tensor data is read. Ignored tensors (`is_ignored`) are left out. The canonical
    parts of a fused tensor (`llm.model.arch.Fused`) are rows of it.
    """
    files, weight_map = _hf_weight_files(directory)
    config = ModelConfig.from_hf_dir(directory)
    shapes: dict[str, tuple[int, ...]] = {}
    origin: dict[str, str] = {}
    where: dict[str, Path] = {}
    for file in files:
        with open_safetensors(file) as f:
            for name in f.keys():
                if name in origin:
                    raise CheckpointError(f"{file}: tensor {name!r} is also in {origin[name]}")
                if weight_map is not None and weight_map.get(name) != file.name:
                    raise CheckpointError(
                        f"{file}: holds tensor {name!r}, but {_INDEX_FILE} says "
                        f"{weight_map.get(name) or 'nothing about it'}"
                    )
                origin[name] = str(file)
                if not is_ignored(name, config):
                    shapes[name] = tuple(f.get_slice(name).get_shape())
                    where[name] = file
    for name, file_name in (weight_map or {}).items():
        if name not in origin:
            raise CheckpointError(
                f"{directory / _INDEX_FILE}: lists tensor {name!r} in {file_name}, "
                "which does not contain it"
            )
    parts, shapes, canonical_origin = canonical_index(config, shapes, origin)
    check_tensors(shapes, config, canonical_origin, directory)
    return config, {name: (where[p.name], p) for name, p in parts.items()}


def load_hf_dir(directory: Path, progress: bool) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    config, where = hf_dir_headers(directory)
    tensors: dict[str, torch.Tensor] = {}
    bar = tqdm(total=len(where), desc="loading weights", unit="tensor", disable=not progress)
    with bar:
        for file in dict.fromkeys(file for file, _ in where.values()):
            with open_safetensors(file) as f:
                stored: dict[str, torch.Tensor] = {}
                for name, (in_file, part) in where.items():
                    if in_file != file:
                        continue
                    if part.name not in stored:
                        stored[part.name] = get_tensor(f, part.name, file)
                    t = stored[part.name]
                    tensors[name] = t if part.rows is None else t[slice(*part.rows)].clone()
                    bar.update()
    return config, {name: tensors[name] for name in expected_tensors(config)}


def save_hf_checkpoint(
    directory: str | Path,
    config: ModelConfig,
    tensors: Mapping[str, torch.Tensor],
    shard_size_bytes: int | None = None,
) -> None:
    """Write a Hugging Face directory: config.json and model.safetensors, or shards plus an index.

    `tensors` must match `expected_tensors(config)` (a tied lm_head is dropped); tensors the
    architecture stores fused (`llm.model.arch.Fused`) are written stacked. With
    `shard_size_bytes`, tensors are packed in order into `model-0000k-of-0000n.safetensors` files
    of at most that size (a single larger tensor gets a shard of its own).
    """
    directory = Path(directory)
    shapes = {n: tuple(t.shape) for n, t in tensors.items() if not is_ignored(n, config)}
    check_tensors(shapes, config, {n: "the given tensors" for n in tensors}, "the given tensors")
    ordered = fuse(config, {n: tensors[n].detach().cpu().contiguous()
                            for n in expected_tensors(config)})
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2) + "\n")
    meta = {"format": "pt"}
    if shard_size_bytes is None:
        safetensors.torch.save_file(ordered, str(directory / _SINGLE_FILE), metadata=meta)
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in ordered.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > shard_size_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    weight_map = {}
    for k, shard in enumerate(shards, start=1):
        file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        safetensors.torch.save_file(shard, str(directory / file), metadata=meta)
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in ordered.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / _INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
