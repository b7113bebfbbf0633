"""Start one rank of a tensor-parallel torch backend from a BackendSpec (under torchrun).

The launch is checked before any file is read (a wrong `--tp`, more ranks than processes, a
`cuda:N` device), the split before any weight is read (every rank needs a query head), and each
rank then reads only its slices of the checkpoint.
"""

from __future__ import annotations

from typing import Any

from llm.backends.torch.parallel.leader import FollowerBackend, LeaderBackend
from llm.backends.torch.parallel.mesh import Mesh
from llm.backends.torch.parallel.plan import TensorParallelPlan
from llm.backends.torch.parallel.slices import open_weight_slices
from llm.engine.contract.backend import Backend, BackendSpec
from llm.model.checkpoint.common import Checkpoint
from llm.model.config import ConfigError


def launch(spec: BackendSpec, build: Any) -> Backend:
    """This process's rank: a LeaderBackend on rank 0, a FollowerBackend elsewhere.

    build(weights, runtime, mesh) -> the rank's torch backend.
    """
    size = spec.tensor_parallel
    if isinstance(spec.model, Checkpoint):
        raise ConfigError("tensor_parallel needs a checkpoint path (each rank reads its slices)")
    if spec.weights_mode("dequantize") != "dequantize":
        raise ConfigError(f"tensor_parallel reads dequantized weight slices; weights="
                          f"{spec.weights!r} is not supported with it yet")
    Mesh.check_launch(size, spec.device)
    path = spec.model_path()
    weights = open_weight_slices(path, cache_dir=spec.cache_dir, progress=spec.progress)
    try:
        TensorParallelPlan(weights.config, size)
        mesh, device = Mesh.from_env(size, spec.device)
        backend = build(weights, spec.runtime(weights.config, device), mesh)
    finally:
        weights.close()
    backend.source, backend.source_sha256 = path, weights.source_sha256
    if mesh.leader:
        return LeaderBackend(backend, mesh, on_close=mesh.close)
    return FollowerBackend(backend, mesh, on_close=mesh.close)
