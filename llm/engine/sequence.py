"""One request in flight: its result so far, its prefill progress, and its stop conditions.

A `Sequence` is created (validated) by the Scheduler and lives until it finishes or is cancelled.
`accept` records each new token, applies the stop conditions (EOS / stop token, stop string,
max_new_tokens, the sequence budget) and returns the text delta to stream, holding back text that
could still turn out to be the beginning of a stop string.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from llm.engine.contract.backend import SequenceSampling
from llm.engine.contract.outputs import TokenLogprobs
from llm.engine.contract.sampling_params import SamplingParams
from llm.model.tokenizer.detokenizer import IncrementalDecoder


class RequestError(ValueError):
    """A request that cannot be run as given (empty or too long prompt, bad token ids)."""


@dataclass
class RequestOutput:
    """The result of one request.

    finish_reason: "stop" (EOS, stop token or string), "length", or "cancelled".
    logprobs: one TokenLogprobs per generated token when SamplingParams.logprobs was set, else
    None. prompt_logprobs: one per prompt token (None for the first, which has no context) when
    SamplingParams.prompt_logprobs was set, else None. cached_tokens: leading prompt tokens whose
    K/V came from the prefix cache (not computed for this request).
    """

    index: int
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    ttft_s: float = 0.0
    decode_tok_s: float = 0.0
    logprobs: list[TokenLogprobs] | None = None
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    cached_tokens: int = 0


@dataclass(frozen=True)
class StreamEvent:
    """New text of one request; `finished` is True on its last event, which carries `output`.

    logprobs: those of the tokens generated since the previous event (requests with
    SamplingParams.logprobs; empty otherwise).
    """

    index: int
    text: str
    finished: bool = False
    output: RequestOutput | None = None
    logprobs: tuple[TokenLogprobs, ...] = ()


@dataclass
class Sequence:
    """Scheduler-side state of one request (see module docstring)."""

    out: RequestOutput
    params: SamplingParams
    sampling: SequenceSampling
    budget: int  # positions reserved: prompt + generated tokens
    detok: IncrementalDecoder
    stop_ids: frozenset[int]
    arrival: float = field(default_factory=time.perf_counter)
    slot: int = -1
    prefilled: int = 0  # prompt tokens whose K/V are in the cache
    page_keys: list[bytes] | None = None  # prefix-cache keys of the prompt's full pages
    registered: int = 0  # leading pages of this request that are in the prefix cache
    emitted: int = 0  # characters of out.text already streamed
    logprobs_emitted: int = 0  # entries of out.logprobs already streamed
    stop_floor: int = 0  # characters of out.text before min_tokens: no stop string ends there
    t_first: float = 0.0
    t_last: float = 0.0

    @property
    def index(self) -> int:
        return self.out.index

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
        if out.logprobs is not None:  # the request asked for them (see Scheduler.make_sequence)
            if logprobs is None or logprobs.token != token:
                raise RuntimeError(f"the backend returned no logprobs for token {token}")
            out.logprobs.append(logprobs)
        if token in self.stop_ids:
            out.text += self.detok.flush()
            out.finish_reason = "stop"
        else:
            out.text += self.detok.add(token)
            hit = -1
            if len(out.token_ids) < params.min_tokens:  # no stop string ends it before then
                self.stop_floor = len(out.text)
            else:
                hit = _find_stop(out.text, params.stop, max(0, self.emitted - self.stop_hold),
                                 self.stop_floor)
            if hit >= 0:
                out.text = out.text[:hit]
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
        event = StreamEvent(out.index, out.text[self.emitted:safe], logprobs=self._new_logprobs())
        self.emitted = safe
        return event

    def _new_logprobs(self) -> tuple[TokenLogprobs, ...]:
        done = self.out.logprobs or []
        new = tuple(done[self.logprobs_emitted:])
        self.logprobs_emitted = len(done)
        return new

    def cancel(self) -> StreamEvent:
        """Mark the request cancelled and return its final event (text not yet streamed)."""
        self.out.finish_reason = "cancelled"
        return self.final_event()

    def final_event(self) -> StreamEvent:
        out = self.out
        n = len(out.token_ids)
        span = self.t_last - self.t_first
        out.decode_tok_s = (n - 1) / span if n > 1 and span > 0 else 0.0
        event = StreamEvent(out.index, out.text[self.emitted:], finished=True, output=out,
                            logprobs=self._new_logprobs())
        self.emitted = len(out.text)
        return event


def _find_stop(text: str, stops: tuple[str, ...], start: int, floor: int = 0) -> int:
    """Earliest index where any stop string begins in text[start:] and ends after text[:floor],
    or -1."""
    hits = [i for i in (text.find(s, max(start, floor - len(s) + 1)) for s in stops) if i >= 0]
    return min(hits) if hits else -1
