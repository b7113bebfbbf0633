"""A deterministic fake backend and tokenizer that record what the Scheduler asks of them."""

from __future__ import annotations

from dataclasses import dataclass

from llm.engine.contract.backend import (
    SAMPLING_MODES,
    Backend,
    Capabilities,
    DecodeInput,
    PrefillInput,
)
from llm.engine.contract.outputs import StepOutput
from llm.engine.paged_kv import PageTable, PageTableSpec
from llm.model.config import RuntimeConfig
from llm.model.tokenizer.detokenizer import IncrementalDecoder

EOS = 0
VOCAB = 100


@dataclass(frozen=True)
class FakeModelConfig:
    vocab_size: int = VOCAB


def next_token(token: int, position: int) -> int:
    """The fake model: a token never equal to EOS, a function of the fed token and position."""
    return (token * 7 + position) % (VOCAB - 1) + 1


class FakeBackend(Backend):
    """Records ("prefill", slot, start_pos, n_tokens) and ("decode", slots) calls."""

    name = "fake"

    def __init__(self, runtime: RuntimeConfig) -> None:
        self.runtime = runtime
        self.config = FakeModelConfig()  # type: ignore[assignment]
        self.calls: list[tuple] = []
        self.sampling: list = []

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(SAMPLING_MODES, self.runtime.max_batch, self.runtime.max_seq_len)

    def describe(self) -> str:
        return "fake backend"

    def prefill(self, inp: PrefillInput) -> int:
        self.calls.append(("prefill", inp.slot, inp.start_pos, len(inp.tokens)))
        assert inp.page_table[0] != 0, "prefill into a slot without pages"
        last = inp.start_pos + len(inp.tokens) - 1
        return next_token(inp.tokens[-1], last)

    def prefill_step(self, inp: PrefillInput, launched=None) -> StepOutput:
        """The fake model's token for this user and each fork (they share the prompt)."""
        if launched is not None:
            launched()
        return StepOutput([self.prefill(inp)] * (1 + len(inp.forks)))

    def copy_pages(self, pairs) -> None:
        self.calls.append(("copy", tuple(pairs)))

    def decode(self, inp: DecodeInput) -> list[int]:
        self.calls.append(("decode", tuple(inp.slots)))
        self.sampling.append(list(inp.sampling))
        return [next_token(t, p) for t, p in zip(inp.tokens, inp.positions)]


class GreedyOnlyBackend(FakeBackend):
    """The fake model on a backend that declares greedy decoding only (as the tt backend does)."""

    name = "greedy-only"

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(frozenset({"greedy"}), self.runtime.max_batch,
                            self.runtime.max_seq_len)


class FakeTokenizer:
    """Token t decodes to "<t>"; EOS is token 0."""

    eos_ids = (EOS,)

    @staticmethod
    def decode(ids, skip_special_tokens: bool = True) -> str:
        return "".join(f"<{i}>" for i in ids if not (skip_special_tokens and i == EOS))

    def stream(self, *, skip_special_tokens: bool = True) -> IncrementalDecoder:
        return IncrementalDecoder(self.decode, skip_special_tokens=skip_special_tokens)


def fake_parts(max_batch: int = 4, max_seq_len: int = 128, block_size: int = 8,
               num_blocks: int | None = None) -> tuple[FakeBackend, FakeTokenizer, PageTable]:
    rt = RuntimeConfig(max_batch=max_batch, max_seq_len=max_seq_len, block_size=block_size,
                       num_blocks=num_blocks)
    pages = PageTable(PageTableSpec(rt.total_blocks, rt.block_size, rt.blocks_per_seq),
                      rt.max_batch)
    return FakeBackend(rt), FakeTokenizer(), pages


def expected_tokens(prompt: list[int], n: int) -> list[int]:
    """What the fake model generates for `prompt`, alone."""
    out, token, pos = [], prompt[-1], len(prompt) - 1
    for _ in range(n):
        token = next_token(token, pos)
        out.append(token)
        pos += 1
    return out
