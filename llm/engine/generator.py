"""The Generator: the synchronous front of the continuous-batching Scheduler.

`generate` / `stream` validate every prompt up front (a bad one raises before anything runs), queue
them all on the Scheduler and step it until they are done: each request is admitted as soon as a
slot is free and the KV pool has pages for its whole budget (prompt + max_new_tokens, capped at the
sequence limit), prefilled in chunks, then decoded together with every other active request, each
at its own position. A finished request frees its slot and pages at once. A request whose budget
can never fit is refused up front with a clear error; one that does not fit yet waits.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from llm.engine.contract.backend import Backend
from llm.engine.contract.sampling_params import SamplingParams
from llm.engine.paged_kv import PageTable, PageTableSpec
from llm.engine.scheduler import Scheduler, SchedulerConfig
from llm.engine.sequence import RequestError, RequestOutput, StreamEvent
from llm.engine.sequence import Sequence as SequenceState
from llm.model.tokenizer.tokenizer import Tokenizer

__all__ = ["Generator", "RequestError", "RequestOutput", "StreamEvent"]


class Generator:
    """Runs requests on a Backend with a Tokenizer; one Generator per backend instance.

    `pages` is the KV page table of the backend's cache (pass an existing one to share it); an
    `AsyncEngine` built on the same backend shares it too (they must not run at the same time:
    backends are not thread-safe).
    """

    def __init__(self, backend: Backend, tokenizer: Tokenizer,
                 config: SchedulerConfig | None = None, pages: PageTable | None = None) -> None:
        self.backend = backend
        self.tokenizer = tokenizer
        rt = backend.runtime
        self.max_seq_len = rt.max_seq_len
        self.pages = pages or PageTable(
            PageTableSpec(rt.total_blocks, rt.block_size, rt.blocks_per_seq), rt.max_batch)
        self.vocab_size = backend.config.vocab_size
        self.scheduler = Scheduler(backend, tokenizer, self.pages, config)

    def encode_prompt(self, prompt: str | Sequence[int], chat: bool = False) -> list[int]:
        """Text (optionally as one user chat message) or token ids -> token ids."""
        if isinstance(prompt, str):
            if chat:
                text = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
                return self.tokenizer.encode(text, add_special_tokens=False)
            return self.tokenizer.encode(prompt)
        return list(prompt)

    def generate(self, prompts: Sequence[str | Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None,
                 chat: bool = False) -> list[RequestOutput]:
        """Run every prompt to completion; results in prompt order."""
        outputs: list[RequestOutput | None] = [None] * len(prompts)
        for ev in self.stream(prompts, params, chat):
            if ev.finished:
                outputs[ev.index] = ev.output
        return outputs  # type: ignore[return-value]

    def stream(self, prompts: Sequence[str | Sequence[int]],
               params: SamplingParams | Sequence[SamplingParams] | None = None,
               chat: bool = False) -> Iterator[StreamEvent]:
        """Yield text deltas of all prompts as they are produced (interleaved across requests)."""
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of prompts; wrap a single prompt in a list")
        plist = _per_request(params, len(prompts))
        sched = self.scheduler
        seqs = [sched.make_sequence(i, self.encode_prompt(p, chat), sp)
                for i, (p, sp) in enumerate(zip(prompts, plist))]
        return self._run(seqs)

    def _run(self, seqs: list[SequenceState]) -> Iterator[StreamEvent]:
        sched = self.scheduler
        try:
            for seq in seqs:
                sched.add(seq)
            while any(not s.finished for s in seqs):
                yield from sched.step()
        finally:
            for seq in seqs:  # an abandoned stream still returns its slots and pages
                sched.cancel(seq)


def _per_request(params: SamplingParams | Sequence[SamplingParams] | None,
                 n: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * n
    if isinstance(params, SamplingParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise ValueError(f"got {len(params)} SamplingParams for {n} prompts")
    return params
