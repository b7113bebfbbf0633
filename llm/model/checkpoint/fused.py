"""Checkpoint tensors that stack several canonical ones (`llm.model.arch.Fused`, e.g. Phi-3's
qkv_proj and gate_up_proj): where each canonical tensor lies in them, and the stacking again
for writing a checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from llm.model.checkpoint.common import CheckpointError, expected_tensors
from llm.model.config import ModelConfig


@dataclass(frozen=True)
class Part:
    """Where a canonical tensor is stored: the checkpoint tensor `name`, whole (rows None) or
    its rows [start, stop)."""

    name: str
    rows: tuple[int, int] | None = None

    def shape(self, stored: tuple[int, ...]) -> tuple[int, ...]:
        """This part's shape, given the stored tensor's."""
        return stored if self.rows is None else (self.rows[1] - self.rows[0], *stored[1:])


def locate(config: ModelConfig, stored: Mapping[str, tuple[int, ...]],
           origin: Mapping[str, str]) -> dict[str, Part]:
    """Canonical name -> Part for the stored tensors `stored` (HF name -> shape). A tensor the
    architecture declares fused gives its parts, in the rows `expected_tensors` assigns them;
    every other tensor stands for itself (an unknown one is left to `check_tensors` to report).
    A canonical tensor stored twice (fused and alone) is an error. `origin` names each stored
    tensor's file for errors.
    """
    expected = expected_tensors(config)
    parts: dict[str, Part] = {}

    def add(canonical: str, part: Part) -> None:
        if canonical in parts:
            raise CheckpointError(
                f"tensor {canonical!r} is stored twice: as {parts[canonical].name!r} in "
                f"{origin[parts[canonical].name]} and as {part.name!r} in {origin[part.name]}")
        parts[canonical] = part

    for name, shape in stored.items():
        split = config.spec.split_name(name)
        if split is None or not all(p in expected for p in split):
            add(name, Part(name))
            continue
        start = 0
        for p in split:
            rows = expected[p][0]
            add(p, Part(name, (start, start + rows)))
            start += rows
        if tuple(shape) != (start, *expected[split[0]][1:]):
            raise CheckpointError(
                f"tensor {name!r} in {origin[name]} has shape {list(shape)}, expected "
                f"{[start, *expected[split[0]][1:]]} ({' + '.join(split)} stacked)")
    return parts


def canonical_index(config: ModelConfig, stored: Mapping[str, tuple[int, ...]],
                    origin: Mapping[str, str]
                    ) -> tuple[dict[str, Part], dict[str, tuple[int, ...]], dict[str, str]]:
    """`locate`, and the canonical tensors' shapes and origins (a part's origin names its rows
    of the stored tensor), ready for `check_tensors`."""
    parts = locate(config, stored, origin)
    shapes = {name: p.shape(tuple(stored[p.name])) for name, p in parts.items()}
    where = {name: origin[p.name] if p.rows is None
             else f"{origin[p.name]} (rows {p.rows[0]}:{p.rows[1]} of {p.name!r})"
             for name, p in parts.items()}
    return parts, shapes, where


def fuse(config: ModelConfig, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Canonical tensors -> the tensors of this architecture's HF checkpoint: the parts of each
    fused tensor stacked in its place (where its first part was), the rest as they are."""
    first: dict[str, tuple[str, list[str]]] = {}  # first part -> (fused name, all parts)
    for fused in config.spec.hf_fused:
        for i in range(config.num_layers):
            for kind in ("weight", "bias"):
                parts = [f"model.layers.{i}.{p}.{kind}" for p in fused.parts]
                if all(p in tensors for p in parts):
                    first[parts[0]] = (f"model.layers.{i}.{fused.stored}.{kind}", parts)
    inside = {p for _, parts in first.values() for p in parts}
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name in first:
            whole, parts = first[name]
            out[whole] = torch.cat([tensors[p] for p in parts], dim=0)
        elif name not in inside:
            out[name] = t
    return out
