"""The Generator: admits requests into batch slots, prefills them, runs batched decode, stops and
streams.

Scheduling: a request is admitted as soon as a slot is free and the KV pool has pages for its whole
budget (prompt + max_new_tokens, capped at the sequence limit); it is prefilled on its own, then
joins the batched decode of every other active request, each at its own position. A finished request
frees its slot and pages at once, so the next waiting request can start while the others keep
decoding. A request whose budget can never fit is refused up front with a clear error; one that does
not fit yet waits.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from llm.backends.base import Backend, DecodeInput, PrefillInput, SequenceSampling
from llm.paged_kv import OutOfPagesError, PageTable, PageTableSpec
from llm.sampling import SamplingParams, resolve_seed
from llm.tokenizer import IncrementalDecoder, Tokenizer


class RequestError(ValueError):
    """A request that cannot be run as given (empty or too long prompt, bad token ids)."""


@dataclass
class RequestOutput:
    """The result of one request. finish_reason: "stop" (EOS, stop token or string) or "length"."""

    index: int
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    ttft_s: float = 0.0
    decode_tok_s: float = 0.0


@dataclass(frozen=True)
class StreamEvent:
    """New text of one request; `finished` is True on its last event, which carries `output`."""

    index: int
    text: str
    finished: bool = False
    output: RequestOutput | None = None


@dataclass
class _Request:
    out: RequestOutput
    params: SamplingParams
    sampling: SequenceSampling
    budget: int  # positions reserved: prompt + generated tokens
    detok: IncrementalDecoder
    stop_hold: int  # characters held back while they could begin a stop string
    slot: int = -1
    emitted: int = 0  # characters of out.text already streamed
    t_first: float = 0.0
    t_last: float = 0.0

    @property
    def position(self) -> int:
        """Position of the last token (the one the next decode step feeds)."""
        return len(self.out.prompt_token_ids) + len(self.out.token_ids) - 1


class Generator:
    """Runs requests on a Backend with a Tokenizer; one Generator per backend instance."""

    def __init__(self, backend: Backend, tokenizer: Tokenizer) -> None:
        self.backend = backend
        self.tokenizer = tokenizer
        rt = backend.runtime
        self.max_seq_len = rt.max_seq_len
        self.pages = PageTable(PageTableSpec(rt.total_blocks, rt.block_size, rt.blocks_per_seq),
                               rt.max_batch)
        self.vocab_size = backend.config.vocab_size

    def encode_prompt(self, prompt: str | Sequence[int], chat: bool = False) -> list[int]:
        """Text (optionally as one user chat message) or token ids -> token ids."""
        if isinstance(prompt, str):
            if chat:
                text = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
                return self.tokenizer.encode(text, add_special_tokens=False)
            return self.tokenizer.encode(prompt)
        return list(prompt)

    def _make_request(self, index: int, ids: list[int], params: SamplingParams) -> _Request:
        if not ids:
            raise RequestError(f"request {index}: the prompt is empty (it encodes to no tokens)")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise RequestError(
                f"request {index}: token ids {bad[:5]} outside [0, {self.vocab_size})")
        if len(ids) >= self.max_seq_len:
            raise RequestError(
                f"request {index}: prompt has {len(ids)} tokens but the context limit is "
                f"{self.max_seq_len} (max_seq_len) and at least one new token must fit"
            )
        budget = min(len(ids) + params.max_new_tokens, self.max_seq_len)
        if self.pages.blocks_needed(budget) > self.pages.allocator.capacity:
            raise OutOfPagesError(
                f"request {index}: needs {self.pages.blocks_needed(budget)} KV pages for {budget} "
                f"tokens but the pool has only {self.pages.allocator.capacity}"
            )
        return _Request(
            out=RequestOutput(index=index, prompt_token_ids=ids),
            params=params,
            sampling=SequenceSampling(params, resolve_seed(params)),
            budget=budget,
            detok=self.tokenizer.stream(),
            stop_hold=max((len(s) for s in params.stop), default=1) - 1,
        )

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
        reqs = [self._make_request(i, self.encode_prompt(p, chat), sp)
                for i, (p, sp) in enumerate(zip(prompts, plist))]
        t0 = time.perf_counter()
        waiting = deque(reqs)
        free_slots = list(range(self.backend.runtime.max_batch - 1, -1, -1))
        active: dict[int, _Request] = {}
        try:
            while waiting or active:
                while waiting and free_slots and self.pages.can_reserve(waiting[0].budget):
                    req = waiting.popleft()
                    req.slot = free_slots.pop()
                    self.pages.reserve(req.slot, req.budget)
                    active[req.slot] = req
                    token = self.backend.prefill(PrefillInput(
                        req.slot, req.out.prompt_token_ids, 0, self.pages.row(req.slot),
                        req.sampling))
                    yield from self._accept(req, token, t0, active, free_slots)
                if not active:
                    if waiting:  # nothing runs and the head still does not fit: cannot happen
                        raise OutOfPagesError("KV pool cannot hold the next request")
                    break
                slots = list(active)
                batch = [active[s] for s in slots]
                tokens = self.backend.decode(DecodeInput(
                    slots=slots,
                    tokens=[r.out.token_ids[-1] for r in batch],
                    positions=[r.position for r in batch],
                    page_table=self.pages.table(slots),
                    sampling=[r.sampling for r in batch],
                ))
                for req, token in zip(batch, tokens):
                    yield from self._accept(req, token, t0, active, free_slots)
        finally:
            for slot in list(active):  # an abandoned stream still returns its pages
                self.pages.release(slot)

    def _accept(self, req: _Request, token: int, t0: float, active: dict[int, _Request],
                free_slots: list[int]) -> Iterator[StreamEvent]:
        """Record one new token of `req`, apply stop conditions, yield its text delta."""
        now = time.perf_counter()
        out, params = req.out, req.params
        if not out.token_ids:
            req.t_first = now
            out.ttft_s = now - t0
        req.t_last = now
        out.token_ids.append(token)
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids.update(self.tokenizer.eos_ids)
        if token in stop_ids:
            out.text += req.detok.flush()
            out.finish_reason = "stop"
        else:
            out.text += req.detok.add(token)
            hit = _find_stop(out.text, params.stop, max(0, req.emitted - req.stop_hold))
            if hit >= 0:
                out.text = out.text[:hit]
                out.finish_reason = "stop"
            elif len(out.token_ids) >= params.max_new_tokens or (
                    len(out.prompt_token_ids) + len(out.token_ids) >= req.budget):
                out.text += req.detok.flush()
                out.finish_reason = "length"
        if out.finish_reason is None:
            safe = len(out.text) - req.stop_hold
            if safe > req.emitted:
                yield StreamEvent(out.index, out.text[req.emitted:safe])
                req.emitted = safe
            return
        n = len(out.token_ids)
        out.decode_tok_s = (n - 1) / (req.t_last - req.t_first) if n > 1 else 0.0
        del active[req.slot]
        self.pages.release(req.slot)
        free_slots.append(req.slot)
        yield StreamEvent(out.index, out.text[req.emitted:], finished=True, output=out)
        req.emitted = len(out.text)


def _find_stop(text: str, stops: tuple[str, ...], start: int) -> int:
    """Earliest index where any stop string begins in text[start:], or -1."""
    hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(hits) if hits else -1


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
