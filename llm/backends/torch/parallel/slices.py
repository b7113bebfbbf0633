"""Read parts of checkpoint tensors without loading the whole model (tensor-parallel ranks).

`open_weight_slices(path, weights=...)` gives a `WeightSlices` over a Hugging Face safetensors
directory (`safe_open(...).get_slice`, which reads only the requested bytes), a GGUF file (row
slices of the memory-mapped quantized data are dequantized alone; column slices by whole
quantization blocks, else in bounded row chunks), or the safetensors cache entry of a GGUF when one
exists. Tensors come back in canonical HF names and layout, exactly as `load_checkpoint` would give
them with the same `weights` mode, just sliced: `read(name, dim, ranges)` concatenates the listed
[start, stop) ranges of dimension `dim`. With weights="stored" a GGUF's quantized matrices come
back as `QuantizedTensor`s of only the requested rows, or columns at whole quantization groups
(`column_block` says how many columns a group is), repacked from just those blocks' bytes.
"""

from __future__ import annotations

import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from llm.model.checkpoint.common import CheckpointError, check_finite, expected_tensors
from llm.model.checkpoint.fused import Part
from llm.model.checkpoint.hf import hf_dir_headers
from llm.model.checkpoint.load import resolve_checkpoint
from llm.model.checkpoint.safetensors_io import get_tensor, open_safetensors
from llm.model.config import ModelConfig
from llm.model.paths import default_cache_dir
from llm.model.quant.gguf_repack import GGUF_FORMATS, repack_gguf
from llm.model.quant.registry import get_format
from llm.model.quant.state import QUANT_METADATA_KEY, Weight
from llm.model.quant.tensor import QuantizedTensor, cat_rows

log = logging.getLogger(__name__)

Ranges = Sequence[tuple[int, int]]
_GGUF_COLUMN_CHUNK_ROWS = 1024  # rows dequantized at once for an unaligned column slice


class WeightSlices(ABC):
    """Canonical tensors of one checkpoint, read in parts."""

    config: ModelConfig
    source: str
    source_sha256: str | None = None

    def read(self, name: str, dim: int | None = None, ranges: Ranges = ()) -> torch.Tensor:
        """Tensor `name` whole (dim None), or the concatenation of its [start, stop) `ranges`
        along `dim` (repeated ranges give repeated copies); CheckpointError if it holds a NaN or
        an infinity (`check_finite`).
        """
        out = self._ranges(name, dim, ranges)
        check_finite({name: out}, Path(self.source))
        return out

    def _ranges(self, name: str, dim: int | None, ranges: Ranges) -> torch.Tensor:
        shapes = expected_tensors(self.config)
        if name not in shapes:
            raise CheckpointError(f"{self.source}: no tensor {name!r} in a {self.config.arch} "
                                  "model")
        if dim is None:
            return self._read(name, None, 0, 0)
        size = shapes[name][dim]
        for a, b in ranges:
            if not 0 <= a < b <= size:
                raise ValueError(f"range [{a}, {b}) of dim {dim} of {name!r} is outside its "
                                 f"size {size}")
        if len(ranges) == 1 and tuple(ranges[0]) == (0, size):
            return self._read(name, None, 0, 0)  # the whole tensor (no copy where it is in memory)
        if len(ranges) == 1:
            return self._read(name, dim, *ranges[0])
        parts = [self._read(name, dim, a, b) for a, b in ranges]
        if isinstance(parts[0], QuantizedTensor):
            if dim != 0:
                raise ValueError(f"{name!r}: quantized tensors join several ranges along rows "
                                 f"only, not dim {dim}")
            return cat_rows(parts)
        return torch.cat(parts, dim=dim)

    @abstractmethod
    def _read(self, name: str, dim: int | None, start: int, stop: int) -> torch.Tensor:
        """One checked range [start, stop) of `dim` of `name` (dim None: the whole tensor)."""

    def column_block(self, name: str) -> tuple[int, str]:
        """(columns per quantization group, format) of matrix `name` as `read` gives it: column
        slices must start and stop at multiples of it; (1, "") for a dense tensor."""
        return 1, ""

    def close(self) -> None:  # noqa: B027 (optional hook: only file-backed readers hold files)
        """Release open files."""


class TensorDictSlices(WeightSlices):
    """Slices of tensors already in memory (a loaded `Checkpoint`): a whole tensor is returned as
    it is, a part as a copy of its own (so dropping the full tensors frees them).
    """

    def __init__(self, config: ModelConfig, tensors: Mapping[str, torch.Tensor],
                 source: str = "the given tensors") -> None:
        self.config, self.tensors, self.source = config, tensors, source

    def column_block(self, name: str) -> tuple[int, str]:
        t = self.tensors[name]
        return (t.layout.block, t.format) if isinstance(t, QuantizedTensor) else (1, "")

    def _read(self, name: str, dim: int | None, start: int, stop: int) -> Weight:
        t = self.tensors[name]
        if dim is None:
            return t
        if isinstance(t, QuantizedTensor):  # row ranges, or block-aligned column ranges
            part = t.slice_rows(start, stop) if dim == 0 else t.slice_cols(start, stop)
            return part.contiguous()
        return t.narrow(dim, start, stop - start).clone()


class SafetensorsSlices(WeightSlices):
    """Slices read from safetensors files (canonical name -> file and the stored tensor or rows
    of it holding it), each file opened once.

    quantized: {name: {"format", "shape"}} of the tensors stored as planes `<name>.<plane>` (a
    GGUF's stored cache entry, `llm.model.quant.state`); their slices are slices of the planes.
    """

    def __init__(self, config: ModelConfig, where: Mapping[str, tuple[Path, Part]], source: str,
                 source_sha256: str | None = None,
                 quantized: Mapping[str, Mapping] | None = None) -> None:
        self.config, self.where, self.source = config, dict(where), source
        self.source_sha256 = source_sha256
        self.quantized = dict(quantized or {})
        self._handles: dict[Path, object] = {}

    def column_block(self, name: str) -> tuple[int, str]:
        if name not in self.quantized:
            return 1, ""
        layout = get_format(self.quantized[name]["format"])
        return layout.block, layout.name

    def _handle(self, file: Path):
        if file not in self._handles:
            self._handles[file] = open_safetensors(file).__enter__()
        return self._handles[file]

    def _read(self, name: str, dim: int | None, start: int, stop: int) -> Weight:
        file, part = self.where[name]
        f = self._handle(file)
        if name in self.quantized:  # a stored cache entry: canonical tensors, never fused
            return self._read_planes(f, file, name, dim, start, stop)
        if dim is None and part.rows is None:
            return get_tensor(f, part.name, file)
        if dim is None:
            dim, start, stop = 0, 0, part.rows[1] - part.rows[0]
        offset = part.rows[0] if part.rows is not None else 0
        rows = slice(start + offset, stop + offset) if dim == 0 else slice(*(part.rows or (None,)))
        index = (rows,) if dim == 0 else (rows, slice(start, stop))
        try:
            t = f.get_slice(part.name)[index]
        except Exception as e:
            raise CheckpointError(f"{file}: cannot read tensor {name!r}: {e}") from e
        if not t.is_floating_point():
            raise CheckpointError(f"{file}: tensor {name!r} has dtype {t.dtype}, expected "
                                  "floating point")
        return t

    def _read_planes(self, f, file: Path, name: str, dim: int | None, start: int,
                     stop: int) -> QuantizedTensor:
        """Rows or whole-group columns of a quantized tensor: the same slices of its planes."""
        layout = get_format(self.quantized[name]["format"])
        n, k = (int(d) for d in self.quantized[name]["shape"])
        if dim == 1:
            check_group(name, layout.name, layout.block, start, stop)
        planes = {}
        for p in layout.planes:
            index = (slice(None),) if dim is None else (slice(start, stop),) if dim == 0 else (
                slice(None), p.col_range(start, stop))
            try:
                planes[p.name] = f.get_slice(f"{name}.{p.name}")[index]
            except Exception as e:
                raise CheckpointError(f"{file}: cannot read plane {p.name!r} of quantized "
                                      f"tensor {name!r}: {e}") from e
        shape = (n, k) if dim is None else (stop - start, k) if dim == 0 else (n, stop - start)
        try:
            return QuantizedTensor(layout.name, shape, planes)
        except ValueError as e:
            raise CheckpointError(f"{file}: bad quantized tensor {name!r}: {e}") from e

    def close(self) -> None:
        for h in self._handles.values():
            h.__exit__(None, None, None)
        self._handles.clear()


class GGUFSlices(WeightSlices):
    """Slices straight from a GGUF's memory-mapped data, Q/K rows un-permuted: dequantized, or
    with stored=True the matrices of the formats in `GGUF_FORMATS` as `QuantizedTensor`s
    repacked from only the requested blocks (rows, or columns at whole blocks).
    """

    def __init__(self, path: Path, source_sha256: str | None = None,
                 stored: bool = False) -> None:
        from llm.model.checkpoint.gguf import gguf_index, open_gguf, unpermute_needed

        self.path, self.source, self.source_sha256 = path, str(path), source_sha256
        self.reader = open_gguf(path)
        self.config, self.tensors = gguf_index(self.reader, path)  # name -> (tensor, Part)
        self.permute = unpermute_needed(self.config)
        self.stored = stored

    def _stored_format(self, name: str) -> str | None:
        """Our format name of `name` if it is read as stored blocks, else None."""
        import gguf

        t, _ = self.tensors[name]
        if not self.stored or len(t.shape) != 2:
            return None
        return GGUF_FORMATS.get(gguf.GGMLQuantizationType(t.tensor_type))

    def column_block(self, name: str) -> tuple[int, str]:
        fmt = self._stored_format(name)
        return (1, "") if fmt is None else (get_format(fmt).block, fmt)

    def _read(self, name: str, dim: int | None, start: int, stop: int) -> Weight:
        import gguf

        from llm.model.checkpoint.gguf import dequantize, hf_shape, unpermute

        if self._stored_format(name) is not None:
            return self._read_blocks(name, dim, start, stop)
        t, part = self.tensors[name]
        shape = part.shape(hf_shape(t))
        data = t.data if part.rows is None else t.data[slice(*part.rows)]
        if dim is None:
            w = dequantize(data, t, self.path).reshape(shape)
        elif dim == 0 and (len(shape) == 2 or data.dtype != "uint8"):
            w = dequantize(data[start:stop], t, self.path).reshape(stop - start, *shape[1:])
        elif dim == 1 and data.dtype != "uint8":  # F32 / F16 stored as plain (rows, cols)
            w = dequantize(data[:, start:stop], t, self.path)
        elif dim == 1:
            block, type_size = gguf.GGML_QUANT_SIZES[t.tensor_type]
            if start % block == 0 and stop % block == 0:  # whole quantization blocks
                part = data[:, start // block * type_size: stop // block * type_size]
                w = dequantize(part, t, self.path).reshape(shape[0], stop - start)
            else:
                w = torch.cat([
                    dequantize(data[r:r + _GGUF_COLUMN_CHUNK_ROWS], t, self.path)
                    .reshape(-1, shape[1])[:, start:stop]
                    for r in range(0, shape[0], _GGUF_COLUMN_CHUNK_ROWS)])
        else:  # a quantized 1-D tensor: small, dequantized whole
            w = dequantize(data, t, self.path).reshape(shape).narrow(0, start, stop - start)
        if self.permute and (".self_attn.q_proj." in name or ".self_attn.k_proj." in name):
            if w.shape[0] % self.config.head_dim:
                raise ValueError(f"{name}: Q/K row slices of a GGUF must be whole heads")
            w = unpermute(w, w.shape[0] // self.config.head_dim)  # the permutation is per head
        return w.contiguous()

    def _read_blocks(self, name: str, dim: int | None, start: int,
                     stop: int) -> QuantizedTensor:
        """Rows, or columns at whole blocks, of a quantized matrix as stored: only their bytes
        are repacked (the data is uint8 [N, blocks per row * block bytes])."""
        import gguf

        from llm.model.checkpoint.gguf import hf_shape, unpermute_index

        t, part = self.tensors[name]
        qtype = gguf.GGMLQuantizationType(t.tensor_type)
        n, k = part.shape(hf_shape(t))
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        data = t.data if part.rows is None else t.data[slice(*part.rows)]  # a fused tensor's rows
        if dim == 0:
            data, n = data[start:stop], stop - start
        elif dim == 1:
            check_group(name, GGUF_FORMATS[qtype], block, start, stop)
            data = data[:, start // block * type_size: stop // block * type_size]
            k = stop - start
        try:
            q = repack_gguf(data, qtype, (n, k))
        except ValueError as e:
            raise CheckpointError(f"{self.path}: tensor {name!r}: {e}") from e
        if self.permute and (".self_attn.q_proj." in name or ".self_attn.k_proj." in name):
            if n % self.config.head_dim:
                raise ValueError(f"{name}: Q/K row slices of a GGUF must be whole heads")
            q = q.take_rows(unpermute_index(n, n // self.config.head_dim))
        return q


def check_group(name: str, fmt: str, block: int, start: int, stop: int) -> None:
    """ValueError unless columns [start, stop) of quantized `name` are whole groups."""
    if start % block or stop % block:
        raise ValueError(f"{name} ({fmt}): column slice [{start}, {stop}) does not fall on its "
                         f"quantization groups of {block} columns")


def open_weight_slices(path: str | Path, *, cache_dir: str | Path | None = None,
                       progress: bool = True, weights: str = "dequantize") -> WeightSlices:
    """A `WeightSlices` over the checkpoint at `path` (HF directory or GGUF), headers checked,
    giving what `load_checkpoint(path, weights=weights)` gives, in slices; weights "dequantize"
    or "stored" (int8 / int4: `quantizing_slices.open_slices_as`).

    For a GGUF whose safetensors cache entry for that mode exists (written by `load_checkpoint`),
    slices come from the cache (no GGUF parsing); otherwise from the GGUF itself. Nothing is
    written.
    """
    if weights not in ("dequantize", "stored"):
        raise ValueError(f"open_weight_slices reads weights='dequantize' or 'stored', not "
                         f"{weights!r} (quantize-at-load: quantizing_slices.open_slices_as)")
    path, kind = resolve_checkpoint(path)
    if kind == "dir":
        config, where = hf_dir_headers(path)
        return SafetensorsSlices(config, where, str(path))
    from llm.model.checkpoint.gguf_cache import cache_entry_config, cache_path
    from llm.model.files import file_sha256

    digest = file_sha256(path, progress)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    stored = weights == "stored"
    entry = cache_path(cache, digest, stored)
    if entry.is_file():
        try:
            config = cache_entry_config(entry, digest, stored)
            with open_safetensors(entry) as f:
                quantized = json.loads((f.metadata() or {}).get(QUANT_METADATA_KEY, "{}"))
                planes = {f"{n}.{p.name}" for n, m in quantized.items()
                          for p in get_format(m["format"]).planes}
                shapes = {n: tuple(f.get_slice(n).get_shape()) for n in f.keys()
                          if n not in planes}
            shapes.update({n: tuple(m["shape"]) for n, m in quantized.items()})
            if shapes != dict(expected_tensors(config)):
                raise CheckpointError(f"{entry}: tensors do not match its config")
            where = {name: (entry, Part(name)) for name in shapes}
            return SafetensorsSlices(config, where, str(path), digest, quantized)
        except (CheckpointError, ValueError, KeyError, TypeError) as e:
            log.warning("unusable weights cache entry, reading the GGUF instead: %s", e)
    return GGUFSlices(path, digest, stored)
