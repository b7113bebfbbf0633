"""SamplingParams: how one request picks its tokens (plain Python, validated at construction).

Backends turn them into device-side token selection (e.g. llm.backends.torch.sampling); a backend
declares which of them it can honour in its Capabilities.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field


class SamplingParamsError(ValueError):
    """An invalid or unsupported sampling parameter; the message names it, `param` holds its name
    (None when it is not one parameter).
    """

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request.

    temperature: 0 means greedy (argmax); > 0 samples from softmax(logits / temperature). top_k:
    keep the k most likely tokens (0 = no limit). top_p: keep the smallest set of tokens whose
    probability reaches top_p (1.0 = no limit). seed: makes sampling reproducible (None = a fresh
    random seed). max_new_tokens: generated-token limit. stop: strings that end generation (not
    included in the text). stop_token_ids: token ids that end generation besides the model's EOS.
    ignore_eos: keep going after EOS.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    max_new_tokens: int = 128
    stop: tuple[str, ...] = field(default_factory=tuple)
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        # Accept lists for the tuple fields (frozen: set through object.__setattr__).
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        _check_number("temperature", self.temperature, lo=0.0)
        _check_number("top_p", self.top_p, lo=0.0, lo_open=True, hi=1.0)
        _check_int("top_k", self.top_k, lo=0)
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

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


def _check_number(name: str, value: object, lo: float, hi: float | None = None,
                  lo_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SamplingParamsError(f"{name} must be a finite number, got {value!r}", param=name)
    if value < lo or (lo_open and value == lo) or (hi is not None and value > hi):
        bounds = f"{'(' if lo_open else '['}{lo}, {hi if hi is not None else 'inf'}]"
        raise SamplingParamsError(f"{name} must be in {bounds}, got {value!r}", param=name)


def _check_int(name: str, value: object, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SamplingParamsError(f"{name} must be an integer, got {value!r}",
                                  param=name.split()[0])
    if value < lo:
        raise SamplingParamsError(f"{name} must be >= {lo}, got {value}", param=name.split()[0])


def resolve_seed(params: SamplingParams) -> int:
    """The seed a request samples with: its own, or a fresh random one (drawn once per request)."""
    return params.seed if params.seed is not None else secrets.randbits(31)
