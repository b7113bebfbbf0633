"""Read parts of checkpoint tensors without loading the whole model (tensor-parallel ranks).

`open_weight_slices(path)` gives a `WeightSlices` over a Hugging Face safetensors directory
(`safe_open(...).get_slice`, which reads only the requested bytes), a GGUF file (row slices of the
memory-mapped quantized data are dequantized alone; column slices by whole quantization blocks,
else in bounded row chunks), or the safetensors cache entry of a GGUF when one exists. Tensors come
back in canonical HF names and layout, exactly as `load_checkpoint` would give them, just sliced:
`read(name, dim, ranges)` concatenates the listed [start, stop) ranges of dimension `dim`.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from llm.model.checkpoint.common import CheckpointError, expected_tensors
from llm.model.checkpoint.fused import Part
from llm.model.checkpoint.hf import hf_dir_headers
from llm.model.checkpoint.load import resolve_checkpoint
from llm.model.checkpoint.safetensors_io import get_tensor, open_safetensors
from llm.model.config import ModelConfig
from llm.model.paths import default_cache_dir
from llm.model.quant.state import Weight
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
        along `dim` (repeated ranges give repeated copies).
        """
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

    def close(self) -> None:  # noqa: B027 (optional hook: only file-backed readers hold files)
        """Release open files."""


class TensorDictSlices(WeightSlices):
    """Slices of tensors already in memory (a loaded `Checkpoint`): a whole tensor is returned as
    it is, a part as a copy of its own (so dropping the full tensors frees them).
    """

    def __init__(self, config: ModelConfig, tensors: Mapping[str, torch.Tensor],
                 source: str = "the given tensors") -> None:
        self.config, self.tensors, self.source = config, tensors, source

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
    of it holding it), each file opened once."""

    def __init__(self, config: ModelConfig, where: Mapping[str, tuple[Path, Part]], source: str,
                 source_sha256: str | None = None) -> None:
        self.config, self.where, self.source = config, dict(where), source
        self.source_sha256 = source_sha256
        self._handles: dict[Path, object] = {}

    def _handle(self, file: Path):
        if file not in self._handles:
            self._handles[file] = open_safetensors(file).__enter__()
        return self._handles[file]

    def _read(self, name: str, dim: int | None, start: int, stop: int) -> torch.Tensor:
        file, part = self.where[name]
        f = self._handle(file)
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

    def close(self) -> None:
        for h in self._handles.values():
            h.__exit__(None, None, None)
        self._handles.clear()


class GGUFSlices(WeightSlices):
    """Slices dequantized straight from a GGUF's memory-mapped data, Q/K rows un-permuted."""

    def __init__(self, path: Path, source_sha256: str | None = None) -> None:
        from llm.model.checkpoint.gguf import gguf_index, open_gguf, unpermute_needed

        self.path, self.source, self.source_sha256 = path, str(path), source_sha256
        self.reader = open_gguf(path)
        self.config, self.tensors = gguf_index(self.reader, path)  # name -> (tensor, Part)
        self.permute = unpermute_needed(self.config)

    def _read(self, name: str, dim: int | None, start: int, stop: int) -> torch.Tensor:
        import gguf

        from llm.model.checkpoint.gguf import dequantize, hf_shape, unpermute

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


def open_weight_slices(path: str | Path, *, cache_dir: str | Path | None = None,
                       progress: bool = True) -> WeightSlices:
    """A `WeightSlices` over the checkpoint at `path` (HF directory or GGUF), headers checked.

    For a GGUF whose safetensors cache entry exists (written by `load_checkpoint`), slices come
    from the cache (no GGUF parsing); otherwise from the GGUF itself. Nothing is written.
    """
    path, kind = resolve_checkpoint(path)
    if kind == "dir":
        config, where = hf_dir_headers(path)
        return SafetensorsSlices(config, where, str(path))
    from llm.model.checkpoint.gguf_cache import cache_entry_config, cache_path
    from llm.model.files import file_sha256

    digest = file_sha256(path, progress)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    entry = cache_path(cache, digest)
    if entry.is_file():
        try:
            config = cache_entry_config(entry, digest)
            with open_safetensors(entry) as f:
                shapes = {n: tuple(f.get_slice(n).get_shape()) for n in f.keys()}
            if shapes != dict(expected_tensors(config)):
                raise CheckpointError(f"{entry}: tensors do not match its config")
            where = {name: (entry, Part(name)) for name in shapes}
            return SafetensorsSlices(config, where, str(path), digest)
        except CheckpointError as e:
            log.warning("unusable weights cache entry, reading the GGUF instead: %s", e)
    return GGUFSlices(path, digest)
