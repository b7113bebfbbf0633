"""The torch Backend: the Transformer, its paged KV cache and on-device sampling."""

from __future__ import annotations

import torch

from llm.backends.base import Backend, DecodeInput, PrefillInput, SequenceSampling
from llm.backends.torch.kv_cache import PagedKVCache
from llm.backends.torch.model import Transformer
from llm.checkpoint import Checkpoint
from llm.config import RuntimeConfig
from llm.sampling import SamplingTensors, sample


class TorchBackend(Backend):
    """PyTorch on CPU or CUDA, fp32 / bf16 / fp16."""

    name = "torch"

    def __init__(self, checkpoint: Checkpoint, runtime: RuntimeConfig) -> None:
        if runtime.device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(f"device {runtime.device!r} requested but CUDA is not available")
        self.config = checkpoint.config
        self.runtime = runtime
        self.device = torch.device(runtime.device)
        self.model = Transformer(self.config, checkpoint.tensors, runtime)
        self.cache = PagedKVCache(self.config, runtime, self.device, self.model.dtype)

    def describe(self) -> str:
        return f"torch backend on {self.device} ({self.runtime.dtype})"

    def _tensor(self, values, dtype=torch.int64) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=self.device)

    def _sample(self, logits: torch.Tensor, sampling: list[SequenceSampling],
                positions: list[int]) -> list[int]:
        """logits [B, V] -> tokens; `positions` are those of the tokens being chosen."""
        params = [s.params for s in sampling]
        all_greedy = all(p.greedy for p in params)
        st = SamplingTensors.build(params, [s.seed for s in sampling], self.device)
        return sample(logits, st, self._tensor(positions), all_greedy).tolist()

    def prefill(self, inp: PrefillInput) -> int:
        logits = self.model.prefill(self._tensor(list(inp.tokens)), inp.start_pos,
                                    self._tensor(list(inp.page_table)), self.cache)
        return self._sample(logits[None], [inp.sampling], [inp.start_pos + len(inp.tokens)])[0]

    def decode(self, inp: DecodeInput) -> list[int]:
        positions = list(inp.positions)
        logits = self.model.decode(self._tensor(list(inp.tokens)), self._tensor(positions),
                                   self._tensor([list(r) for r in inp.page_table]), self.cache,
                                   max(positions))
        return self._sample(logits, list(inp.sampling), [p + 1 for p in positions])


def create(checkpoint: Checkpoint, runtime: RuntimeConfig) -> TorchBackend:
    """Registry entry point (see llm.backends.base.create_backend)."""
    return TorchBackend(checkpoint, runtime)
