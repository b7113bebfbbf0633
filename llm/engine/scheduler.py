"""The continuous-batching scheduler: one `step()` at a time, driven by one thread.

Each step (tech report section 3.4, with chunked prefill):

1. admit: move waiting requests (FIFO) into free batch slots while the KV pool has pages for the
   head's whole budget (prompt + max_new_tokens, capped at max_seq_len); a request that does not fit
   yet waits, so running out of pages mid-decode cannot happen. With the prefix cache, a request
   starts with the cached pages of its prompt's leading chunks (shared, costing no new page) and
   its prefill starts after them (llm.engine.prefix_cache says which pages and why);
2. prefill: run at most `prefill_chunk` prompt tokens, in chunks that start at multiples of
   `prefill_chunk` (so a prompt is split the same way whatever else is running); a long prompt is
   thus prefilled over several steps and the users already decoding are not stalled; the pages of
   each full chunk are then registered in the prefix cache;
3. decode: one batched decode step for every user whose prompt is done.

A request with n > 1 (or best_of) is admitted as a group of sequences in as many slots: the first
prefills the prompt; the others hold its full prompt pages (shared) and pages of their own, the
first of which receives a copy of the prompt's last partial page (`Backend.copy_pages`, copy on
write) when the prompt is done; all pick their first tokens from the prompt's last logits.

A finished or cancelled request frees its slot and drops its hold on its pages at once (cached
ones stay reusable until the pool needs them); the next waiting request is admitted in the
following step while the others keep decoding.
"""

from __future__ import annotations

import dataclasses
import struct
import time
from collections import deque
from collections.abc import Callable, Iterator
from collections.abc import Sequence as Sequence_
from concurrent.futures import wait
from contextlib import contextmanager
from dataclasses import dataclass

from llm.engine.bad_words import BadWords, banned_sequences
from llm.engine.contract.backend import Backend, DecodeInput, Fork, PrefillInput, SequenceSampling
from llm.engine.contract.outputs import TokenLogprobs
from llm.engine.contract.sampling_params import (
    SamplingParams,
    SamplingParamsError,
    choice_seed,
    resolve_seed,
)
from llm.engine.contract.structured import TokenMasks
from llm.engine.grammar import GrammarError, GrammarMatcher, Grammars
from llm.engine.metrics import ServingMetrics
from llm.engine.paged_kv import OutOfPagesError, PageTable
from llm.engine.prefix_cache import PrefixCache
from llm.engine.sequence import (
    RequestError,
    RequestFailure,
    RequestOutput,
    Sequence,
    StreamEvent,
)
from llm.model.tokenizer.tokenizer import Tokenizer


class QueueFullError(RuntimeError):
    """The scheduler already holds as many requests as its configuration allows."""


@dataclass(frozen=True)
class SchedulerConfig:
    """Limits of one scheduler.

    max_active: batch slots used (None: the backend's max_batch). max_queue: requests allowed to
    wait beyond the active ones (None: unbounded). prefill_chunk: prompt tokens per prefill call
    and per step. prefix_cache: reuse the KV pages of prompt prefixes computed by earlier requests
    (outputs are bit-identical either way; see llm.engine.prefix_cache).
    """

    max_active: int | None = None
    max_queue: int | None = None
    prefill_chunk: int = 256
    prefix_cache: bool = True

    def __post_init__(self) -> None:
        _check_limit("max_active", self.max_active, lo=1, optional=True)
        _check_limit("max_queue", self.max_queue, lo=0, optional=True)
        _check_limit("prefill_chunk", self.prefill_chunk, lo=1, optional=False)
        if not isinstance(self.prefix_cache, bool):
            raise ValueError(f"prefix_cache must be True or False, got {self.prefix_cache!r}")


def _check_limit(name: str, value: object, lo: int, optional: bool) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")


class Scheduler:
    """Continuous batching of Sequences over one Backend and one PageTable (not thread-safe)."""

    def __init__(self, backend: Backend, tokenizer: Tokenizer, pages: PageTable,
                 config: SchedulerConfig | None = None,
                 metrics: ServingMetrics | None = None) -> None:
        self.backend = backend
        self.tokenizer = tokenizer
        self.pages = pages
        rt = backend.runtime
        self.max_seq_len = rt.max_seq_len
        self.vocab_size = backend.config.vocab_size
        self.capabilities = backend.capabilities
        self.waiting: deque[Sequence] = deque()
        self.active: dict[int, Sequence] = {}  # slot -> sequence, in admission order
        self._eos = frozenset(tokenizer.eos_ids)
        self.grammars = Grammars(tokenizer, self.vocab_size)  # structured output's matchers
        self.config, self.metrics = SchedulerConfig(), None
        self.configure(config or SchedulerConfig(), metrics)

    def configure(self, config: SchedulerConfig, metrics: ServingMetrics | None = None
                  ) -> tuple[SchedulerConfig, ServingMetrics | None]:
        """Set the limits and metrics (only while no request is held; the prefix cache is
        emptied); returns the previous."""
        if self.has_work:
            raise RuntimeError("the scheduler can be reconfigured only while it holds no request")
        previous = (self.config, self.metrics)
        self.config = config
        self.metrics = metrics
        self.pages.allocator.clear_cache()
        self.prefix = PrefixCache(self.pages, config.prefill_chunk) if config.prefix_cache else None
        self.max_active = min(config.max_active or self.backend.runtime.max_batch,
                              self.backend.runtime.max_batch)
        self._free_slots = list(range(self.max_active - 1, -1, -1))
        return previous

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.active)

    @property
    def running_requests(self) -> int:
        """Requests with a sequence in a batch slot (a request with n > 1 holds several)."""
        return len({s.index for s in self.active.values()})

    @property
    def capacity(self) -> int | None:
        """Requests the scheduler may hold at once (active + waiting), None if unbounded."""
        q = self.config.max_queue
        return None if q is None else self.max_active + q

    def make_sequence(self, index: int, ids: list[int], params: SamplingParams,
                      label: str | None = None) -> Sequence:
        """Validate one request (prompt token ids + parameters) and build its Sequence. label:
        how errors name the request to its sender (e.g. "request 2" for the third prompt of a
        `generate` call); None names none (a server's internal index means nothing to a client)."""
        self.capabilities.check(params, self.backend.name)  # SamplingParamsError naming the param
        at = f"{label}: " if label else ""
        if not ids:
            raise RequestError(f"{at}the prompt is empty (it encodes to no tokens)")
        packed = _packed(ids, self.vocab_size)
        bad = [] if packed is not None else [
            t for t in ids
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size]
        if bad:
            raise RequestError(
                f"{at}token ids {bad[:5]} outside [0, {self.vocab_size})")
        if len(ids) >= self.max_seq_len:
            raise RequestError(
                f"{at}the prompt has {len(ids)} tokens but the context limit is "
                f"{self.max_seq_len} (max_seq_len) and at least one new token must fit"
            )
        budget = min(len(ids) + params.max_new_tokens, self.max_seq_len)
        m = params.num_sequences
        name = "best_of" if params.best_of is not None else "n"
        if m > self.max_active:
            raise SamplingParamsError(f"{at}{name}={m} sequences run in {m} batch slots at once "
                                      f"but this engine runs {self.max_active}", param=name)
        need = self._group_pages(len(ids), budget, m)
        if need > self.pages.allocator.capacity:
            raise OutOfPagesError(
                f"{at}needs {need} KV pages for {m} x {budget} tokens but the pool has only "
                f"{self.pages.allocator.capacity}")
        checked = (("logit_bias", "logit_bias keys", [t for t, _ in params.logit_bias]),
                   ("allowed_token_ids", "allowed_token_ids", params.allowed_token_ids),
                   ("stop_token_ids", "stop_token_ids", params.stop_token_ids))
        for param, what, listed in checked:  # every id must be one of the vocabulary's
            bad = [t for t in listed if t >= self.vocab_size]
            if bad:
                raise SamplingParamsError(f"{at}{what} {bad[:5]} are not token ids of this "
                                          f"model's vocabulary [0, {self.vocab_size})",
                                          param=param)
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids.update(self._eos)
        banned = self._banned(params, stop_ids, at)
        # best_of ranks sequences by cumulative logprob: the backend computes them for all
        computed = params
        if params.best_of is not None and params.best_of > params.n and params.logprobs is None:
            computed = dataclasses.replace(params, logprobs=0)
        seed = resolve_seed(params)
        prompt_logprobs = None if params.prompt_logprobs is None else [None]  # none for token 0
        seqs = []
        for choice in range(m):
            out = RequestOutput(index=index, prompt_token_ids=list(ids), choice=choice,
                                prompt_logprobs=prompt_logprobs,  # one list: the parent fills it
                                sequence=choice)
            if params.logprobs is not None:
                out.logprobs = []
            seqs.append(Sequence(
                out=out, params=params,
                sampling=SequenceSampling(computed, choice_seed(seed, choice),
                                          tuple(sorted(stop_ids))),
                budget=budget, stop_ids=frozenset(stop_ids), eos=self._eos,
                detok=self.tokenizer.stream(skip_special_tokens=params.skip_special_tokens),
                parent=seqs[0] if seqs else None,
                grammar=self._matcher(params, banned)))  # each its own state
        seqs[0].children = seqs[1:]
        seqs[0].packed_prompt = packed
        return seqs[0]

    def _banned(self, params: SamplingParams, stop_ids: set[int], at: str
                ) -> tuple[tuple[int, ...], ...]:
        """The bad words' token sequences this model can produce (ids in its vocabulary);
        SamplingParamsError where allowed_token_ids leaves nothing to choose: only stop ids that
        min_tokens masks, or only one-token banned words."""
        allowed = set(params.allowed_token_ids)
        if params.min_tokens and allowed and allowed <= stop_ids:
            raise SamplingParamsError(f"{at}allowed_token_ids holds only stop tokens, which "
                                      f"min_tokens={params.min_tokens} masks: no token could be "
                                      "chosen", param="allowed_token_ids")
        banned = tuple(s for s in banned_sequences(self.tokenizer, params.bad_words)
                       if max(s) < self.vocab_size) if params.bad_words else ()
        if allowed and allowed <= {s[0] for s in banned if len(s) == 1}:
            raise SamplingParamsError(f"{at}allowed_token_ids holds only tokens that bad_words "
                                      "bans: no token could be chosen", param="bad_words")
        return banned

    def _matcher(self, params: SamplingParams, banned: tuple[tuple[int, ...], ...]
                 ) -> GrammarMatcher | BadWords | None:
        """A sequence's token-mask state: its structured output's grammar, narrowed by its bad
        words' sequences `banned` (None: neither)."""
        grammar = None if params.structured is None else self.grammars.matcher(params.structured)
        return BadWords(banned, grammar) if banned else grammar

    def _group_pages(self, prompt_len: int, budget: int, m: int) -> int:
        """Pages a request of m sequences takes: the parent's budget, and each other sequence's
        beyond the prompt's full pages (which it shares with the parent)."""
        per = self.pages.blocks_needed(budget)
        return per + (m - 1) * (per - prompt_len // self.pages.spec.block_size)

    def add(self, seq: Sequence) -> None:
        """Queue a validated Sequence; QueueFullError if the configured limit is reached."""
        cap = self.capacity
        running = self.running_requests
        if cap is not None and len(self.waiting) + running >= cap:
            raise QueueFullError(
                f"the server is at capacity ({running} requests running, {len(self.waiting)} "
                f"waiting); retry later")
        self.waiting.append(seq)

    def cancel(self, seq: Sequence) -> list[StreamEvent]:
        """Drop the request of `seq` (every sequence of it) wherever it is, freeing its slots
        and pages; the final events of its sequences still running (`Sequence.cancel`: the
        last one ends the request), none if it had already finished.
        """
        group = seq.group
        if all(s.finished for s in group):
            return []
        if not self._retire_group(seq):
            if group[0] not in self.waiting:
                return []
            self.waiting.remove(group[0])
        events = seq.cancel()  # cancels every one left
        if self.metrics is not None:
            self.metrics.on_finish("cancelled")
        return events

    def step(self) -> list[StreamEvent]:
        """One scheduling iteration (admit, one prefill budget, one decode step); its events."""
        return [ev for events in self.step_phases() for ev in events]

    def step_phases(self, launched: Callable[[], None] | None = None
                    ) -> Iterator[list[StreamEvent]]:
        """`step` in two halves: the events of admission + prefill, then those of the decode
        step, so that a caller can stream first tokens before the decode step runs.
        launched: passed to each prefill_step of the step (see the backend contract): called
        as each prefill chunk's device work is enqueued.
        """
        self._admit()
        events: list[StreamEvent] = []
        self._prefill(events, launched)
        yield events
        events = []
        self._decode(events)
        yield events

    def _admit(self) -> None:
        while self.waiting and len(self._free_slots) >= len(self.waiting[0].group):
            seq = self.waiting[0]
            group = seq.group
            shared = self.prefix.lookup(seq) if self.prefix is not None else []
            extra = self._group_pages(seq.prompt_len, seq.budget, len(group)) - (
                self.pages.blocks_needed(seq.budget))
            if not self.pages.can_reserve(seq.budget, shared, extra):
                break
            self.waiting.popleft()
            for s in group:
                s.slot = self._free_slots.pop()
                self.active[s.slot] = s
            self.pages.reserve(seq.slot, seq.budget, shared)
            prompt_pages = self.pages.pages(seq.slot)[:seq.prompt_len // self.pages.spec.block_size]
            for child in seq.children:
                self.pages.reserve(child.slot, child.budget, prompt_pages)
            seq.registered = len(shared)
            seq.prefilled = seq.out.cached_tokens = len(shared) * self.pages.spec.block_size
            if self.metrics is not None:
                self.metrics.on_prompt(seq.prompt_len, seq.out.cached_tokens)
        if self.waiting and not self.active:
            raise OutOfPagesError(
                f"KV pool cannot hold the next request ({self.waiting[0].budget} tokens, "
                f"{self.pages.allocator.num_free} pages free)")

    def _prefill(self, events: list[StreamEvent], launched: Callable[[], None] | None) -> None:
        chunk = self.config.prefill_chunk
        budget = chunk
        for seq in [s for s in self.active.values() if not s.prompt_done and s.parent is None]:
            while not seq.prompt_done:
                n = min(chunk, seq.prompt_len - seq.prefilled)  # chunks start at k * chunk
                if n > budget and budget < chunk:
                    return
                start = seq.prefilled
                prompt = seq.out.prompt_token_ids
                targets = None
                if seq.out.prompt_logprobs is not None:
                    targets = prompt[start + 1:start + n + 1]
                cached = prompt[:start] if start == seq.out.cached_tokens else ()
                last = start + n == seq.prompt_len
                forks = [Fork(c.slot, c.sampling) for c in seq.children] if last else []
                masks = self.grammars.masks([s.grammar for s in seq.group]) if last else None
                with _joined(masks):
                    result = self.backend.prefill_step(PrefillInput(
                        seq.slot, prompt[start:start + n], start, self.pages.row(seq.slot),
                        seq.sampling, targets, masks, cached, forks, select=last), launched)
                if targets is not None:
                    seq.out.prompt_logprobs.extend(_checked(result.prompt_logprobs, targets))
                seq.prefilled += n
                if self.prefix is not None:
                    self.prefix.register(seq, n)
                budget -= n
                if seq.prompt_done:
                    self._fork(seq)
                    logprobs = result.logprobs or [None] * (1 + len(forks))
                    for s, token, lp in zip(seq.group, result.tokens, logprobs, strict=True):
                        self._accept(s, token, events, lp)
                if budget <= 0:
                    return

    def _fork(self, seq: Sequence) -> None:
        """The prompt of `seq` is done: its other sequences start from it (the prompt's last
        partial page copied into each one's own page)."""
        if not seq.children:
            return
        bs = self.pages.spec.block_size
        if seq.prompt_len % bs:
            src = self.pages.pages(seq.slot)[seq.prompt_len // bs]
            self.backend.copy_pages([(src, self.pages.pages(c.slot)[seq.prompt_len // bs])
                                     for c in seq.children])
        for c in seq.children:
            c.prefilled = c.prompt_len
            c.out.cached_tokens = seq.out.cached_tokens

    def _decode(self, events: list[StreamEvent]) -> None:
        batch = [s for s in self.active.values() if s.prompt_done]
        if not batch:
            return
        slots = [s.slot for s in batch]
        masks = self.grammars.masks([s.grammar for s in batch])  # computed during the forward
        with _joined(masks):
            result = self.backend.decode_step(DecodeInput(
                slots=slots,
                tokens=[s.out.token_ids[-1] for s in batch],
                positions=[s.position for s in batch],
                page_table=self.pages.table(slots),  # [B, max_blocks_per_seq]
                sampling=[s.sampling for s in batch],
                allowed=masks,
            ))
        logprobs = result.logprobs or [None] * len(batch)
        for seq, token, lp in zip(batch, result.tokens, logprobs):
            self._accept(seq, token, events, lp)

    def _accept(self, seq: Sequence, token: int, events: list[StreamEvent],
                logprobs: TokenLogprobs | None = None) -> None:
        if seq.finished:  # its request failed earlier in this step (another of its sequences)
            return
        now = time.perf_counter()
        first = not seq.out.token_ids
        latency = now - (seq.arrival if first else seq.t_last)
        try:
            event = seq.accept(token, now, logprobs)
        except GrammarError as exc:  # this request's own grammar: it alone fails
            events.extend(self._fail(seq, RequestFailure(str(exc), exc.param)))
            return
        if self.metrics is not None:  # a request's TTFT once: its first sequence's
            self.metrics.on_token(None if first and seq.parent is not None else latency, first)
        if seq.finished:
            self._retire(seq)
            if self.metrics is not None and event is not None and event.output is not None:
                # the request ended: its output (the first choice) says why
                self.metrics.on_finish(event.output.finish_reason or "stop")
        if event is not None:
            events.append(event)

    def _fail(self, seq: Sequence, failure: RequestFailure) -> list[StreamEvent]:
        """End the running request of `seq` with `failure`, freeing the slots and pages of all
        its sequences; their final events (`Sequence.fail`)."""
        events = seq.fail(failure)
        self._retire_group(seq)
        if self.metrics is not None:
            self.metrics.on_finish("error")
        return events

    def _retire_group(self, seq: Sequence) -> bool:
        """Retire every sequence of the request of `seq` that holds a batch slot; whether any
        did."""
        active = [s for s in seq.group if s.slot >= 0 and self.active.get(s.slot) is s]
        for s in active:
            self._retire(s)
        return bool(active)

    def _retire(self, seq: Sequence) -> None:
        del self.active[seq.slot]
        self.pages.release(seq.slot)
        self._free_slots.append(seq.slot)


def _packed(ids: Sequence_[int], vocab_size: int) -> bytes | None:
    """The bytes of array("q", ids) if each id is an int (not a bool) in [0, vocab_size), else
    None (the caller then finds the bad ones); the prefix cache hashes its pages from them.
    Packed unsigned, a negative id fails the packing: one max() is left, not min() and max()."""
    if not set(map(type, ids)) <= {int}:
        return None
    try:
        packed = struct.pack(f"{len(ids)}Q", *ids)
    except struct.error:  # negative, or beyond 64 bits
        return None
    return packed if max(ids) < vocab_size else None


@contextmanager
def _joined(masks: TokenMasks | None) -> Iterator[None]:
    """Run a backend step and wait for its masks' worker after it, whatever happened (the
    matchers are advanced only once the worker is done with them)."""
    try:
        yield
    finally:
        if masks is not None:
            wait([masks.future])


def _checked(logprobs: Sequence_[TokenLogprobs] | None,
             targets: list[int]) -> Sequence_[TokenLogprobs]:
    """The prompt logprobs a backend returned for `targets`, checked to be theirs."""
    if logprobs is None or [lp.token for lp in logprobs] != targets:
        raise RuntimeError("the backend returned no prompt logprobs for the chunk's tokens")
    return logprobs
