"""Weight conversion to device tensors, cached on disk with `ttnn.as_tensor(cache_file_name=...)`.

A weight is converted (Q/K rows permuted, transposed, padded, quantized, split over the mesh) only
when its cache file is missing or fails its check: `as_tensor` calls the `preprocess` step only on
a cache miss, and this module counts those calls, so a warm start provably converts nothing. Each
cache file's sha256 is recorded in `manifest.json` beside it when written; a file whose content no
longer matches is deleted before `as_tensor` sees it, so it is rebuilt rather than loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from llm.backends.tt.mesh import Mesh

_MANIFEST = "manifest.json"


def reverse_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a Q or K projection (or bias) from HF rotate-half order to Meta's interleaved
    order, per head: new row h*dh + 2i is old row h*dh + i, new row 2i+1 is old i + dh/2."""
    rows = w.shape[0]
    rest = w.shape[1:]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *rest).transpose(1, 2).reshape(w.shape)


def once_bias(mesh: Mesh, weights: WeightStore, name: str, bias: torch.Tensor):
    """A row-parallel layer's bias `[N]` (o_proj, down_proj) as `[1, 1, 1, N]` bf16 on every
    device, zero except on device 0: added to the partial sums before the mesh's reduction,
    it is counted once."""
    ttnn, nd, n = mesh.ttnn, mesh.ndev, bias.shape[0]

    def prepare(b: torch.Tensor) -> torch.Tensor:
        row = torch.zeros(1, 1, 1, nd * n)
        row[..., :n] = b.float()
        return row

    return weights.tensor(f"{name}_once{nd}_{n}", bias, prepare, dtype=ttnn.bfloat16,
                          layout=ttnn.TILE_LAYOUT, memory_config=ttnn.DRAM_MEMORY_CONFIG,
                          mapper=mesh.shard(3))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


class WeightStore:
    """Creates device weights through `as_tensor`, optionally cached under `directory`.

    converted: tensors built from the checkpoint this run (cache misses and rebuilt files).
    loaded: tensors read from cache files. rejected: cache files that failed their check.
    """

    def __init__(self, mesh: Mesh, directory: str | Path | None) -> None:
        self.mesh = mesh
        self.directory = Path(directory) if directory is not None else None
        self.converted = 0
        self.loaded = 0
        self.rejected: list[str] = []
        self._manifest: dict[str, str] = {}
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            try:
                self._manifest = json.loads((self.directory / _MANIFEST).read_text())
            except (OSError, ValueError):
                self._manifest = {}

    def tensor(self, name: str, source: torch.Tensor, prepare: Callable[[torch.Tensor],
               torch.Tensor], *, dtype: Any, layout: Any, memory_config: Any,
               mapper: Any = None):
        """The device tensor of `prepare(source)` in `dtype`/`layout`, placed by `mapper`.

        `name` must identify the content (it is the cache key): include the transform and the
        shape, the directory already separates model, policy and mesh.
        """
        ttnn = self.mesh.ttnn

        def preprocess(t: torch.Tensor) -> torch.Tensor:
            self.converted += 1
            return prepare(t)

        cache_name = None
        file = None
        if self.directory is not None:
            cache_name = str(self.directory / name)
            file = Path(f"{cache_name}_dtype_{dtype.name}_layout_{layout.name}.tensorbin")
            self._check(file)
        before = self.converted
        t = ttnn.as_tensor(source, dtype, layout=layout, device=self.mesh.device,
                           memory_config=memory_config, cache_file_name=cache_name,
                           preprocess=preprocess, mesh_mapper=mapper)
        if self.converted == before:
            self.loaded += 1
        elif file is not None:
            self._manifest[file.name] = _sha256(file)
        return t

    def _check(self, file: Path) -> None:
        if not file.exists():
            return
        want = self._manifest.get(file.name)
        if want is None or _sha256(file) != want:
            self.rejected.append(file.name)
            os.remove(file)

    def save_manifest(self) -> None:
        """Write the sha256 of every cache file written or verified in this run."""
        if self.directory is None:
            return
        tmp = self.directory / (_MANIFEST + ".tmp")
        tmp.write_text(json.dumps(self._manifest, indent=0, sort_keys=True))
        os.replace(tmp, self.directory / _MANIFEST)
