"""The backend contract: what the engine hands a backend, what a backend declares, and the lazy
registry of backends.

A backend owns the model weights on its device and the paged KV cache. The engine owns the
schedule: which user sits in which batch slot, which KV pages each user holds, and when a user
stops. Inputs cross this interface as plain Python values, so a backend is free in how it stages
them on its device. A backend declares what it can serve in its `Capabilities`; the engine refuses
a request outside them when it is submitted, so it never reaches the backend.
"""

from __future__ import annotations

import dataclasses
import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm.engine.contract.outputs import StepOutput
from llm.engine.contract.sampling_params import SamplingParams, SamplingParamsError
from llm.engine.contract.structured import TokenMasks
from llm.model.checkpoint.common import Checkpoint
from llm.model.config import ConfigError, ModelConfig, RuntimeConfig
from llm.model.paths import default_model_path

DEFAULT_MAX_SEQ_LEN = 2048
SAMPLING_MODES = frozenset({"greedy", "temperature", "top_k", "top_p", "min_p"})
FEATURES = frozenset({"logprobs", "prompt_logprobs", "penalties", "logit_bias", "min_tokens",
                      "structured_output"})


@dataclass(frozen=True)
class SequenceSampling:
    """The sampling parameters of one user, the seed its random stream is keyed by, and the
    token ids that would end it (EOS unless ignore_eos, and stop_token_ids: what min_tokens masks).
    """

    params: SamplingParams
    seed: int
    stop_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class Fork:
    """Another user starting from the same prompt (a request with n > 1): its batch slot and
    sampling (the request's parameters, its own seed)."""

    slot: int
    sampling: SequenceSampling


@dataclass(frozen=True)
class PrefillInput:
    """One user's prompt (or a chunk of it) to run through the model.

    tokens: [S] token ids at positions start_pos .. start_pos + S - 1.
    page_table: [max_blocks_per_seq] page ids of this user (padded with page 0).
    targets: with prompt logprobs wanted, the prompt tokens that follow each position of this
    chunk (the prompt's tokens start_pos + 1 ..; S - 1 of them in the last chunk), whose
    logprobs the backend returns in StepOutput.prompt_logprobs; None otherwise.
    allowed: with a structured-output request, in the chunk that ends the prompt, the masks of
    the tokens chosen from its last position: row 0 this user's, row 1 + i forks[i]'s; None
    otherwise.
    cached: on a request's first call that starts past 0 (a prefix-cache hit), the prompt tokens
    at positions 0 .. start_pos - 1, whose K/V the user's pages already hold (computed for
    another request); empty otherwise. A request's first call is thus the one with start_pos ==
    len(cached): where per-request state starts (e.g. the prompt tokens penalties count).
    forks: on a prompt's last chunk, other users of the same prompt: their first tokens are
    chosen from this chunk's last logits too (StepOutput.tokens and .logprobs then hold 1 +
    len(forks) entries, this user's first), and their per-request state starts as this user's.
    Their K/V pages are the engine's business (shared pages, `Backend.copy_pages`).
    select: whether a token is chosen from this chunk's last position: True on the chunk that
    ends the prompt; False on an earlier one, whose call writes its K/V (and the prompt logprobs
    of its targets) and nothing else: StepOutput.tokens is empty, no forks nor masks come with
    it, and the backend need not compute the chunk's logits nor wait for the device.
    """

    slot: int
    tokens: Sequence[int]
    start_pos: int
    page_table: Sequence[int]
    sampling: SequenceSampling
    targets: Sequence[int] | None = None
    allowed: TokenMasks | None = None
    cached: Sequence[int] = ()
    forks: Sequence[Fork] = ()
    select: bool = True

    def __post_init__(self) -> None:
        if not self.select and (self.forks or self.allowed is not None):
            raise ValueError("forks and token masks come with the chunk that ends the prompt "
                             "(select=True)")


@dataclass(frozen=True)
class DecodeInput:
    """One decode step: one token per active user.

    tokens / positions: [B] the token each user feeds and its position. page_table: [B,
    max_blocks_per_seq]. allowed: the token masks of the users with structured output (None when
    there are none; only given to a backend declaring "structured_output").
    """

    slots: Sequence[int]
    tokens: Sequence[int]
    positions: Sequence[int]
    page_table: Sequence[Sequence[int]]
    sampling: Sequence[SequenceSampling]
    allowed: TokenMasks | None = None


@dataclass(frozen=True)
class Capabilities:
    """What a backend instance can serve.

    sampling: the token-selection modes it implements, a subset of SAMPLING_MODES ("greedy" is
    argmax; "temperature" samples from softmax(logits / T); "top_k" / "top_p" / "min_p" filter
    before sampling). max_batch: users decoded together. max_context: prompt + completion
    tokens per user.
    features: what it computes beyond the next token, a subset of FEATURES ("logprobs" /
    "prompt_logprobs": log probabilities of generated / prompt tokens; "penalties": presence,
    frequency and repetition penalties; "logit_bias"; "min_tokens"; "structured_output": the
    TokenMasks of PrefillInput / DecodeInput applied to the logits before selection and logprobs).
    """

    sampling: frozenset[str]
    max_batch: int
    max_context: int
    features: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        unknown = set(self.sampling) - SAMPLING_MODES
        if unknown or "greedy" not in self.sampling:
            raise ValueError(f"sampling modes must include 'greedy' and be among "
                             f"{sorted(SAMPLING_MODES)}, got {sorted(self.sampling)}")
        if set(self.features) - FEATURES:
            raise ValueError(f"features must be among {sorted(FEATURES)}, got "
                             f"{sorted(self.features)}")

    def check(self, params: SamplingParams, backend: str) -> None:
        """SamplingParamsError (naming the parameter) unless these parameters can be honoured."""
        self._check_features(params, backend)
        if params.greedy:
            return
        wanted = [("temperature", params.temperature, "temperature"),
                  ("top_k", params.top_k, "top_k" if params.top_k > 0 else None),
                  ("top_p", params.top_p, "top_p" if params.top_p < 1.0 else None),
                  ("min_p", params.min_p, "min_p" if params.min_p > 0.0 else None)]
        for name, value, mode in wanted:
            if mode is not None and mode not in self.sampling:
                supported = ", ".join(sorted(self.sampling))
                raise SamplingParamsError(
                    f"{name}={value!r} is not supported by the {backend} backend (it implements: "
                    f"{supported}); use temperature=0 for greedy decoding", param=name)

    def _check_features(self, params: SamplingParams, backend: str) -> None:
        wanted = [("logprobs", params.logprobs is not None, "logprobs"),
                  ("prompt_logprobs", params.prompt_logprobs is not None, "prompt_logprobs"),
                  ("presence_penalty", params.presence_penalty != 0.0, "penalties"),
                  ("frequency_penalty", params.frequency_penalty != 0.0, "penalties"),
                  ("repetition_penalty", params.repetition_penalty != 1.0, "penalties"),
                  ("logit_bias", bool(params.logit_bias), "logit_bias"),
                  ("allowed_token_ids", bool(params.allowed_token_ids), "logit_bias"),
                  ("min_tokens", params.min_tokens > 0, "min_tokens"),
                  ("best_of", params.num_sequences > params.n, "logprobs")]  # ranks by them
        for name, used, feature in wanted:
            if used and feature not in self.features:
                raise SamplingParamsError(
                    f"{name}={getattr(params, name)!r} is not supported by the {backend} backend",
                    param=name)
        if params.bad_words and "structured_output" not in self.features:
            raise SamplingParamsError(f"bad_words: the token masks it needs (structured output) "
                                      f"are not supported by the {backend} backend",
                                      param="bad_words")
        s = params.structured
        if s is not None and "structured_output" not in self.features:
            raise SamplingParamsError(f"{s.param}: structured output is not supported by the "
                                      f"{backend} backend", param=s.param)


@dataclass(frozen=True)
class BackendSpec:
    """Everything a backend's `create` needs to load a model and size its caches.

    model: a Hugging Face directory or .gguf path (None: the embedded default model), or weights
    already loaded. max_seq_len: None = the model's context, at most DEFAULT_MAX_SEQ_LEN.
    tensor_parallel: processes the model is split over (a backend without it refuses N > 1).
    weights: how the weights are held: "auto" (the backend's choice, see its `create`) or one of
    llm.model.checkpoint.common.WEIGHT_MODES ("dequantize": floating point; "stored": a GGUF's
    quantized blocks as stored; "int8" / "int4" / "int4_mix": quantized at load). options: the
    backend's own keyword options, each with one meaning (see its `create`). int4_group: with
    weights "int4" / "int4_mix", the columns of every int4 group (a multiple of 32 dividing each
    matrix's in_features; None: 128, or 64 / 32 where 128 does not divide it).
    """

    model: str | Path | Checkpoint | None = None
    device: str = "cpu"
    dtype: str = "float32"
    max_batch: int = 8
    max_seq_len: int | None = None
    block_size: int = 32
    num_blocks: int | None = None
    cache_dir: str | Path | None = None
    progress: bool = True
    tensor_parallel: int = 1
    weights: str = "auto"
    options: Mapping[str, Any] = field(default_factory=dict)
    int4_group: int | None = None

    def load(self, auto: str = "dequantize") -> Checkpoint:
        """The checkpoint: `model` itself when already loaded, else read as `weights` says
        (`auto`: the mode the backend picks for weights="auto")."""
        if isinstance(self.model, Checkpoint):
            given = [f"{k}={v!r}" for k, v in (("weights", self.weights),
                                                ("int4_group", self.int4_group))
                     if v not in ("auto", None)]
            if given:  # already loaded weights: nothing could honour them
                raise ConfigError(f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'}"
                                  " when a checkpoint is read; these weights are already loaded")
            return self.model
        from llm.model.checkpoint.load import load_checkpoint  # torch: only where weights load

        return load_checkpoint(self.model_path(), cache_dir=self.cache_dir,
                               progress=self.progress, weights=self.weights_mode(auto),
                               int4_group=self.int4_group)

    def weights_mode(self, auto: str) -> str:
        """`weights`, with "auto" replaced by the backend's choice `auto` (int4_group with
        "auto": ConfigError, the group needs weights "int4" / "int4_mix" named)."""
        if self.weights == "auto" and self.int4_group is not None:
            raise ConfigError(f"int4_group={self.int4_group!r} needs weights='int4' or "
                              f"'int4_mix'; weights='auto' reads this model as {auto!r}")
        return auto if self.weights == "auto" else self.weights

    def model_path(self) -> Path:
        """The checkpoint path to read (the default model's when `model` is None); callers
        handle already loaded weights first."""
        return Path(self.model).expanduser() if self.model is not None else default_model_path()

    def runtime(self, config: ModelConfig, device: str | None = None) -> RuntimeConfig:
        """The RuntimeConfig for `config` (checks max_seq_len against the model's context)."""
        limit = config.max_context
        max_seq_len = self.max_seq_len
        if max_seq_len is None:
            max_seq_len = min(limit, DEFAULT_MAX_SEQ_LEN)
        elif max_seq_len > limit:
            raise ConfigError(
                f"max_seq_len={max_seq_len} exceeds the model's context of {limit} tokens")
        return RuntimeConfig(device=device or self.device, dtype=self.dtype,
                             max_batch=self.max_batch, max_seq_len=max_seq_len,
                             block_size=self.block_size, num_blocks=self.num_blocks)


class Backend(ABC):
    """A device backend: weights on the device, a paged KV cache, prefill and decode.

    Attributes every backend sets: `name`, `config`, `runtime`, `source` (the checkpoint path, or
    None for in-memory weights), `source_sha256` (its content hash when known, e.g. a GGUF's),
    `weight_bytes` (None where unknown) and `host_compute` (whether its steps compute on this
    process's CPU cores, as a CPU device or an emulator does: then the engine does not run the
    event loop's work beside them, which would take their cores).
    A tensor-parallel backend has one instance per process: the leader (`leader` True) is driven
    by the engine, every other rank calls `follow()`.
    """

    name: str
    config: ModelConfig
    runtime: RuntimeConfig
    source: Path | None = None
    source_sha256: str | None = None
    weight_bytes: int | None = None  # bytes of weights this process holds on its device
    host_compute: bool = True  # steps compute on this host's CPU cores (see above)
    closed: bool = False

    @property
    @abstractmethod
    def capabilities(self) -> Capabilities:
        """What this instance can serve (checked when a request is submitted)."""

    @abstractmethod
    def prefill(self, inp: PrefillInput) -> int:
        """Run the prompt, write its K/V into the user's pages, return the next token (a chunk
        with select=False goes through `prefill_step`, which returns no token for it)."""

    @abstractmethod
    def decode(self, inp: DecodeInput) -> list[int]:
        """Run one token per user, write its K/V, return the next token of each user ([B])."""

    def prefill_step(self, inp: PrefillInput,
                     launched: Callable[[], None] | None = None) -> StepOutput:
        """`prefill` with what the request asked for beyond the token (log probabilities); a
        backend declaring "logprobs" or "prompt_logprobs" overrides it (and `decode_step`).

        launched: called once in the call, once the chunk's forward is enqueued on the device
        (and, where no wait comes before, the token's selection) and before the backend waits
        for any of that work (one that cannot tell, or computes on the host, calls it anywhere
        in the call, as this default does). The engine hands the host to the event loop then,
        so that the loop's work runs while the device computes instead of delaying the
        launch."""
        if launched is not None:
            launched()
        if not inp.select:
            self.prefill(dataclasses.replace(inp, select=True))  # the token is not wanted
            return StepOutput(())
        return StepOutput([self.prefill(inp)])

    def decode_step(self, inp: DecodeInput) -> StepOutput:
        """`decode` with what the requests asked for beyond the tokens (see `prefill_step`)."""
        return StepOutput(self.decode(inp))

    @abstractmethod
    def copy_pages(self, pairs: Sequence[tuple[int, int]]) -> None:
        """For each (src, dst): copy the K/V of page src into page dst, in every layer (the
        copy-on-write of a prompt's last partial page when n users share the prompt)."""

    @abstractmethod
    def describe(self) -> str:
        """One line saying what runs where (backend, device, dtype)."""

    def close(self) -> None:
        """Release the device and its memory; later prefill/decode calls are an error. Idempotent;
        subclasses that hold a device override it and call this.
        """
        self.closed = True

    @property
    def leader(self) -> bool:
        """True unless this is a tensor-parallel rank other than 0."""
        return True

    def follow(self) -> int:
        """On a tensor-parallel follower rank: run the leader's calls until it closes; returns the
        number of calls run."""
        raise RuntimeError(f"the {self.name} backend is not a tensor-parallel follower")


_BACKENDS = {"torch": "llm.backends.torch.runner", "tt": "llm.backends.tt.runner"}


def create_backend(name: str, spec: BackendSpec) -> Backend:
    """Import backend `name` on first use and build it from `spec`; unknown names are a clear
    error.
    """
    if name not in _BACKENDS:
        raise ValueError(f"unknown backend {name!r} (available: {', '.join(sorted(_BACKENDS))})")
    try:
        module = importlib.import_module(_BACKENDS[name])
    except ModuleNotFoundError as e:
        raise ValueError(f"backend {name!r} is not available in this installation: {e}") from e
    return module.create(spec)
