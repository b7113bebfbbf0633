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
- Quantized row-parallel weights (o_proj, down_proj kept as stored or quantized at load) split
  their input columns only at their quantization groups' boundaries (`ColumnBlock`: 32 or 256
  columns for GGUF blocks, the int4 group): query heads are then split in units of
  lcm(head_dim, group) / head_dim heads and the intermediate dimension in units of a group, as
  evenly as those units allow (the same split as above whenever that one is aligned). A split that
  cannot give every rank a whole unit is a ConfigError naming the tensor, its group and the split.
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
class ColumnBlock:
    """Input columns of a row-parallel weight split only at multiples of `columns` (its
    quantization group); `tensor` and `format` name the weight that needs it (for errors)."""

    columns: int = 1
    tensor: str = ""
    format: str = ""


@dataclass(frozen=True)
class TensorParallelPlan:
    """The split of `config` over `size` ranks; construction validates it (ConfigError).

    o_block / down_block: the column granularity of o_proj's / down_proj's input columns (1 for
    dense weights); `for_weights` reads them from a checkpoint's tensors.
    """

    config: ModelConfig
    size: int
    o_block: ColumnBlock = ColumnBlock()
    down_block: ColumnBlock = ColumnBlock()

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
        hd = c.head_dim
        self._check_aligned(self.o_block, c.num_heads, self._head_unit(), hd,
                            f"{c.num_heads} query heads x head_dim {hd}",
                            [split_range(c.num_heads, n, r)[0] * hd for r in range(1, n)])
        self._check_aligned(self.down_block, c.intermediate_size, self.down_block.columns, 1,
                            "intermediate_size",
                            [split_range(c.intermediate_size, n, r)[0] for r in range(1, n)])

    @classmethod
    def for_weights(cls, weights: WeightSlices, size: int) -> TensorParallelPlan:
        """The plan of `weights.config` over `size` ranks, its row-parallel splits aligned to the
        quantization groups of the o_proj / down_proj weights as `weights` gives them."""
        c = weights.config

        def block(kind: str) -> ColumnBlock:
            found = ColumnBlock()
            for i in range(c.num_layers):
                name = f"model.layers.{i}.{kind}.weight"
                columns, fmt = weights.column_block(name)
                if math.lcm(found.columns, columns) != found.columns:
                    found = ColumnBlock(math.lcm(found.columns, columns), name, fmt)
            return found

        return cls(c, size, block("self_attn.o_proj"), block("mlp.down_proj"))

    def _head_unit(self) -> int:
        """Query heads per split unit: the fewest whole heads spanning whole o_proj groups."""
        hd = self.config.head_dim
        return math.lcm(hd, self.o_block.columns) // hd

    def _check_aligned(self, block: ColumnBlock, total: int, unit: int, width: int, what: str,
                       even: list[int]) -> None:
        """ConfigError unless `total` heads (width head_dim) or columns (width 1) split into
        `size` non-empty ranges of whole `unit`s; `even`: the unaligned split's boundaries."""
        if block.columns == 1 or (total % unit == 0 and total // unit >= self.size):
            return
        columns = total * width
        cut = [b for b in even if b % block.columns]
        raise ConfigError(
            f"tensor_parallel={self.size} cannot split the input columns of {block.tensor} "
            f"({block.format}, quantization groups of {block.columns} columns) at group "
            f"boundaries: its {columns} columns ({what}) are {columns / block.columns:g} groups "
            f"for {self.size} ranks (the even split at columns {even} cuts groups at {cut}); "
            f"choose a tensor_parallel that gives every rank whole groups, or "
            f"weights='dequantize'")

    def shard(self, rank: int) -> RankShard:
        """The part of the model that `rank` (0 <= rank < size) holds."""
        if not 0 <= rank < self.size:
            raise ValueError(f"rank {rank} is outside 0..{self.size - 1}")
        c, n = self.config, self.size
        u, f = self._head_unit(), self.down_block.columns  # split units (1, 1 when dense)
        h0, h1 = (u * i for i in split_range(c.num_heads // u, n, rank))
        group = c.group_size
        runs: dict[int, int] = {}  # KV head -> local query heads using it
        for h in range(h0, h1):
            runs[h // group] = runs.get(h // group, 0) + 1
        g = math.gcd(*runs.values())
        kv = tuple(k for k, r in runs.items() for _ in range(r // g))
        ffn = tuple(f * i for i in split_range(c.intermediate_size // f, n, rank))
        return RankShard(rank, (h0, h1), kv, ffn, split_range(c.vocab_size, n, rank))

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

