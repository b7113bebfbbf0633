"""SamplingParams: how one request picks its tokens (plain Python, validated at construction).

Backends turn them into device-side token selection (e.g. llm.backends.torch.sampling); a backend
declares which of them it can honour in its Capabilities.
"""

from __future__ import annotations

import hashlib
import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from llm.engine.contract.errors import SamplingParamsError

if TYPE_CHECKING:
    from llm.engine.contract.structured import StructuredOutput

__all__ = ["MAX_LOGPROBS", "SamplingParams", "SamplingParamsError", "resolve_seed"]

MAX_LOGPROBS = 20  # top alternatives per token (OpenAI's chat limit; vLLM's default cap)
# top_p below this keeps the same nucleus (the top token: its probability is >= 1 / vocab > 2^-24)
# and stays > 0 in the samplers' float32
MIN_TOP_P = 2.0 ** -24
# repetition_penalty's range: beyond it logits divided / multiplied by it overflow float32
REPETITION_RANGE = (1e-30, 1e30)
# a positive temperature below this samples as this: logits / T stay finite in float32 and 1 / T in
# bfloat16 (a temperature of 1e-40 made 1 / T infinite), and at 1e-6 the draw is the argmax unless
# two logits are within ~1e-5 of each other
MIN_TEMPERATURE = 1e-6
MAX_CACHE_SALT = 1024  # characters of a cache_salt (vLLM's limit)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request.

    temperature: 0 means greedy (argmax); > 0 samples from softmax(logits / temperature)
    (values below MIN_TEMPERATURE are kept as MIN_TEMPERATURE: the float limit). min_p
    (in [0, 1], 0 = off): drop the tokens whose probability is below min_p times the most likely
    one's (vLLM's order: on softmax(logits / temperature), before top-k / top-p). top_k:
    keep the k most likely tokens (0 = no limit). top_p: keep the smallest set of tokens whose
    probability reaches top_p (1.0 = no limit; values below MIN_TOP_P, whose nucleus is the top
    token alone, are kept as MIN_TOP_P). seed: makes sampling reproducible (None = a fresh
    random seed). max_new_tokens: generated-token limit. stop: strings that end generation (not
    included in the text unless include_stop_str_in_output; where several begin at the same
    character, the first of the list is the one included). stop_token_ids: token ids that end
    generation besides the model's EOS (their text, if any, is included only with
    include_stop_str_in_output). ignore_eos: keep going after EOS. skip_special_tokens: leave
    special tokens' text (e.g. "<|im_end|>") out of the output text (the default).

    logprobs: None = none; k in [0, 20] = each generated token's log probability plus the k most
    likely alternatives. prompt_logprobs: the same for every prompt token (the first has none).
    Generated-token logprobs are "processed": log_softmax of the logits the sampler picks from,
    after logit_bias, min_tokens, the penalties and temperature (temperature 0 counts as 1), before
    min_p / top-k / top-p; prompt logprobs are log_softmax(logits / temperature) of the model alone.

    presence_penalty / frequency_penalty (OpenAI, [-2, 2]): subtract p once from the logit of every
    token generated so far / f times its count. repetition_penalty (Hugging Face, in [1e-30, 1e30];
    1 = off): the logit of every token in the prompt or generated so far is divided by it when
    positive, multiplied when negative. logit_bias: {token id: bias in [-100, 100]} added to the
    logits (given as a mapping or pairs; kept as sorted pairs). allowed_token_ids (vLLM's
    extension): when not empty, only these token ids can be chosen; the others' logits are
    masked (-inf whatever logit_bias and the penalties do) before selection, so logprobs are
    those of the restricted distribution (kept sorted, without repeats). bad_words (vLLM's
    extension): words the output may not contain (llm.engine.bad_words: each word's token
    sequences, alone and after a space; the last token of one is masked where the output ends
    with the rest of it); they need a backend with structured output (token masks).
    min_tokens: EOS and stop_token_ids are masked until this many tokens were generated, and no
    stop string ends the request before then (vLLM's semantics).

    structured: a StructuredOutput (llm.engine.contract.structured) the whole output must match
    (JSON schema, JSON object, regex, choice or grammar): tokens outside it are masked before
    selection and logprobs (so logprobs are those of the constrained distribution), EOS only
    where the grammar may end, and the request stops ("stop") when the grammar is complete.
    Not with ignore_eos or min_tokens (the grammar decides where the output ends). With n or
    best_of > 1 every sequence follows the grammar on its own.
    n: completions of the prompt (its prefill is shared by all of them). best_of: generate this
    many (>= n; None = n) and return the n with the highest cumulative logprob. Sequence i of a
    request samples with a seed derived from the request's seed and i (`choice_seed`), so the n
    samples differ and each is reproducible.

    cache_salt (vLLM's): requests share prefix-cache pages only with requests of the same salt
    (None: with the unsalted ones); a non-empty string of at most MAX_CACHE_SALT characters.
    It changes no output, only which cached pages a request may use (llm.engine.prefix_cache).
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    max_new_tokens: int = 128
    stop: tuple[str, ...] = field(default_factory=tuple)
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = field(default_factory=tuple)
    allowed_token_ids: tuple[int, ...] = field(default_factory=tuple)
    bad_words: tuple[str, ...] = field(default_factory=tuple)
    min_tokens: int = 0
    structured: StructuredOutput | None = None
    n: int = 1
    best_of: int | None = None
    cache_salt: str | None = None

    def __post_init__(self) -> None:
        # Accept lists for the tuple fields (frozen: set through object.__setattr__).
        for name in ("stop", "bad_words"):
            if isinstance(getattr(self, name), str):
                object.__setattr__(self, name, (getattr(self, name),))
        for name in ("stop", "stop_token_ids", "bad_words"):
            value = getattr(self, name)
            if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__iter__"):
                what = "a list of ints" if name == "stop_token_ids" else (
                    "a string or a list of strings")
                raise SamplingParamsError(f"{name} must be {what}, got {value!r:.60}", param=name)
            object.__setattr__(self, name, tuple(value))
        _check_number("temperature", self.temperature, lo=0.0)
        if 0.0 < self.temperature < MIN_TEMPERATURE:
            object.__setattr__(self, "temperature", MIN_TEMPERATURE)
        _check_number("top_p", self.top_p, lo=0.0, lo_open=True, hi=1.0)
        if self.top_p < MIN_TOP_P:  # the same nucleus (the top token), and > 0 in float32
            object.__setattr__(self, "top_p", MIN_TOP_P)
        _check_int("top_k", self.top_k, lo=0)
        _check_number("min_p", self.min_p, lo=0.0, hi=1.0)
        _check_int("max_new_tokens", self.max_new_tokens, lo=1)
        if self.seed is not None:  # any int64, as OpenAI's API takes (the sampler's tensors)
            _check_int("seed", self.seed, lo=-2**63)
            if self.seed >= 2**63:
                raise SamplingParamsError(f"seed must be < 2**63, got {self.seed}", param="seed")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise SamplingParamsError(f"stop strings must be non-empty strings, got {s!r}",
                                         param="stop")
        for t in self.stop_token_ids:
            _check_int("stop_token_ids entry", t, lo=0)
        for w in self.bad_words:
            if not isinstance(w, str) or not w.strip():
                raise SamplingParamsError(f"bad_words must be non-blank strings, got {w!r:.60}",
                                          param="bad_words")
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise SamplingParamsError(f"{name} must be True or False, got "
                                          f"{getattr(self, name)!r:.60}", param=name)
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                _check_int(name, value, lo=0)
                if value > MAX_LOGPROBS:
                    raise SamplingParamsError(f"{name} must be at most {MAX_LOGPROBS}, got "
                                              f"{value}", param=name)
        _check_number("presence_penalty", self.presence_penalty, lo=-2.0, hi=2.0)
        _check_number("frequency_penalty", self.frequency_penalty, lo=-2.0, hi=2.0)
        _check_number("repetition_penalty", self.repetition_penalty, lo=REPETITION_RANGE[0],
                      hi=REPETITION_RANGE[1])
        object.__setattr__(self, "logit_bias", _logit_bias(self.logit_bias))
        object.__setattr__(self, "allowed_token_ids", _token_set(self.allowed_token_ids))
        _check_int("min_tokens", self.min_tokens, lo=0)
        if self.min_tokens > self.max_new_tokens:
            raise SamplingParamsError(f"min_tokens={self.min_tokens} exceeds max_new_tokens="
                                      f"{self.max_new_tokens}", param="min_tokens")
        if self.structured is not None:
            from llm.engine.contract.structured import StructuredOutput

            if not isinstance(self.structured, StructuredOutput):
                raise SamplingParamsError(f"structured must be a StructuredOutput, got "
                                          f"{self.structured!r:.60}", param="structured")
            for name, used in (("ignore_eos", self.ignore_eos), ("min_tokens", self.min_tokens)):
                if used:
                    raise SamplingParamsError(f"{name} cannot be combined with structured output "
                                              "(the grammar decides where the output ends)",
                                              param=name)
        _check_int("n", self.n, lo=1)
        if self.best_of is not None:
            _check_int("best_of", self.best_of, lo=1)
            if self.best_of < self.n:
                raise SamplingParamsError(f"best_of={self.best_of} must be >= n={self.n}",
                                          param="best_of")
        if self.cache_salt is not None and not _valid_salt(self.cache_salt):
            raise SamplingParamsError(f"cache_salt must be a non-empty string (valid Unicode) "
                                      f"of at most {MAX_CACHE_SALT} characters, got "
                                      f"{self.cache_salt!r:.60}", param="cache_salt")

    @property
    def num_sequences(self) -> int:
        """Sequences generated for the prompt: best_of, else n."""
        return self.best_of if self.best_of is not None else self.n

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def penalized(self) -> bool:
        """True if any penalty, bias or min_tokens changes the logits before selection."""
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias
                    or self.repetition_penalty != 1.0 or self.min_tokens
                    or self.allowed_token_ids)


def _valid_salt(salt: object) -> bool:
    """A cache salt: a non-empty str of at most MAX_CACHE_SALT characters, valid Unicode."""
    if not isinstance(salt, str) or not 0 < len(salt) <= MAX_CACHE_SALT:
        return False
    try:
        salt.encode("utf-8")  # (JSON can smuggle in lone surrogates)
    except UnicodeEncodeError:
        return False
    return True


def _token_set(value: object) -> tuple[int, ...]:
    """Validated allowed_token_ids: sorted ids without repeats (checked against the vocabulary
    where it is known, at submission)."""
    if isinstance(value, (str, bytes, Mapping)) or not hasattr(value, "__iter__"):
        raise SamplingParamsError(f"allowed_token_ids must be a list of token ids, got "
                                  f"{value!r:.60}", param="allowed_token_ids")
    ids = list(value)  # type: ignore[call-overload]
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, int) or t < 0:
            raise SamplingParamsError(f"allowed_token_ids entry {t!r:.40} is not a token id (an "
                                      "integer >= 0)", param="allowed_token_ids")
    return tuple(sorted(set(ids)))


def _logit_bias(value: object) -> tuple[tuple[int, float], ...]:
    """Validated logit_bias as sorted (token id, bias) pairs (ids are checked against the
    vocabulary where it is known, at submission)."""
    pairs = value.items() if isinstance(value, Mapping) else value
    try:
        pairs = list(pairs)  # type: ignore[arg-type]
    except TypeError:
        raise SamplingParamsError(f"logit_bias must map token ids to numbers, got {value!r}",
                                  param="logit_bias") from None
    out: dict[int, float] = {}
    for pair in pairs:
        if not isinstance(pair, tuple) or len(pair) != 2:
            raise SamplingParamsError(f"logit_bias must map token ids to numbers, got {pair!r}",
                                      param="logit_bias")
        token, bias = pair
        if isinstance(token, bool) or not isinstance(token, int) or token < 0:
            raise SamplingParamsError(f"logit_bias key {token!r} is not a token id (an integer "
                                      ">= 0)", param="logit_bias")
        _check_number(f"logit_bias[{token}]", bias, lo=-100.0, hi=100.0)
        out[token] = float(bias)
    return tuple(sorted(out.items()))

def _check_number(name: str, value: object, lo: float, hi: float | None = None,
                  lo_open: bool = False) -> None:
    if not finite_number(value):
        raise SamplingParamsError(f"{name} must be a finite number, got {value!r:.60}",
                                  param=name.split("[")[0])
    if value < lo or (lo_open and value == lo) or (hi is not None and value > hi):
        bounds = f"{'(' if lo_open else '['}{lo}, {hi if hi is not None else 'inf'}]"
        raise SamplingParamsError(f"{name} must be in {bounds}, got {value!r}",
                                  param=name.split("[")[0])


def finite_number(value: object) -> bool:
    """An int or float (not a bool) that is a finite float: an int too large for a float (JSON
    allows any) is not."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _check_int(name: str, value: object, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SamplingParamsError(f"{name} must be an integer, got {value!r}",
                                  param=name.split()[0])
    if value < lo:
        raise SamplingParamsError(f"{name} must be >= {lo}, got {value}", param=name.split()[0])


def choice_seed(seed: int, choice: int) -> int:
    """The seed of sequence `choice` of a request seeded `seed`: the seed itself for the first,
    a 63-bit hash of both for the others."""
    if choice == 0:
        return seed
    digest = hashlib.sha256(f"{seed}:{choice}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def resolve_seed(params: SamplingParams) -> int:
    """The seed a request samples with: its own, or a fresh random one (drawn once per request)."""
    return params.seed if params.seed is not None else secrets.randbits(31)
