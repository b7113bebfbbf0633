"""The GGUF conversion cache: converted tensors as one safetensors file per GGUF content hash.

`<cache_dir>/gguf-<sha256 of the GGUF bytes>.v<CACHE_FORMAT_VERSION>.safetensors` holds the
converted tensors, with the ModelConfig as JSON in the safetensors metadata, so a cache hit reads no
GGUF structure at all (only hashes its bytes). Dtypes are lossless: F32 and quantized tensors are
stored as float32 (the exact dequantized values), F16/BF16 tensors keep float16/bfloat16. With the
quantized tensors kept as stored, `gguf-<sha256>.stored.v<STORED_FORMAT_VERSION>.safetensors` holds
their planes instead (`llm.model.quant.state`), about the GGUF's own size. Entries are written
atomically, with a crc32 of every tensor's bytes in the metadata; an unusable entry (unreadable,
another GGUF's, a tensor missing, misshapen, non-finite or failing its checksum) is rebuilt.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from llm.model.checkpoint.common import (
    CheckpointError,
    check_finite,
    check_tensors,
    expected_tensors,
)
from llm.model.checkpoint.gguf import convert_gguf, read_gguf
from llm.model.checkpoint.safetensors_io import (
    open_safetensors,
    read_safetensors,
    write_safetensors_atomic,
)
from llm.model.config import ModelConfig, RopeScaling
from llm.model.files import file_sha256
from llm.model.quant.state import Weight, flatten_state, unflatten_state

log = logging.getLogger(__name__)
# Bump when the conversion output changes: older cache entries are then simply not found.
CACHE_FORMAT_VERSION = 1
STORED_FORMAT_VERSION = 2  # 2: Q5 `qh` bits in llm.model.quant.bits' word order
_CACHE_FORMAT = "llm.gguf-cache"
_STORED_FORMAT = "llm.gguf-stored-cache"
_CHECKSUMS = "llm.crc32"  # metadata key: JSON {tensor name: crc32 of its bytes}


def cache_path(cache_dir: Path, digest: str, stored: bool = False) -> Path:
    """The cache entry of the GGUF whose bytes have sha256 `digest` (dequantized, or with the
    quantized tensors as stored)."""
    if stored:
        return cache_dir / f"gguf-{digest}.stored.v{STORED_FORMAT_VERSION}.safetensors"
    return cache_dir / f"gguf-{digest}.v{CACHE_FORMAT_VERSION}.safetensors"


def load_gguf_cached(
    path: Path, cache_dir: Path, progress: bool = True, stored: bool = False
) -> tuple[ModelConfig, dict[str, Weight], str]:
    """Config, canonical tensors and content sha256 of a GGUF, from the cache or converted.

    stored: quantized tensors stay as stored (QuantizedTensor planes; the entry is about the
    GGUF's size), else every tensor is dequantized (float32 for quantized ones).
    """
    digest = file_sha256(path, progress)
    entry = cache_path(cache_dir, digest, stored)
    if entry.is_file():
        try:
            return (*_read_cache(entry, digest, progress, stored), digest)
        except CheckpointError as e:
            log.warning("unusable weights cache entry, rebuilding it: %s", e)
            try:
                entry.unlink(missing_ok=True)
            except OSError as unlink_error:  # the atomic rewrite below replaces it anyway
                log.warning("could not delete %s: %s", entry, unlink_error)
    reader = read_gguf(path, progress)
    config, tensors = convert_gguf(path, progress, stored, reader)
    check_finite(tensors, path)  # before anything is cached
    _cache_vocab(path, cache_dir, digest, reader)
    flat, metadata = flatten_state(tensors) if stored else (tensors, {})
    metadata.update({
        "format": _STORED_FORMAT if stored else _CACHE_FORMAT,
        "version": str(STORED_FORMAT_VERSION if stored else CACHE_FORMAT_VERSION),
        "source_sha256": digest,
        "source": str(path),  # informational only: the key is the content hash
        "config": config_to_json(config),
        _CHECKSUMS: json.dumps(checksums(flat), sort_keys=True),
    })
    try:
        write_safetensors_atomic(entry, flat, metadata)
    except OSError as e:  # a read-only or full disk costs a reconversion next time, nothing else
        log.warning("could not write the weights cache %s: %s", entry, e)
    return config, tensors, digest


def _cache_vocab(path: Path, cache_dir: Path, digest: str, reader: object) -> None:
    """Write the tokenizer's cache entry from the reader the conversion opened, so that the
    tokenizer does not parse the file a second time (seconds; `gguf_vocab.cached_gguf_vocab`).
    A GGUF without a usable tokenizer still converts: the tokenizer reports it when asked for."""
    from llm.model.tokenizer.errors import TokenizerError
    from llm.model.tokenizer.gguf_vocab import cached_gguf_vocab

    try:
        cached_gguf_vocab(path, cache_dir, digest, reader=reader)
    except TokenizerError as e:
        log.info("no tokenizer cached for %s: %s", path, e)


def _read_cache(
    file: Path, digest: str, progress: bool, stored: bool = False
) -> tuple[ModelConfig, dict[str, Weight]]:
    config = cache_entry_config(file, digest, stored)
    flat, metadata = read_safetensors(file, progress, desc="loading cached weights",
                                      floating=not stored)
    verify_checksums(file, flat, metadata.get(_CHECKSUMS))
    try:
        tensors = unflatten_state(flat, metadata) if stored else flat
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{file}: bad quantized tensors in the cache entry: {e}") from e
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    check_tensors(shapes, config, dict.fromkeys(tensors, str(file)), file)
    tensors = {name: tensors[name] for name in expected_tensors(config)}
    check_finite(tensors, file)  # a damaged entry is rebuilt from the GGUF (load_gguf_cached)
    return config, tensors


def tensor_crc32(tensor: torch.Tensor) -> int:
    """crc32 of a tensor's bytes (its dtype's in-memory layout, row-major)."""
    flat = tensor.detach().contiguous().reshape(-1)
    return zlib.crc32(flat.view(torch.uint8).numpy()) if flat.numel() else zlib.crc32(b"")


def checksums(tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    """Every tensor's crc32 (what a cache entry's metadata keeps, see `verify_checksums`), on up
    to 8 threads: zlib releases the GIL over large buffers, so an 8B model's ~5 GB take a
    fraction of a second on a many-core host instead of ~1.2 s on one core."""
    workers = min(8, os.cpu_count() or 1, max(1, len(tensors)))
    if workers == 1:
        return {name: tensor_crc32(t) for name, t in tensors.items()}
    with ThreadPoolExecutor(workers) as pool:
        return dict(zip(tensors, pool.map(tensor_crc32, tensors.values()), strict=True))


def verify_checksums(file: Path, tensors: dict[str, torch.Tensor], text: str | None) -> None:
    """CheckpointError naming `file` and the tensor unless every tensor's bytes match the crc32
    the entry was written with (a flipped bit on the disk: codes and scales of quantized planes
    read as valid values, so no other check would see it)."""
    if text is None:
        raise CheckpointError(f"{file}: the entry has no tensor checksums (written by an older "
                              "version of llm)")
    try:
        want = json.loads(text)
    except ValueError as e:
        raise CheckpointError(f"{file}: unreadable tensor checksums: {e}") from e
    if not isinstance(want, dict) or set(want) != set(tensors):
        raise CheckpointError(f"{file}: the tensor checksums do not name the entry's tensors")
    for name, got in checksums(tensors).items():
        if got != want[name]:
            raise CheckpointError(f"{file}: tensor {name!r} fails its crc32 check (the entry's "
                                  "bytes were damaged)")


def cache_entry_config(file: Path, digest: str, stored: bool = False) -> ModelConfig:
    """The ModelConfig of the cache entry `file` for the GGUF with sha256 `digest`, from its
    header only; CheckpointError if the entry is unreadable or not this GGUF's.
    """
    with open_safetensors(file) as f:
        metadata = f.metadata() or {}
    header = {k: metadata.get(k) for k in ("format", "version", "source_sha256")}
    wanted = {"format": _STORED_FORMAT if stored else _CACHE_FORMAT,
              "version": str(STORED_FORMAT_VERSION if stored else CACHE_FORMAT_VERSION)}
    wanted["source_sha256"] = digest
    if header != wanted:
        raise CheckpointError(f"{file}: not a cache entry for this GGUF (metadata {header})")
    try:
        return config_from_json(metadata["config"])
    except (KeyError, TypeError, ValueError) as e:  # ConfigError and JSON errors are ValueErrors
        raise CheckpointError(f"{file}: bad model config in the metadata: {e!r}") from e


def config_to_json(config: ModelConfig) -> str:
    """ModelConfig as JSON (stored in cache metadata); `config_from_json` reverses it exactly."""
    return json.dumps(dataclasses.asdict(config), sort_keys=True)


def config_from_json(text: str) -> ModelConfig:
    """Inverse of `config_to_json` (JSON lists back to the dataclass' tuples)."""
    d = json.loads(text)
    rs = d.pop("rope_scaling")
    if rs is not None:
        rs = RopeScaling(**{k: tuple(v) if isinstance(v, list) else v for k, v in rs.items()})
    d["eos_token_ids"] = tuple(d["eos_token_ids"])
    return ModelConfig(**d, rope_scaling=rs)
