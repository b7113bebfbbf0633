"""Which attention heads each device of a mesh holds (1-D tensor parallelism over ndev devices).

A mesh op runs the same program on every device, so every device needs the same number of
local query heads and local KV heads, whatever the model's head counts:
- Query heads are split into ndev contiguous ranges as even as possible (as the torch backend's
  tensor-parallel plan splits them: 9 heads over 2 devices are 4 + 5), each padded to the largest
  range with zero heads (zero Q rows and bias, zero o_proj rows: they add nothing to the output).
- Each device holds the KV heads its query heads use, in order; a KV head whose GQA group is cut
  by a device boundary, or shared because the mesh exceeds the KV heads, is replicated. Locally
  the grouping must be uniform (`n_heads / n_kv` consecutive query heads per KV head), so a KV
  head used by r local query heads is stored r / g times, g the gcd of all such runs over the
  mesh; a padding head joins the run of the device's last real head. When the split follows
  group boundaries this is one copy of each local KV head (no replication).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from llm.model.config import ModelConfig


@dataclass(frozen=True)
class HeadLayout:
    """Per device: the global query head of each local slot (None = padding head) and the global
    KV head of each local KV slot (repeats are replicated copies); every device has n_heads and
    n_kv slots, local query slot i using local KV slot i // (n_heads // n_kv)."""

    q: tuple[tuple[int | None, ...], ...]
    kv: tuple[tuple[int, ...], ...]

    @property
    def n_heads(self) -> int:
        return len(self.q[0])

    @property
    def n_kv(self) -> int:
        return len(self.kv[0])

    @property
    def ndev(self) -> int:
        return len(self.q)

    def q_rows(self, w: torch.Tensor, head_dim: int) -> torch.Tensor:
        """Rows (dim 0) of a per-query-head tensor `[nh dh, ...]` in device slot order, zero rows
        for padding heads: `[ndev n_heads dh, ...]`."""
        return self._rows(w, head_dim, [h for dev in self.q for h in dev])

    def kv_rows(self, w: torch.Tensor, head_dim: int) -> torch.Tensor:
        """Rows of a per-KV-head tensor `[nkv dh, ...]` in device slot order (replicas repeated):
        `[ndev n_kv dh, ...]`."""
        return self._rows(w, head_dim, [k for dev in self.kv for k in dev])

    @staticmethod
    def _rows(w: torch.Tensor, head_dim: int, heads: list[int | None]) -> torch.Tensor:
        zero = w.new_zeros((head_dim, *w.shape[1:]))
        return torch.cat([zero if h is None else w[h * head_dim:(h + 1) * head_dim]
                          for h in heads], 0)


def head_layout(config: ModelConfig, ndev: int) -> HeadLayout:
    """The layout of `config`'s heads over `ndev` devices (module docstring); ValueError when the
    mesh has more devices than query heads."""
    nh, group = config.num_heads, config.group_size
    if ndev > nh:
        raise ValueError(f"a mesh of {ndev} devices exceeds the model's {nh} query heads: every "
                         "device needs at least one")
    ranges = [(nh * d // ndev, nh * (d + 1) // ndev) for d in range(ndev)]
    width = max(b - a for a, b in ranges)
    runs_per_dev: list[list[tuple[int, int]]] = []  # (KV head, local query heads using it)
    for a, b in ranges:
        runs: list[tuple[int, int]] = []
        for h in range(a, b):
            if runs and runs[-1][0] == h // group:
                runs[-1] = (runs[-1][0], runs[-1][1] + 1)
            else:
                runs.append((h // group, 1))
        runs[-1] = (runs[-1][0], runs[-1][1] + width - (b - a))  # padding joins the last run
        runs_per_dev.append(runs)
    g = math.gcd(*(r for runs in runs_per_dev for _, r in runs))
    q = tuple(tuple(range(a, b)) + (None,) * (width - (b - a)) for a, b in ranges)
    kv = tuple(tuple(k for k, r in runs for _ in range(r // g)) for runs in runs_per_dev)
    return HeadLayout(q, kv)
