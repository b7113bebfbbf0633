"""One request in flight: its result so far, its prefill progress, and its stop conditions.

A `Sequence` is created (validated) by the Scheduler and lives until it finishes or is cancelled.
`accept` records each new token, applies the stop conditions (EOS / stop token, stop string, a
structured output's grammar complete, max_new_tokens, the sequence budget) and returns the text
delta to stream, holding back text that could still turn out to be the beginning of a stop string.

A request with n > 1 (or best_of) is a group of Sequences over one prompt: the first (the parent)
prefills it, the others (its `children`) start from its pages and last logits. The request ends
when every member has: its final event carries the chosen outputs (`RequestOutput.choices`).
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field

from llm.engine.bad_words import BadWords
from llm.engine.contract.backend import SequenceSampling
from llm.engine.contract.outputs import TokenLogprobs
from llm.engine.contract.sampling_params import SamplingParams
from llm.engine.grammar import GrammarMatcher
from llm.model.tokenizer.detokenizer import IncrementalDecoder


class RequestError(ValueError):
    """A request that cannot be run as given (empty or too long prompt, bad token ids)."""


@dataclass
class RequestOutput:
    """The result of one request.

    finish_reason: "stop" (EOS, stop token or string), "length", "cancelled", or "error": the
    request failed on its own while it ran (its structured-output grammar failed, see
    `llm.engine.grammar.GrammarError`); `error` then says why, and which parameter.
    stop_reason (vLLM's): with finish_reason "stop", the stop string that ended the output, or
    the token id of stop_token_ids; None otherwise (EOS, a complete grammar, another reason).
    logprobs: one TokenLogprobs per generated token when SamplingParams.logprobs was set, else None;
    where a stop string cut the text, the tokens that start in the cut part have none (the entries
    match the text; token_ids keep every generated token): theirs are in cut_logprobs.
    prompt_logprobs: one per prompt token (None for the first, which has no context) when
    SamplingParams.prompt_logprobs was set, else None. cached_tokens: leading prompt tokens whose
    K/V came from the prefix cache (not computed for this request). choice: this sequence's index
    among the request's choices. cumulative_logprob: the sum of its tokens' logprobs, where they
    were computed (logprobs asked for, or best_of). choices: on the output a request with n > 1 or
    best_of returns, its n choices, best first for best_of (this output is the first of them); None
    otherwise. sequence: its index among the request's n (or best_of) sequences, the `choice` of its
    StreamEvents; equal to `choice` except where best_of renumbered the returned choices.
    A stop token's logprobs entry is kept (it is a generated token) although its text is not in
    `text` unless include_stop_str_in_output.
    """

    index: int
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    ttft_s: float = 0.0
    decode_tok_s: float = 0.0
    logprobs: list[TokenLogprobs] | None = None
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    cut_logprobs: list[TokenLogprobs] = field(default_factory=list)
    cached_tokens: int = 0
    choice: int = 0
    cumulative_logprob: float = 0.0
    choices: list[RequestOutput] | None = field(default=None, repr=False, compare=False)
    error: RequestFailure | None = None
    sequence: int = 0


@dataclass(frozen=True)
class RequestFailure:
    """Why a request ended with finish_reason "error": a message, and the request parameter at
    fault (None if none is)."""

    message: str
    param: str | None = None


@dataclass(frozen=True)
class StreamEvent:
    """New text of one request; `finished` is True on its last event, which carries `output`.

    logprobs: those of the tokens generated since the previous event (requests with
    SamplingParams.logprobs; empty otherwise). token_ids: the ids of the tokens generated since
    this sequence's previous event (over its events, every generated token once, the stop
    token included, as in RequestOutput.token_ids; not aligned with the event's text, whose end
    can be held back while it may begin a stop string). choice: the sequence of the request
    this text is of (n > 1; its RequestOutput.sequence, which best_of's returned choices keep);
    choice_finish, choice_stop: its finish_reason and stop_reason (RequestOutput's) when this
    event ends it (with n > 1 the request ends, `finished`, when its last sequence does).
    """

    index: int
    text: str
    finished: bool = False
    output: RequestOutput | None = None
    logprobs: tuple[TokenLogprobs, ...] = ()
    choice: int = 0
    choice_finish: str | None = None
    choice_stop: int | str | None = None
    token_ids: tuple[int, ...] = ()


@dataclass
class Sequence:
    """Scheduler-side state of one request (see module docstring)."""

    out: RequestOutput
    params: SamplingParams
    sampling: SequenceSampling
    budget: int  # positions reserved: prompt + generated tokens
    detok: IncrementalDecoder
    stop_ids: frozenset[int]
    eos: frozenset[int] = frozenset()  # the model's EOS ids (a stop ends with no stop_reason)
    arrival: float = field(default_factory=time.perf_counter)
    slot: int = -1
    prefilled: int = 0  # prompt tokens whose K/V are in the cache
    page_keys: list[bytes] | None = None  # prefix-cache keys of the prompt's full pages
    packed_prompt: bytes | None = None  # the prompt as native int64s, where make_sequence has it
    registered: int = 0  # leading pages of this request that are in the prefix cache
    emitted: int = 0  # characters of out.text already streamed
    logprobs_emitted: int = 0  # entries of out.logprobs already streamed
    tokens_emitted: int = 0  # entries of out.token_ids already streamed
    starts: list[int] = field(default_factory=list)  # len(out.text) before each token's text
    stop_floor: int = 0  # characters of out.text before min_tokens: no stop string ends there
    t_first: float = 0.0
    t_last: float = 0.0
    # with structured output or bad words: advanced by each token, it makes the token masks
    grammar: GrammarMatcher | BadWords | None = None
    parent: Sequence | None = None  # n > 1: the sequence that prefills the shared prompt
    children: list[Sequence] = field(default_factory=list)  # ... and the others, on the parent

    @property
    def index(self) -> int:
        return self.out.index

    @property
    def group(self) -> list[Sequence]:
        """Every sequence of this request, the parent first."""
        head = self.parent or self
        return [head, *head.children]

    @property
    def prompt_len(self) -> int:
        return len(self.out.prompt_token_ids)

    @property
    def prompt_done(self) -> bool:
        return self.prefilled == self.prompt_len

    @property
    def finished(self) -> bool:
        return self.out.finish_reason is not None

    @property
    def position(self) -> int:
        """Position of the last token (the one the next decode step feeds)."""
        return self.prompt_len + len(self.out.token_ids) - 1

    @property
    def stop_hold(self) -> int:
        """Characters held back while they could begin a stop string."""
        return max((len(s) for s in self.params.stop), default=1) - 1

    def accept(self, token: int, now: float,
               logprobs: TokenLogprobs | None = None) -> StreamEvent | None:
        """Record one new token (and its logprobs, if the request asked for them); return its
        text delta (None if nothing is ready to stream)."""
        out, params = self.out, self.params
        if not out.token_ids:
            self.t_first = now
            out.ttft_s = now - self.arrival
        self.t_last = now
        out.token_ids.append(token)
        self.starts.append(len(out.text))
        if logprobs is not None:
            out.cumulative_logprob += logprobs.logprob
        if out.logprobs is not None:  # the request asked for them (see Scheduler.make_sequence)
            if logprobs is None or logprobs.token != token:
                raise RuntimeError(f"the backend returned no logprobs for token {token}")
            out.logprobs.append(logprobs)
        if self.grammar is not None:
            self.grammar.consume(token)
        if token in self.stop_ids:
            if params.include_stop_str_in_output:
                out.text += self.detok.add(token)
            out.text += self.detok.flush()
            out.finish_reason = "stop"
            if token in params.stop_token_ids and (params.ignore_eos or token not in self.eos):
                out.stop_reason = token  # (EOS first, as vLLM checks it)
        else:
            out.text += self.detok.add(token)
            hit = -1
            if len(out.token_ids) < params.min_tokens:  # no stop string ends it before then
                self.stop_floor = len(out.text)
            else:
                hit, size = _find_stop(out.text, params.stop,
                                       max(0, self.emitted - self.stop_hold), self.stop_floor)
            if hit >= 0:
                cut = hit + (size if params.include_stop_str_in_output else 0)
                out.stop_reason = out.text[hit:hit + size]
                out.text = out.text[:cut]
                if out.logprobs is not None:  # none for the tokens wholly in the cut part
                    first_cut = bisect.bisect_left(self.starts, cut)
                    out.cut_logprobs = out.logprobs[first_cut:]
                    del out.logprobs[first_cut:]
                out.finish_reason = "stop"
            elif self.grammar is not None and self.grammar.stopped:  # complete: nothing may follow
                out.text += self.detok.flush()
                out.finish_reason = "stop"
            elif len(out.token_ids) >= params.max_new_tokens or (
                    self.prompt_len + len(out.token_ids) >= self.budget):
                out.text += self.detok.flush()
                out.finish_reason = "length"
        if out.finish_reason is not None:
            return self.final_event()
        safe = len(out.text) - self.stop_hold
        if safe <= self.emitted:
            return None
        event = StreamEvent(out.index, out.text[self.emitted:safe],
                            logprobs=self._new_logprobs(safe), choice=out.choice,
                            token_ids=self._new_tokens())
        self.emitted = safe
        return event

    def _new_logprobs(self, upto: int | None = None) -> tuple[TokenLogprobs, ...]:
        """The logprobs not streamed yet of the tokens whose text starts before character `upto`
        of out.text (None: all), as the text streamed so far (held-back text's tokens wait)."""
        done = self.out.logprobs or []
        end = len(done) if upto is None else min(len(done), bisect.bisect_left(self.starts, upto))
        new = tuple(done[self.logprobs_emitted:end])
        self.logprobs_emitted = max(self.logprobs_emitted, end)
        return new

    def _new_tokens(self) -> tuple[int, ...]:
        """The ids of the tokens generated since the previous event."""
        new = tuple(self.out.token_ids[self.tokens_emitted:])
        self.tokens_emitted += len(new)
        return new

    def cancel(self) -> list[StreamEvent]:
        """Mark the request (each of its sequences still running) cancelled; the final event of
        each of those, with what it had not streamed yet (the last one ends the request)."""
        return self._end("cancelled")

    def fail(self, failure: RequestFailure) -> list[StreamEvent]:
        """End the request (each of its sequences still running) with finish_reason "error" and
        `failure`; the final events, as `cancel`."""
        return self._end("error", failure)

    def _end(self, reason: str, failure: RequestFailure | None = None) -> list[StreamEvent]:
        if failure is not None:  # the request failed: every choice's output says so, also one
            for s in self.group:  # that had ended (the request's output may be that one)
                s.out.error = failure
        events = []
        for s in self.group:  # one at a time: only the last one's event ends the request
            if not s.finished:
                s.out.finish_reason = reason
                events.append(s.final_event())
        return events

    def final_event(self) -> StreamEvent:
        """The last event of this sequence; it ends the request if no other sequence of the
        request is still running (then with the request's output)."""
        out = self.out
        n = len(out.token_ids)
        span = self.t_last - self.t_first
        out.decode_tok_s = (n - 1) / span if n > 1 and span > 0 else 0.0
        group = self.group
        done = all(s.finished for s in group)
        text, choice, logprobs = out.text[self.emitted:], out.choice, self._new_logprobs()
        # (read first: with best_of, _chosen numbers the returned outputs' choices anew)
        event = StreamEvent(out.index, text, finished=done,
                            output=_chosen(group, self.params) if done else None,
                            logprobs=logprobs, choice=choice, choice_finish=out.finish_reason,
                            choice_stop=out.stop_reason,
                            token_ids=self._new_tokens())
        self.emitted = len(out.text)
        return event


def _chosen(group: list[Sequence], params: SamplingParams) -> RequestOutput:
    """The output a finished request returns: its only sequence's; with n > 1 or best_of, the
    first of its n choices (best_of: the n of highest cumulative logprob, best first; renumbered
    0..n-1), all in `choices`."""
    if len(group) == 1:
        return group[0].out
    outs = [s.out for s in group]
    if params.best_of is not None and params.best_of > params.n:
        outs = sorted(outs, key=lambda o: -o.cumulative_logprob)[:params.n]
        for i, o in enumerate(outs):
            o.choice = i
    outs[0].choices = outs
    return outs[0]


def _find_stop(text: str, stops: tuple[str, ...], start: int,
               floor: int = 0) -> tuple[int, int]:
    """(the earliest index where a stop string begins in text[start:] and ends after
    text[:floor], the length of the first such stop of the list there), or (-1, 0)."""
    at, size = -1, 0
    for s in stops:
        i = text.find(s, max(start, floor - len(s) + 1))
        if i >= 0 and (at < 0 or i < at):
            at, size = i, len(s)
    return at, size
