"""GGUF weights -> canonical Hugging Face tensors, with the conversion cached as safetensors.

Used by `llm.model.checkpoint.load.load_checkpoint`; the tokenizer reads its vocabulary from the
GGUF itself.

Conversion: every tensor type `gguf.quants.dequantize` supports is dequantized; GGUF dims (fastest
first) become HF (out, in) shapes; llama.cpp names become HF names; llama.cpp's Q/K row
permutation (rotate-half -> interleaved RoPE pairs, for llama-family models) is undone. A
`rope_freqs` tensor (Llama 3.1) is not a weight: its values go into `ModelConfig.rope_scaling`.

Cache: `<cache_dir>/gguf-<sha256 of the GGUF bytes>.v<CACHE_FORMAT_VERSION>.safetensors` holds the
converted tensors, with the ModelConfig as JSON in the safetensors metadata, so a cache hit reads no
GGUF structure at all (only hashes its bytes). Dtypes are lossless: F32 and quantized tensors are
stored as float32 (the exact dequantized values), F16/BF16 tensors keep float16/bfloat16.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import uuid
from collections.abc import Callable, Mapping
from importlib.metadata import version
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import safetensors.torch
import torch
from tqdm import tqdm

from llm.model.checkpoint.load import (
    CheckpointError,
    check_tensors,
    expected_tensors,
    open_safetensors,
    read_safetensors,
)
from llm.model.config import ModelConfig, RopeScaling

log = logging.getLogger(__name__)

# Bump when the conversion output changes: older cache entries are then simply not found.
CACHE_FORMAT_VERSION = 1
_CACHE_FORMAT = "llm.gguf-cache"
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_NAME_RE = re.compile(r"(?:blk\.(\d+)\.)?(\w+)\.(weight|bias)")
# llama.cpp permutes Q/K rows only for its LLAMA architecture (Mistral/SmolLM GGUFs are written as
# "llama"); Qwen2 uses NeoX-style RoPE in llama.cpp, which is HF's rotate-half: no permutation.
_PERMUTED_ARCHS = frozenset({"llama", "mistral", "smollm"})
_NATURAL_DTYPES = {
    gguf.GGMLQuantizationType.F16: torch.float16,
    gguf.GGMLQuantizationType.BF16: torch.bfloat16,
}
_HASH_CHUNK = 16 << 20
_HASH_PROGRESS_MIN_BYTES = 256 << 20


def hf_name(gguf_name: str) -> str | None:
    """The HF name of a llama.cpp tensor name (`blk.3.attn_q.weight` -> ...), or None if unknown."""
    m = _NAME_RE.fullmatch(gguf_name)
    if m is None:
        return None
    layer, base, kind = m.groups()
    if layer is None:
        return f"{_GLOBAL_NAMES[base]}.{kind}" if base in _GLOBAL_NAMES else None
    if base not in _LAYER_NAMES:
        return None
    return f"model.layers.{int(layer)}.{_LAYER_NAMES[base]}.{kind}"


def gguf_metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
    """The key/value metadata of a GGUF as Python values (str, int, float, bool, lists)."""
    metadata: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):  # header fields (version, counts), not metadata
            continue
        value = field.contents()
        if field.types == [gguf.GGUFValueType.FLOAT32]:
            # The shortest decimal that is this float32: 1e-05, not 9.999999747378752e-06.
            value = float(str(np.float32(value)))
        metadata[key] = value
    return metadata


def open_gguf(path: Path) -> gguf.GGUFReader:
    """GGUFReader, with a corrupt or truncated file reported as a CheckpointError naming it."""
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError, IndexError, ... on bad bytes
        raise CheckpointError(
            f"{path}: cannot read GGUF file (corrupt or truncated?): {e!r}"
        ) from e


def file_sha256(path: Path, progress: bool = True) -> str:
    """Hex sha256 of a file's bytes, read in chunks (tqdm bar for big files)."""
    size = path.stat().st_size
    digest = hashlib.sha256()
    quiet = not progress or size < _HASH_PROGRESS_MIN_BYTES
    with open(path, "rb") as f, tqdm(
        total=size, desc=f"hashing {path.name}", unit="B", unit_scale=True, disable=quiet
    ) as bar:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def cache_path(cache_dir: Path, digest: str) -> Path:
    """The cache entry of the GGUF whose bytes have sha256 `digest`."""
    return cache_dir / f"gguf-{digest}.v{CACHE_FORMAT_VERSION}.safetensors"


def load_gguf_cached(
    path: Path, cache_dir: Path, progress: bool = True
) -> tuple[ModelConfig, dict[str, torch.Tensor], str]:
    """Config, canonical tensors and content sha256 of a GGUF, from the cache or converted."""
    digest = file_sha256(path, progress)
    entry = cache_path(cache_dir, digest)
    if entry.is_file():
        try:
            return (*_read_cache(entry, digest, progress), digest)
        except CheckpointError as e:
            log.warning("unusable weights cache entry, rebuilding it: %s", e)
            try:
                entry.unlink(missing_ok=True)
            except OSError as unlink_error:  # the atomic rewrite below replaces it anyway
                log.warning("could not delete %s: %s", entry, unlink_error)
    config, tensors = convert_gguf(path, progress)
    metadata = {
        "format": _CACHE_FORMAT,
        "version": str(CACHE_FORMAT_VERSION),
        "source_sha256": digest,
        "source": str(path),  # informational only: the key is the content hash
        "config": config_to_json(config),
    }
    try:
        write_safetensors_atomic(entry, tensors, metadata)
    except OSError as e:  # a read-only or full disk costs a reconversion next time, nothing else
        log.warning("could not write the weights cache %s: %s", entry, e)
    return config, tensors, digest


def _read_cache(
    file: Path, digest: str, progress: bool
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    config = cache_entry_config(file, digest)
    tensors, _ = read_safetensors(file, progress, desc="loading cached weights")
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    check_tensors(shapes, config, dict.fromkeys(tensors, str(file)), file)
    return config, {name: tensors[name] for name in expected_tensors(config)}


def cache_entry_config(file: Path, digest: str) -> ModelConfig:
    """The ModelConfig of the cache entry `file` for the GGUF with sha256 `digest`, from its
    header only; CheckpointError if the entry is unreadable or not this GGUF's.
    """
    with open_safetensors(file) as f:
        metadata = f.metadata() or {}
    header = {k: metadata.get(k) for k in ("format", "version", "source_sha256")}
    wanted = {"format": _CACHE_FORMAT, "version": str(CACHE_FORMAT_VERSION)}
    wanted["source_sha256"] = digest
    if header != wanted:
        raise CheckpointError(f"{file}: not a cache entry for this GGUF (metadata {header})")
    try:
        return config_from_json(metadata["config"])
    except (KeyError, TypeError, ValueError) as e:  # ConfigError and JSON errors are ValueErrors
        raise CheckpointError(f"{file}: bad model config in the metadata: {e!r}") from e


def convert_gguf(path: Path, progress: bool = True) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read a GGUF file into (config, canonical tensors) without any cache."""
    config, by_name = gguf_index(open_gguf(path), path)
    permute = config.arch in _PERMUTED_ARCHS
    tensors: dict[str, torch.Tensor] = {}
    bar = tqdm(by_name.items(), desc=f"converting {path.name}", unit="tensor", disable=not progress)
    for name, t in bar:
        w = dequantize(t.data, t, path).reshape(hf_shape(t))  # (out, in) or (n,)
        if permute and ".self_attn.q_proj." in name:
            w = unpermute(w, config.num_heads)
        elif permute and ".self_attn.k_proj." in name:
            w = unpermute(w, config.num_kv_heads)
        tensors[name] = w
    return config, {name: tensors[name] for name in expected_tensors(config)}


def gguf_index(
    reader: gguf.GGUFReader, path: Path
) -> tuple[ModelConfig, dict[str, gguf.ReaderTensor]]:
    """The model config of an open GGUF and its tensors by canonical HF name, checked against
    the config (names and shapes) before any data is read.
    """
    try:
        metadata = gguf_metadata(reader)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot decode GGUF metadata (corrupt?): {e!r}") from e
    if int(metadata.get("split.count", 1)) > 1:
        raise CheckpointError(
            f"{path}: is one part of a split GGUF ({metadata['split.count']} parts); merge the "
            "parts first (llama.cpp: `llama-gguf-split --merge first-part.gguf merged.gguf`)"
        )
    by_gguf_name = {t.name: t for t in reader.tensors}
    freqs = by_gguf_name.pop("rope_freqs.weight", None)
    factors = (tuple(dequantize(freqs.data, freqs, path).flatten().tolist())
               if freqs is not None else ())
    config = ModelConfig.from_gguf(
        metadata, set(by_gguf_name), source=str(path), rope_freq_factors=factors
    )
    by_name: dict[str, gguf.ReaderTensor] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    origin: dict[str, str] = {}
    for gname, t in by_gguf_name.items():
        name = hf_name(gname)
        key = name or gname  # an unknown name is reported as unexpected by check_tensors
        by_name[key] = t
        shapes[key] = hf_shape(t)
        origin[key] = f"{path} (GGUF tensor {gname!r})" if name else str(path)
    check_tensors(shapes, config, origin, path)
    return config, by_name


def hf_shape(t: gguf.ReaderTensor) -> tuple[int, ...]:
    """HF shape of a GGUF tensor: GGUF lists dims fastest first, [in, out] -> (out, in)."""
    return tuple(int(d) for d in reversed(t.shape.tolist()))


def unpermute_needed(config: ModelConfig) -> bool:
    """Whether this GGUF architecture's Q/K rows carry llama.cpp's RoPE permutation."""
    return config.arch in _PERMUTED_ARCHS


def dequantize(data: np.ndarray, t: gguf.ReaderTensor, path: Path) -> torch.Tensor:
    """GGUF tensor data (all of `t.data` or a slice of its rows) as a torch tensor owning its
    memory, in the tensor's lossless dtype (float32, or float16/bfloat16 for F16/BF16).
    """
    try:
        array = gguf.quants.dequantize(data, t.tensor_type)
    except NotImplementedError as e:
        raise CheckpointError(
            f"{path}: tensor {t.name!r} has type {t.tensor_type.name}, which gguf "
            f"{version('gguf')} cannot dequantize"
        ) from e
    except Exception as e:
        raise CheckpointError(f"{path}: cannot dequantize tensor {t.name!r}: {e!r}") from e
    # A copy when `array` is a read-only view of the memory-mapped file (F32 tensors).
    array = np.require(array, dtype=np.float32, requirements=["C", "W"])
    return torch.from_numpy(array).to(_NATURAL_DTYPES.get(t.tensor_type, torch.float32))


def unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation: per head, interleaved RoPE pairs -> rotate-half."""
    rows = w.shape[0]
    # (rows, *in) -> (n_head, rows/n_head/2, 2, *in) -> (n_head, 2, rows/n_head/2, *in)
    # -> (rows, *in); `*in` is empty for a bias.
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def config_to_json(config: ModelConfig) -> str:
    """ModelConfig as JSON (stored in cache metadata); `config_from_json` reverses it exactly."""
    return json.dumps(dataclasses.asdict(config), sort_keys=True)


def config_from_json(text: str) -> ModelConfig:
    """Inverse of `config_to_json` (JSON lists back to the dataclass' tuples)."""
    d = json.loads(text)
    rs = d.pop("rope_scaling")
    if rs is not None:
        rs = RopeScaling(**{**rs, "freq_factors": tuple(rs["freq_factors"])})
    d["eos_token_ids"] = tuple(d["eos_token_ids"])
    return ModelConfig(**d, rope_scaling=rs)


def write_safetensors_atomic(
    file: Path, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str]
) -> None:
    """Write a safetensors `file` so that it either appears complete or not at all."""
    atomic_write(file, lambda tmp: safetensors.torch.save_file(dict(tensors), str(tmp),
                                                               metadata=metadata))


def atomic_write(file: Path, write: Callable[[Path], None]) -> None:
    """Create `file` through `write(temp_path)` so that it appears complete or not at all.

    The data goes to a temp file in the same directory, is fsynced, then renamed over `file`;
    any exception (KeyboardInterrupt included) removes the temp file.
    """
    file.parent.mkdir(parents=True, exist_ok=True)
    # A unique name, created by the writer itself so that the file gets the umask's permissions.
    tmp = file.with_name(f".{file.name}.{uuid.uuid4().hex}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, file)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable; not possible on every platform / file system
        dir_fd = os.open(file.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)
