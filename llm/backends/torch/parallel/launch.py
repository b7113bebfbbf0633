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
from llm.backends.torch.parallel.quantizing_slices import QuantizingSlices, open_slices_as
from llm.engine.contract.backend import Backend, BackendSpec
from llm.model.checkpoint.common import Checkpoint
from llm.model.config import ConfigError


def launch(spec: BackendSpec, build: Any) -> Backend:
    """This process's rank: a LeaderBackend on rank 0, a FollowerBackend elsewhere.

    build(weights, runtime, mesh) -> the rank's torch backend. "stored" keeps a GGUF's quantized
    blocks, "int8" / "int4" / "int4_mix" quantize an HF model's slices, each rank holding only its
    share of the quantized bytes (`llm.backends.torch.parallel.plan`). weights="auto" is as on one
    process: "stored" on the CPU (2 gloo ranks, default model: 52 MB a rank instead of 287,
    decode 8.4-10.6 tok/s against 6.8-7.5 dequantized), "dequantize" on CUDA (stored not
    measured there with tensor parallelism yet).
    """
    size = spec.tensor_parallel
    if isinstance(spec.model, Checkpoint):
        raise ConfigError("tensor_parallel needs a checkpoint path (each rank reads its slices)")
    Mesh.check_launch(size, spec.device)
    path = spec.model_path()
    mode = spec.weights_mode("stored" if spec.device == "cpu" else "dequantize")
    weights = open_slices_as(path, mode, cache_dir=spec.cache_dir,
                             progress=spec.progress, int4_group=spec.int4_group)
    try:
        TensorParallelPlan.for_weights(weights, size)
        mesh, device = Mesh.from_env(size, spec.device)
        mesh.check_same({"model": (weights.config, weights.source_sha256),  # (not its path)
                         "weights": mode,
                         "int4_group": spec.int4_group, "dtype": spec.dtype,
                         "max_batch": spec.max_batch, "max_seq_len": spec.max_seq_len,
                         "block_size": spec.block_size, "num_blocks": spec.num_blocks,
                         "options": sorted(spec.options.items())})
        if isinstance(weights, QuantizingSlices):
            weights = weights.across(mesh)
        backend = build(weights, spec.runtime(weights.config, device), mesh)
    finally:
        weights.close()
    backend.source, backend.source_sha256 = path, weights.source_sha256
    if mesh.leader:
        return LeaderBackend(backend, mesh, on_close=mesh.close)
    return FollowerBackend(backend, mesh, on_close=mesh.close)
