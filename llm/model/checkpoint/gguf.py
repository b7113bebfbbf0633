"""GGUF weights -> canonical Hugging Face tensors.

Conversion: every tensor type `gguf.quants.dequantize` supports is dequantized; GGUF dims (fastest
first) become HF (out, in) shapes; llama.cpp names become HF names (the architecture's table,
`llm.model.arch`) and fused tensors are split into their canonical parts; llama.cpp's Q/K row
permutation (rotate-half -> interleaved RoPE pairs, for the architectures it converts with
LLAMA-style RoPE) is undone. `rope_freqs` (Llama 3.1) and `rope_factors_long` /
`rope_factors_short` (LongRoPE) are not weights: their values go into `ModelConfig.rope_scaling`.
The conversion is cached by `llm.model.checkpoint.gguf_cache`.
"""

from __future__ import annotations

import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from tqdm import tqdm

from llm.model.checkpoint.common import CheckpointError, check_tensors, expected_tensors
from llm.model.checkpoint.fused import Part, canonical_index
from llm.model.config import ModelConfig
from llm.model.quant.gguf_repack import GGUF_FORMATS, from_gguf_tensor
from llm.model.quant.state import Weight

_NATURAL_DTYPES = {
    gguf.GGMLQuantizationType.F16: torch.float16,
    gguf.GGMLQuantizationType.BF16: torch.bfloat16,
}


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


KNOWN_TYPES = frozenset(int(t) for t in gguf.GGMLQuantizationType)
GGUF_VERSION = version("gguf")


def open_gguf(path: Path) -> gguf.GGUFReader:
    """GGUFReader, with a corrupt or truncated file reported as a CheckpointError naming it (and,
    for a truncated one, the first tensor whose data is cut)."""
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError, IndexError, ... on bad bytes
        found = _diagnose(path)
        if found is not None:
            kind, what = found
            raise CheckpointError(f"{path}: {what}" if kind == "type" else
                                  f"{path}: truncated GGUF file: {what}") from e
        raise CheckpointError(
            f"{path}: cannot read GGUF file (corrupt or truncated?): {e!r}"
        ) from e


def _diagnose(path: Path) -> tuple[str, str] | None:
    """Where a GGUF whose header parses is cut short: its first tensor whose data ends past
    the end of the file, with the numbers, as ("cut", text), or whose type the gguf package does
    not know, as ("type", text); None if none is (or the header does not parse)."""
    size = path.stat().st_size
    found: list[tuple[str, str]] = []

    class _Probe(gguf.GGUFReader):  # the header and tensor infos, no data views
        def _build_tensors(self, start_offs: int, fields: list) -> None:
            for field in fields:
                _, name, _, dims, raw_type, offset = field.parts
                if int(raw_type[0]) not in KNOWN_TYPES:
                    found.append(("type", f"tensor {bytes(name).decode('utf-8', 'replace')!r} "
                                f"has GGML type {int(raw_type[0])}, which the gguf package "
                                f"{GGUF_VERSION} does not know (a type llama.cpp removed, such as "
                                "Q4_0_4_4, or a newer one); convert the file with a current "
                                "llama.cpp"))
                    break
                block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(raw_type[0])]
                end = int(start_offs + offset[0]) + int(np.prod(dims)) * type_size // block
                if end > size:
                    found.append(("cut", f"tensor {bytes(name).decode('utf-8', 'replace')!r} "
                                f"needs bytes up to {end}, the file has {size}"))
                    break
            self.tensors = []

    try:
        _Probe(path)
    except Exception:  # a diagnosis only: the caller reports the reader's error
        return None
    return found[0] if found else None


def read_gguf(path: Path, progress: bool = True) -> gguf.GGUFReader:
    """`open_gguf`, saying on stderr how long the parse took (the gguf package reads every
    metadata field up front, the vocabulary's strings included: seconds)."""
    start = time.perf_counter()
    if progress:
        print(f"reading the metadata of {path.name} ...", end="", file=sys.stderr, flush=True)
    try:
        reader = open_gguf(path)
    finally:  # the line ends with the time, or before the error
        if progress:
            print(f" {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return reader


def convert_gguf(path: Path, progress: bool = True, stored: bool = False,
                 reader: gguf.GGUFReader | None = None
                 ) -> tuple[ModelConfig, dict[str, Weight]]:
    """Read a GGUF file into (config, canonical tensors) without any cache.

    stored: quantized tensors of the formats in `GGUF_FORMATS` stay quantized as they are stored
    (a lossless QuantizedTensor, rows un-permuted like the dense ones); otherwise every tensor is
    dequantized. reader: the file already opened (`read_gguf`), to parse it once.
    """
    reader = reader if reader is not None else read_gguf(path, progress)
    config, by_name = gguf_index(reader, path)
    permute = config.spec.gguf_permuted_qk
    tensors: dict[str, Weight] = {}
    verb = "repacking" if stored else "converting"
    bar = tqdm(by_name.items(), desc=f"{verb} {path.name}", unit="tensor", disable=not progress)
    for name, (t, part) in bar:
        heads = None
        if permute and ".self_attn.q_proj." in name:
            heads = config.num_heads
        elif permute and ".self_attn.k_proj." in name:
            heads = config.num_kv_heads
        if stored and gguf.GGMLQuantizationType(t.tensor_type) in GGUF_FORMATS:
            q = from_gguf_tensor(t)
            rows = torch.arange(*part.rows) if part.rows is not None else None
            if heads is not None:
                order = unpermute_index(part.shape(hf_shape(t))[0], heads)
                rows = order if rows is None else rows[order]
            tensors[name] = q if rows is None else q.take_rows(rows)  # take_rows copies
            continue
        data = t.data if part.rows is None else t.data[slice(*part.rows)]
        w = dequantize(data, t, path).reshape(part.shape(hf_shape(t)))  # (out, in) or (n,)
        tensors[name] = w if heads is None else unpermute(w, heads)
    return config, {name: tensors[name] for name in expected_tensors(config)}


def gguf_index(
    reader: gguf.GGUFReader, path: Path
) -> tuple[ModelConfig, dict[str, tuple[gguf.ReaderTensor, Part]]]:
    """The model config of an open GGUF and, by canonical HF name, the tensor holding each
    canonical tensor and where in it (whole, or rows of a fused one), checked against the config
    (names and shapes) before any data is read.
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
    rope = {}
    for key in ("rope_freqs", "rope_factors_long", "rope_factors_short"):
        t = by_gguf_name.pop(f"{key}.weight", None)
        if t is not None:
            rope[key] = tuple(dequantize(t.data, t, path).flatten().tolist())
    if ("rope_factors_long" in rope) != ("rope_factors_short" in rope):
        raise CheckpointError(f"{path}: has only one of rope_factors_long / rope_factors_short")
    long_short = None
    if "rope_factors_long" in rope:  # float32 values as the shortest decimals (1.1, not 1.100..)
        long_short = tuple(tuple(float(str(np.float32(v))) for v in rope[k])
                           for k in ("rope_factors_long", "rope_factors_short"))
    config = ModelConfig.from_gguf(metadata, set(by_gguf_name), source=str(path),
                                   rope_freq_factors=rope.get("rope_freqs", ()),
                                   rope_long_short=long_short)
    stored: dict[str, gguf.ReaderTensor] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    origin: dict[str, str] = {}
    for gname, t in by_gguf_name.items():
        name = config.spec.hf_name(gname)
        key = name or gname  # an unknown name is reported as unexpected by check_tensors
        stored[key] = t
        shapes[key] = hf_shape(t)
        origin[key] = f"{path} (GGUF tensor {gname!r})" if name else str(path)
    parts, shapes, origin = canonical_index(config, shapes, origin)
    check_tensors(shapes, config, origin, path)
    return config, {name: (stored[p.name], p) for name, p in parts.items()}


def hf_shape(t: gguf.ReaderTensor) -> tuple[int, ...]:
    """HF shape of a GGUF tensor: GGUF lists dims fastest first, [in, out] -> (out, in)."""
    return tuple(int(d) for d in reversed(t.shape.tolist()))


def unpermute_needed(config: ModelConfig) -> bool:
    """Whether this GGUF architecture's Q/K rows carry llama.cpp's RoPE permutation."""
    return config.spec.gguf_permuted_qk


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


def unpermute_index(rows: int, n_head: int) -> torch.Tensor:
    """[rows] the source row of each row after `unpermute` (for quantized rows: `take_rows`)."""
    return unpermute(torch.arange(rows), n_head)
