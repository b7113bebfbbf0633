"""What a backend step returns besides tokens: log probabilities, one `TokenLogprobs` per token."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class TokenLogprobs:
    """The log probability of one token and the most likely alternatives at its position.

    token: the token id; logprob: its log probability; top: (token id, logprob) pairs of the
    most likely tokens, best first (as many as the request asked for, possibly 0). rank (prompt
    logprobs): how many tokens of the vocabulary have a log probability >= the token's (1: the
    most likely; vLLM's rank, ties counted against it); None where not computed (generated
    tokens).
    """

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()
    rank: int | None = None


@dataclass(frozen=True)
class StepOutput:
    """One prefill or decode call's result.

    tokens: [B] the next token of each user (prefill: B = 1). logprobs: [B] each token's
    TokenLogprobs where its request asked for them (None for the others; None as a whole when no
    request did). prompt_logprobs (prefill with PrefillInput.targets): the TokenLogprobs of each
    target token, in order.
    """

    tokens: Sequence[int]
    logprobs: Sequence[TokenLogprobs | None] | None = None
    prompt_logprobs: Sequence[TokenLogprobs] | None = None
