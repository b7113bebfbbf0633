"""The ranks one model is split over (tensor parallelism on torch.distributed) and their
collectives.

Every module receives a `Mesh`; on a single rank (`Mesh.single()`) every collective is the
identity, so the one-process path runs exactly the code it always ran. Tensor collectives use the
process group the ranks were started with (NCCL on GPUs, gloo on CPUs; NCCL collectives are
captured inside the decode CUDA graphs); host messages (the leader's schedule) go over a gloo
group.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from llm.model.config import ConfigError

# Followers wait in a broadcast for the leader's next step; an idle server must not time them out
# (gloo's default is 30 minutes). A leader that exits closes the connections, which ends them.
CONTROL_TIMEOUT = timedelta(days=365)


@dataclass(frozen=True)
class Mesh:
    """rank / size of this process in the tensor-parallel group; group None on a single rank."""

    rank: int = 0
    size: int = 1
    group: Any = None  # tensor collectives
    control: Any = None  # gloo group for host objects
    symmetric: SymmetricAllReduce | None = None  # small all-reduces on GPUs (see with_symmetric)
    library: str = "none"  # of the tensor collectives: "nccl" or "gloo"

    @classmethod
    def single(cls) -> Mesh:
        return cls()

    @staticmethod
    def check_launch(size: int, device: str) -> str:
        """Raise ConfigError unless this process can be one of `size` ranks on `device` (the
        world size matches, the device is "cpu" or "cuda", this rank has a GPU); returns the rank's
        device: `cuda:<LOCAL_RANK>` for "cuda", "cpu" for "cpu". Joins nothing.
        """
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ConfigError(f"tensor_parallel must be a positive integer, got {size!r}")
        world = dist.get_world_size() if dist.is_initialized() else int(
            os.environ.get("WORLD_SIZE", "1"))
        if size == 1 and world > 1:  # N full copies that each print and serve: not what was meant
            raise ConfigError(f"tensor_parallel=1, but this process was started as one of "
                              f"{world} (torchrun --nproc-per-node {world}): pass "
                              f"tensor_parallel={world} (--tp {world}), or run one process")
        if size == 1:
            return device
        if device not in ("cpu", "cuda"):
            raise ConfigError(f"tensor parallel runs on device 'cpu' or 'cuda' (each rank takes "
                              f"cuda:<LOCAL_RANK>), got {device!r}")
        if world != size:
            raise ConfigError(
                f"tensor_parallel={size} needs {size} processes, but this one was started as one "
                f"of {world}; launch with `torchrun --nproc-per-node {size} ...`")
        if device == "cpu":
            return device
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        found = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if found <= local_rank:
            raise ConfigError(f"the rank with LOCAL_RANK={local_rank} needs a GPU of its own, but "
                              f"{found} CUDA devices are visible")
        return f"cuda:{local_rank}"

    @classmethod
    def from_env(cls, size: int, device: str) -> tuple[Mesh, str]:
        """Join (or use the already initialised) torch.distributed group of `size` ranks, as
        torchrun's environment describes (NCCL for "cuda", gloo for "cpu"); returns the mesh and
        this rank's device (see `check_launch`, whose errors come first).
        """
        device = cls.check_launch(size, device)
        if size == 1:
            return cls.single(), device
        if device != "cpu":
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device != "cpu" else "gloo")
        control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
        return cls(dist.get_rank(), size, dist.group.WORLD, control,
                   library=str(dist.get_backend())), device

    @property
    def distributed(self) -> bool:
        """Whether collectives run (a process group exists; a group of one rank runs them too,
        which exercises the tensor-parallel code paths on one device)."""
        return self.group is not None

    @property
    def leader(self) -> bool:
        """Rank 0 owns the Generator, the tokenizer and all I/O."""
        return self.rank == 0

    def with_symmetric(self, dtype: torch.dtype, device: torch.device,
                       capacity: int) -> Mesh:
        """This mesh with all-reduces of up to `capacity` elements of `dtype` (decode steps) done
        by a one-shot kernel over PyTorch symmetric memory instead of NCCL; unchanged where that is
        unavailable (one rank, no CUDA, no peer access, a torch without the op).
        """
        if not self.distributed or self.size == 1 or device.type != "cuda":
            return self
        if not SymmetricAllReduce.available(self.size):
            return self
        return dataclasses.replace(self, symmetric=SymmetricAllReduce(self.group, dtype, device,
                                                                      capacity))

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of `x` over the ranks, in place (identity without a process group)."""
        if self.symmetric is not None and self.symmetric.fits(x):
            return self.symmetric(x)
        if self.distributed:
            dist.all_reduce(x, group=self.group)
        return x

    def all_max(self, x: torch.Tensor) -> torch.Tensor:
        """Elementwise max of a CPU tensor `x` over the ranks, in place, over the host (gloo)
        group: for load-time agreement (e.g. int8 row scales of row-parallel slices), on CPU and
        GPU meshes alike (identity without a group)."""
        if self.distributed:
            dist.all_reduce(x, op=dist.ReduceOp.MAX, group=self.control)
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's `x` stacked in rank order: [size, *x.shape] (x[None] without a group)."""
        if not self.distributed:
            return x[None]
        out = torch.empty((self.size, *x.shape), dtype=x.dtype, device=x.device)
        if dist.get_backend(self.group) == "nccl":
            dist.all_gather_into_tensor(out, x.contiguous(), group=self.group)
        else:
            dist.all_gather(list(out.unbind(0)), x.contiguous(), group=self.group)
        return out

    def broadcast_object(self, obj: Any = None) -> Any:
        """The leader's `obj` on every rank (followers pass nothing)."""
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def check_same(self, settings: dict[str, Any]) -> None:
        """ConfigError on every rank unless every rank was given the same `settings` (name ->
        value, compared by repr): ranks built with other weights, groups or sizes would read
        other slices and wait in collectives that never meet (a hang), or compute wrong text."""
        if not self.distributed or self.size == 1:
            return
        mine = {k: repr(v) for k, v in settings.items()}
        every: list[Any] = [None] * self.size
        dist.all_gather_object(every, mine, group=self.control)
        differ = [k for k in mine if len({str(r.get(k)) for r in every}) > 1]
        if differ:
            raise ConfigError("the tensor-parallel ranks were given different settings: " + "; "
                              .join(f"{k}: " + ", ".join(f"rank {i} {r.get(k)}"
                                                         for i, r in enumerate(every))
                                    for k in differ))

    def close(self) -> None:
        """Leave the process group (after the last collective)."""
        if self.size > 1 and dist.is_initialized():
            dist.destroy_process_group()


class SymmetricAllReduce:
    """A one-shot all-reduce for small tensors through PyTorch symmetric memory: every rank copies
    its tensor into a buffer its peers can read over NVLink, and one kernel (with its own barriers,
    capturable in CUDA graphs) sums all ranks' buffers into the result. Lower latency than NCCL's
    ring for the [B, H] activations of a decode step; NVLink multicast is not used.
    """

    def __init__(self, group: Any, dtype: torch.dtype, device: torch.device,
                 capacity: int) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        self.name = group.group_name
        self.buffer = symm_mem.empty(capacity, dtype=dtype, device=device)
        symm_mem.rendezvous(self.buffer, self.name)  # same order on every rank

    @staticmethod
    def available(size: int) -> bool:
        """The op exists and every GPU pair of the node has peer access."""
        if not hasattr(torch.ops, "symm_mem") or not hasattr(torch.ops.symm_mem,
                                                             "one_shot_all_reduce_out"):
            return False
        n = min(size, torch.cuda.device_count())
        return all(torch.cuda.can_device_access_peer(i, j)
                   for i in range(n) for j in range(n) if i != j)

    def fits(self, x: torch.Tensor) -> bool:
        return (x.is_cuda and x.dtype == self.buffer.dtype and x.is_contiguous()
                and x.numel() <= self.buffer.numel())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x summed over the ranks, in place."""
        flat = x.view(-1)
        slot = self.buffer[:flat.numel()]
        slot.copy_(flat)
        torch.ops.symm_mem.one_shot_all_reduce_out(slot, "sum", self.name, flat)
        return x
