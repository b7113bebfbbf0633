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
from llm.engine.core import EngineCore
from llm.engine.scheduler import SchedulerConfig
from llm.engine.sequence import RequestError, RequestOutput, StreamEvent
from llm.engine.sequence import Sequence as SequenceState
from llm.model.tokenizer.tokenizer import Tokenizer

__all__ = ["Generator", "RequestError", "RequestOutput", "StreamEvent"]


class Generator:
    """The synchronous front of an EngineCore (its one Scheduler, page table and backend).

    While a `stream` runs it claims the core, so an AsyncEngine cannot drive it at the same time
    (EngineBusyError), and vice versa.
    """

    def __init__(self, core: EngineCore | Backend, tokenizer: Tokenizer | None = None,
                 config: SchedulerConfig | None = None) -> None:
        """core: the engine to drive; or a Backend and its Tokenizer (and SchedulerConfig), for
        which a new EngineCore is made (one per backend: do not make two on one backend)."""
        if not isinstance(core, EngineCore):
            if tokenizer is None:
                raise TypeError("Generator(backend, tokenizer): the tokenizer is missing")
            core = EngineCore(core, tokenizer, config)
        elif tokenizer is not None or config is not None:
            raise TypeError("Generator(core) takes no tokenizer or config: the core has them")
        self.core = core
        self.backend = core.backend
        self.tokenizer = core.tokenizer
        self.scheduler = core.scheduler
        self.pages = core.pages
        self.max_seq_len = self.backend.runtime.max_seq_len
        self.vocab_size = self.backend.config.vocab_size

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
        seqs = [sched.make_sequence(i, self.encode_prompt(p, chat), sp, label=f"request {i}")
                for i, (p, sp) in enumerate(zip(prompts, plist))]
        return self._run(seqs)

    def _run(self, seqs: list[SequenceState]) -> Iterator[StreamEvent]:
        sched = self.scheduler
        self.core.claim(self, "generate/stream")
        try:
            for seq in seqs:
                sched.add(seq)
            while any(not m.finished for s in seqs for m in s.group):
                yield from sched.step()
        finally:
            for seq in seqs:  # an abandoned stream still returns its slots and pages
                sched.cancel(seq)
            self.core.release(self)


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
