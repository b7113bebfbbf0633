"""How a model is split over N ranks for tensor parallelism (backend-neutral).

Megatron-style 1-D split, as the tech report's section 3.3 describes for a mesh:
- Query heads are split into N contiguous ranges (as even as possible: 9 heads over 2 ranks are
  4 + 5). QKV is column-parallel, o_proj row-parallel (its input columns of the local heads).
- Each rank holds the KV heads its query heads use. When a GQA group is cut by a rank boundary (or
  N > num_kv_heads) that KV head is replicated on both ranks. Locally the grouping must be uniform
  (`local heads / local KV heads` query heads per KV head, in order), so a KV head whose group
  has r local query heads is stored r / g times, g being the gcd of those counts; when the split
  follows group boundaries this is exactly one copy of each local KV head.
- The MLP's intermediate dimension is split into N ranges: gate/up column-parallel, down
  row-parallel. One all-reduce after o_proj and one after down per layer.
- The vocabulary is split into N ranges: the embedding looks up only its own rows (zeros elsewhere,
  then an all-reduce) and the LM head computes only its own logits (argmax or sampling over the
  gathered pieces).
- Norm weights (and o_proj / down biases, added once) are replicated.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from llm.model.checkpoint.common import expected_tensors
from llm.model.config import ConfigError, ModelConfig

if TYPE_CHECKING:
    import torch

    from llm.backends.torch.parallel.slices import WeightSlices


def split_range(total: int, parts: int, index: int) -> tuple[int, int]:
    """The index-th of `parts` contiguous ranges covering [0, total), sizes differing by <= 1."""
    return total * index // parts, total * (index + 1) // parts


@dataclass(frozen=True)
class RankShard:
    """What one rank holds: ranges of heads, intermediate units and vocabulary, and its KV heads.

    kv_heads: global KV head ids in local order (repeats are replicated copies), so local query
    head i uses local KV head i // (len(heads) // len(kv_heads)).
    """

    rank: int
    heads: tuple[int, int]
    kv_heads: tuple[int, ...]
    ffn: tuple[int, int]
    vocab: tuple[int, int]

    @property
    def num_heads(self) -> int:
        return self.heads[1] - self.heads[0]


@dataclass(frozen=True)
class TensorParallelPlan:
    """The split of `config` over `size` ranks; construction validates it (ConfigError)."""

    config: ModelConfig
    size: int

    def __post_init__(self) -> None:
        c, n = self.config, self.size
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"tensor_parallel must be a positive integer, got {n!r}")
        limits = {"num_heads (query heads)": c.num_heads, "intermediate_size": c.intermediate_size,
                  "vocab_size": c.vocab_size}
        for what, value in limits.items():
            if n > value:
                raise ConfigError(
                    f"tensor_parallel={n} exceeds the model's {what} of {value}: every rank needs "
                    f"at least one (choose tensor_parallel <= {min(limits.values())})")

    def shard(self, rank: int) -> RankShard:
        """The part of the model that `rank` (0 <= rank < size) holds."""
        if not 0 <= rank < self.size:
            raise ValueError(f"rank {rank} is outside 0..{self.size - 1}")
        c, n = self.config, self.size
        h0, h1 = split_range(c.num_heads, n, rank)
        group = c.group_size
        runs: dict[int, int] = {}  # KV head -> local query heads using it
        for h in range(h0, h1):
            runs[h // group] = runs.get(h // group, 0) + 1
        g = math.gcd(*runs.values())
        kv = tuple(k for k, r in runs.items() for _ in range(r // g))
        return RankShard(rank, (h0, h1), kv, split_range(c.intermediate_size, n, rank),
                         split_range(c.vocab_size, n, rank))

    def local_config(self, rank: int) -> ModelConfig:
        """The config of the rank's slice as if it were a model of its own (local head counts,
        intermediate and vocabulary sizes); head_dim and everything else unchanged.
        """
        s = self.shard(rank)
        return dataclasses.replace(
            self.config, num_heads=s.num_heads, num_kv_heads=len(s.kv_heads),
            intermediate_size=s.ffn[1] - s.ffn[0], vocab_size=s.vocab[1] - s.vocab[0])

    @property
    def max_local_vocab(self) -> int:
        """The largest vocabulary slice (gathered logits are padded to it)."""
        return -(-self.config.vocab_size // self.size)

    def read_local(self, weights: WeightSlices, rank: int) -> dict[str, torch.Tensor]:
        """The rank's tensors under their canonical names, sliced as the module docstring says.

        o_proj / down_proj biases are added once, after the all-reduce's sum: rank 0 holds them,
        the other ranks do not get them at all.
        """
        c, s = self.config, self.shard(rank)
        hd = c.head_dim
        q_rows = [(s.heads[0] * hd, s.heads[1] * hd)]
        kv_rows = [(k * hd, (k + 1) * hd) for k in s.kv_heads]
        out: dict[str, torch.Tensor] = {}
        for name in (n for n in expected_tensors(c) if n.startswith("model.layers.")):
            kind = name.split(".", 3)[3]  # e.g. "self_attn.q_proj.weight"
            if kind.endswith("norm.weight"):
                out[name] = weights.read(name)
            elif kind.startswith("self_attn.q_proj."):
                out[name] = weights.read(name, 0, q_rows)
            elif kind.startswith(("self_attn.k_proj.", "self_attn.v_proj.")):
                out[name] = weights.read(name, 0, kv_rows)
            elif kind == "self_attn.o_proj.weight":
                out[name] = weights.read(name, 1, q_rows)
            elif kind.startswith(("mlp.gate_proj.", "mlp.up_proj.")):
                out[name] = weights.read(name, 0, [s.ffn])
            elif kind == "mlp.down_proj.weight":
                out[name] = weights.read(name, 1, [s.ffn])
            elif rank == 0:  # o_proj.bias, down_proj.bias
                out[name] = weights.read(name)
        out["model.norm.weight"] = weights.read("model.norm.weight")
        out["model.embed_tokens.weight"] = weights.read("model.embed_tokens.weight", 0, [s.vocab])
        if not c.tie_word_embeddings:
            out["lm_head.weight"] = weights.read("lm_head.weight", 0, [s.vocab])
        return out

