"""The Backend interface that the Generator drives, and the lazy registry of backends.

A backend owns the model weights on its device and the paged KV cache. The Generator owns the
schedule: which user sits in which batch slot, which KV pages each user holds, and when a user
stops. Inputs cross this interface as plain Python values, so a backend is free in how it stages
them on its device.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from llm.engine.contract.sampling_params import SamplingParams
from llm.model.checkpoint.common import Checkpoint
from llm.model.config import ModelConfig, RuntimeConfig


@dataclass(frozen=True)
class SequenceSampling:
    """The sampling parameters of one user and the seed its random stream is keyed by."""

    params: SamplingParams
    seed: int


@dataclass(frozen=True)
class PrefillInput:
    """One user's prompt (or a chunk of it) to run through the model.

    tokens: [S] token ids at positions start_pos .. start_pos + S - 1.
    page_table: [max_blocks_per_seq] page ids of this user (padded with page 0).
    """

    slot: int
    tokens: Sequence[int]
    start_pos: int
    page_table: Sequence[int]
    sampling: SequenceSampling


@dataclass(frozen=True)
class DecodeInput:
    """One decode step: one token per active user.

    tokens / positions: [B] the token each user feeds and its position. page_table: [B,
    max_blocks_per_seq].
    """

    slots: Sequence[int]
    tokens: Sequence[int]
    positions: Sequence[int]
    page_table: Sequence[Sequence[int]]
    sampling: Sequence[SequenceSampling]


class Backend(ABC):
    """A device backend: weights on the device, a paged KV cache, prefill and decode."""

    name: str
    config: ModelConfig
    runtime: RuntimeConfig

    @abstractmethod
    def prefill(self, inp: PrefillInput) -> int:
        """Run the prompt, write its K/V into the user's pages, return the next token."""

    @abstractmethod
    def decode(self, inp: DecodeInput) -> list[int]:
        """Run one token per user, write its K/V, return the next token of each user ([B])."""

    @abstractmethod
    def describe(self) -> str:
        """One line saying what runs where (backend, device, dtype)."""


_BACKENDS = {"torch": "llm.backends.torch.runner", "tt": "llm.backends.tt.runner"}


def create_backend(name: str, checkpoint: Checkpoint, runtime: RuntimeConfig,
                   options: Mapping[str, Any] | None = None) -> Backend:
    """Import backend `name` on first use and build it; unknown names are a clear error.

    `options` are backend-specific keyword arguments of its `create` (e.g. a mesh shape for tt).
    """
    if name not in _BACKENDS:
        raise ValueError(f"unknown backend {name!r} (available: {', '.join(sorted(_BACKENDS))})")
    try:
        module = importlib.import_module(_BACKENDS[name])
    except ModuleNotFoundError as e:
        raise ValueError(f"backend {name!r} is not available in this installation: {e}") from e
    return module.create(checkpoint, runtime, **dict(options or {}))
