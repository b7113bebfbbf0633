"""vLLM's bad_words: words the output may not contain, as token masks on each step.

A word is banned as the token sequences it encodes to, alone and after a space (so at the start of
the text and inside it), as vLLM derives them: at each step the last token of a sequence is masked
where the output so far ends with the rest of that sequence (a one-token sequence: always). Only
the output's own tokens count, not the prompt's.

`BadWords` follows one sequence's output and writes its masks the way a structured-output grammar
does (`GrammarMatcher`: consume, stopped, fill), so that the scheduler's token masks carry both:
with a grammar too, it narrows the grammar's mask.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import numpy as np

from llm.engine.grammar import GrammarError, GrammarMatcher
from llm.model.tokenizer.tokenizer import Tokenizer

PARAM = "bad_words"


def banned_sequences(tokenizer: Tokenizer, words: Sequence[str]) -> tuple[tuple[int, ...], ...]:
    """The token sequences of `words`: each word as encoded alone, and after a space where that
    gives other tokens of the same count (vLLM's rule: the word inside a text)."""
    out: list[tuple[int, ...]] = []
    for word in words:
        alone = tuple(tokenizer.encode(word.lstrip(), add_special_tokens=False))
        if alone:
            out.append(alone)
        spaced = tuple(tokenizer.encode(" " + word.lstrip(), add_special_tokens=False))
        if spaced and (not alone or (spaced[0] != alone[0] and len(spaced) == len(alone))):
            out.append(spaced)
    return tuple(dict.fromkeys(out))  # without repeats, in order


class BadWords:
    """The bad-words masks of one sequence (see module docstring); `grammar`: its structured-
    output matcher, if any, whose masks these narrow."""

    def __init__(self, sequences: tuple[tuple[int, ...], ...],
                 grammar: GrammarMatcher | None = None) -> None:
        self.grammar = grammar
        self.always = sorted({s[0] for s in sequences if len(s) == 1})
        self.longer = [s for s in sequences if len(s) > 1]
        longest = max((len(s) for s in self.longer), default=1)
        self.tail: deque[int] = deque(maxlen=longest - 1)  # the output's last tokens

    def banned(self) -> list[int]:
        """The token ids masked at the next step."""
        tail = tuple(self.tail)
        out = list(self.always)
        for s in self.longer:
            n = len(s) - 1
            if len(tail) >= n and tail[len(tail) - n:] == s[:-1]:
                out.append(s[-1])
        return out

    def consume(self, token: int) -> None:
        """Advance by one output token; GrammarError if it was masked (the backend did not apply
        the mask) or the grammar refuses it."""
        if token in self.banned():
            raise GrammarError(f"{PARAM}: output token {token} completes a banned word (the "
                               "backend did not apply its mask)", PARAM)
        if self.grammar is not None:
            self.grammar.consume(token)
        self.tail.append(token)

    @property
    def stopped(self) -> bool:
        """True when the grammar (if any) is complete; bad words never end the output."""
        return self.grammar is not None and self.grammar.stopped

    def fill(self, row: np.ndarray) -> None:
        """Write the allowed-token bitmask of the next token into `row` [words] int32."""
        if self.grammar is not None:
            self.grammar.fill(row)
        else:
            row[:] = -1
        bits = row.view(np.uint32)
        for t in self.banned():
            bits[t // 32] &= np.uint32(~(1 << (t % 32)) & 0xFFFFFFFF)
