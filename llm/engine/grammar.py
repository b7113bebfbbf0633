"""Structured output on the engine's side: llguidance matchers and their token masks.

One `Grammars` per scheduler holds llguidance's view of the model's vocabulary (built once, on
the first structured request, from the Tokenizer's token bytes and EOS ids) and a worker thread.
Each structured request gets a `GrammarMatcher`, advanced with every token it accepts. Before a
step the scheduler asks `masks` for the allowed tokens of its constrained users: they are computed
on the worker thread (llguidance releases the GIL) while the backend runs the model, and the
backend joins them just before it selects tokens.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from llm.engine.contract.sampling_params import SamplingParamsError
from llm.engine.contract.structured import StructuredOutput, TokenMasks, llguidance_module
from llm.model.tokenizer.token_bytes import SPECIAL_PREFIX
from llm.model.tokenizer.tokenizer import Tokenizer


class GrammarError(RuntimeError):
    """One request's grammar failed while it generated (a token its matcher rejects, e.g. past
    one of llguidance's parser limits): that request fails, with `param` (its structured-output
    parameter) named; the engine and the other requests go on."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


class GrammarMatcher:
    """Where one request's output stands in its grammar (llguidance's LLMatcher)."""

    def __init__(self, matcher: object, spec: StructuredOutput) -> None:
        self._m = matcher
        self.spec = spec

    def consume(self, token: int) -> None:
        """Advance by one accepted token; GrammarError if the grammar does not take it (its
        matcher failed, e.g. at a parser limit, or the backend did not apply the mask)."""
        if not self._m.consume_token(token):
            error = self._m.get_error()
            raise GrammarError(f"{self.spec.param}: the grammar failed at output token "
                               f"{token}: {error[:300]}{'...' if len(error) > 300 else ''}",
                               self.spec.param)

    @property
    def stopped(self) -> bool:
        """True when the grammar is complete and allows no further token."""
        return self._m.is_stopped()

    def fill(self, row: np.ndarray) -> None:
        """Write the allowed-token bitmask of the next token into `row` [words] int32."""
        if not row.flags["C_CONTIGUOUS"] or row.dtype != np.int32:
            raise ValueError("a mask row must be a contiguous int32 array")
        self._m.unsafe_compute_mask_ptr(row.ctypes.data, row.nbytes)


class Grammars:
    """llguidance over one model's vocabulary of `vocab_size` logits (see module docstring)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.words = (vocab_size + 31) // 32  # int32 words per mask row
        self._lltokenizer = None
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self.stats = {"masks": 0, "mask_s": 0.0}  # rows computed, seconds spent on the worker

    def _vocabulary(self, param: str) -> object:
        """llguidance's tokenizer of this model, built on first use (~0.5 s for 49k tokens)."""
        with self._lock:
            if self._lltokenizer is None:
                llg = llguidance_module(param)
                tok = self._tokenizer
                tokens = list(tok.token_bytes()[:self.vocab_size])
                tokens += [b""] * (self.vocab_size - len(tokens))  # logits past the vocabulary
                eos = [i for i in tok.eos_ids if i < self.vocab_size]
                if not eos:
                    raise SamplingParamsError(f"{param}: structured output needs an EOS token; "
                                              "this model's tokenizer has none", param=param)
                wrapper = _Vocabulary(tok, tokens, eos[0])
                self._lltokenizer = llg.LLTokenizer(llg.TokenizerWrapper(wrapper),
                                                    n_vocab=self.vocab_size, eos_token=eos)
            return self._lltokenizer

    def matcher(self, spec: StructuredOutput) -> GrammarMatcher:
        """A fresh matcher for one request; SamplingParamsError naming spec.param if the grammar
        does not compile against this vocabulary."""
        llg = llguidance_module(spec.param)
        m = llg.LLMatcher(self._vocabulary(spec.param), spec.llguidance_grammar(), log_level=0)
        if m.is_error():
            raise SamplingParamsError(f"{spec.param}: {m.get_error()}", param=spec.param)
        return GrammarMatcher(m, spec)

    def masks(self, matchers: Sequence[GrammarMatcher | None]) -> TokenMasks | None:
        """Start computing the masks of the rows of a step with a matcher (None: no row has one);
        the result resolves on the worker thread."""
        rows = tuple(i for i, m in enumerate(matchers) if m is not None)
        if not rows:
            return None
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llm-grammar")
        chosen = [matchers[i] for i in rows]
        return TokenMasks(rows, self._pool.submit(self._fill, chosen))

    def _fill(self, matchers: list[GrammarMatcher]) -> np.ndarray:
        t0 = time.perf_counter()
        bits = np.zeros((len(matchers), self.words), dtype=np.int32)  # [R, words]
        for row, m in zip(bits, matchers):
            m.fill(row)
        self.stats["masks"] += len(matchers)
        self.stats["mask_s"] += time.perf_counter() - t0
        return bits

    def close(self) -> None:
        """Stop the worker thread (a later structured request starts a new one)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


class _Vocabulary:
    """What llguidance's TokenizerWrapper reads: token bytes, EOS / BOS ids, special ids, and
    encoding of text into token ids."""

    def __init__(self, tokenizer: Tokenizer, tokens: list[bytes], eos: int) -> None:
        self._tokenizer = tokenizer
        self.tokens = tokens
        self.eos_token_id = eos
        self.bos_token_id = tokenizer.bos_id
        self.special_token_ids = [i for i, b in enumerate(tokens) if b.startswith(SPECIAL_PREFIX)]

    def __call__(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False)
