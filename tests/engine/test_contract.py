"""The backend contract, driven the same way on every backend: capabilities refuse what a backend
cannot serve at submission (that request alone), close() releases it, and one engine core has one
scheduler that the synchronous and asynchronous fronts take turns to drive.
"""

from __future__ import annotations

import asyncio
import dataclasses
from concurrent.futures import Future
from functools import partial

import numpy as np
import pytest
import torch
from fakes import GreedyOnlyBackend, fake_parts
from hf_reference import SMALL_CONFIGS, hf_model, state_dict

from llm.engine.async_engine import AsyncEngine
from llm.engine.contract.backend import (
    FEATURES,
    SAMPLING_MODES,
    BackendSpec,
    Capabilities,
    DecodeInput,
    PrefillInput,
    SequenceSampling,
    create_backend,
)
from llm.engine.contract.sampling_params import SamplingParams, SamplingParamsError
from llm.engine.contract.structured import StructuredOutput, TokenMasks
from llm.engine.core import EngineBusyError, EngineCore
from llm.engine.drive import decode_together
from llm.engine.generator import Generator
from llm.engine.scheduler import SchedulerConfig
from llm.model.checkpoint.common import Checkpoint
from llm.model.config import ConfigError

GREEDY = SequenceSampling(SamplingParams(), 0)
SAMPLED = SamplingParams(temperature=0.8, top_p=0.9, seed=1, max_new_tokens=4)
BACKENDS = {"torch": {}, "tt": {"implementation": "emulator"}}


def _spec(name: str, **extra) -> BackendSpec:
    config = dataclasses.replace(SMALL_CONFIGS["llama_gqa"], hidden_size=128, head_dim=32)
    model = hf_model(config)
    return BackendSpec(Checkpoint(config, state_dict(model), source=None), max_batch=2,
                       max_seq_len=64, block_size=32, options={**BACKENDS[name], **extra})


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_every_backend_declares_serves_and_closes(name: str) -> None:
    backend = create_backend(name, _spec(name))
    caps = backend.capabilities
    assert "greedy" in caps.sampling and caps.sampling <= SAMPLING_MODES
    assert (caps.max_batch, caps.max_context) == (2, 64)
    assert backend.leader and not backend.closed
    tokens = decode_together(backend, [[1, 2, 3], [4, 5]], 3, [GREEDY, GREEDY])
    assert [len(t) for t in tokens] == [3, 3]
    for params in (SamplingParams(), SamplingParams(temperature=0.5, top_k=5, top_p=0.5)):
        if all(m in caps.sampling for m in ("temperature", "top_k", "top_p")) or params.greedy:
            caps.check(params, name)
        else:
            with pytest.raises(SamplingParamsError, match=f"not supported by the {name} backend"):
                caps.check(params, name)
    _check_features(backend, name)
    _check_token_masks(backend, name)
    backend.close()
    backend.close()  # idempotent
    assert backend.closed and name in backend.describe()
    with pytest.raises(RuntimeError, match="closed"):
        backend.prefill(PrefillInput(0, [1, 2], 0, [1, 2], GREEDY))


FEATURE_PARAMS = {"logprobs": {"logprobs": 2}, "prompt_logprobs": {"prompt_logprobs": 1},
                  "presence_penalty": {"presence_penalty": 0.5},
                  "frequency_penalty": {"frequency_penalty": -0.5},
                  "repetition_penalty": {"repetition_penalty": 1.2},
                  "logit_bias": {"logit_bias": {3: 5.0}}, "min_tokens": {"min_tokens": 2},
                  "allowed_token_ids": {"allowed_token_ids": (5, 17), "logit_bias": {17: -1.0,
                                                                                     9: 100.0}}}


def _check_features(backend, name: str) -> None:
    """Each feature parameter is either served (the step returns the logprobs asked for) or
    refused by the capabilities, naming the parameter."""
    caps = backend.capabilities
    for param, kwargs in FEATURE_PARAMS.items():
        params = SamplingParams(**kwargs)
        try:
            caps.check(params, name)
        except SamplingParamsError as e:
            assert e.param == param and f"not supported by the {name} backend" in str(e)
            continue
        s = SequenceSampling(params, 0, (2,))
        out = backend.prefill_step(PrefillInput(0, [1, 2, 3], 0, [1, 2], s,
                                                [2, 3] if param == "prompt_logprobs" else None))
        assert len(out.tokens) == 1
        assert (out.logprobs is not None) == (param == "logprobs")
        if param == "logprobs":
            assert out.logprobs[0].token == out.tokens[0] and len(out.logprobs[0].top) == 2
        if param == "prompt_logprobs":
            assert [lp.token for lp in out.prompt_logprobs] == [2, 3]
        if param == "allowed_token_ids":  # a bias does not let token 9 back in
            assert out.tokens[0] in (5, 17)
            for seed in range(8):  # sampled: within the set too
                hot = SequenceSampling(SamplingParams(temperature=2.0, **kwargs), seed, (2,))
                step = backend.prefill_step(PrefillInput(0, [1, 2, 3], 0, [1, 2], hot))
                assert step.tokens[0] in (5, 17)


def _masks(rows: tuple[int, ...], allowed: list[int], vocab: int) -> TokenMasks:
    """TokenMasks of `rows`, each allowing only the token `allowed[i]`."""
    bits = np.zeros((len(rows), (vocab + 31) // 32), dtype=np.int32)
    for row, token in zip(bits, allowed):
        row.view(np.uint32)[token // 32] = 1 << (token % 32)
    future = Future()
    future.set_result(bits)
    return TokenMasks(rows, future)


def _check_token_masks(backend, name: str) -> None:
    """Structured output: a backend either applies TokenMasks to the rows they name (the others'
    tokens unchanged) or refuses structured requests by its capabilities, naming the parameter."""
    params = SamplingParams(structured=StructuredOutput("regex", "[ab]"))
    if "structured_output" not in backend.capabilities.features:
        with pytest.raises(SamplingParamsError, match=f"not supported by the {name} backend") as e:
            backend.capabilities.check(params, name)
        assert e.value.param == "structured"
        return
    vocab = backend.config.vocab_size
    s = SequenceSampling(params, 0, (2,))
    step = backend.prefill_step(PrefillInput(0, [1, 2, 3], 0, [1, 2], s,
                                             allowed=_masks((0,), [vocab - 3], vocab)))
    assert list(step.tokens) == [vocab - 3]
    backend.prefill_step(PrefillInput(1, [4, 5], 0, [3, 4], GREEDY))
    inp = DecodeInput([0, 1], [9, 10], [3, 2], [[1, 2], [3, 4]], [s, GREEDY])
    free = backend.decode_step(inp).tokens[1]
    masked = backend.decode_step(dataclasses.replace(inp, allowed=_masks((0,), [7], vocab)))
    assert list(masked.tokens) == [7, free]



@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_a_chunk_that_selects_nothing_writes_the_same_kv(name: str) -> None:
    """A chunk before the prompt's last (select=False) returns no token and leaves the same K/V
    as one that selects: the last chunk then picks the same token with the same logprobs."""
    backend = create_backend(name, _spec(name))
    prompt = [(7 * i) % 90 + 3 for i in range(40)]
    s = SequenceSampling(SamplingParams(logprobs=2), 0)
    results = []
    for slot, pages, select in ((0, [1, 2], True), (1, [3, 4], False)):
        first = backend.prefill_step(PrefillInput(slot, prompt[:32], 0, pages, s, select=select))
        assert len(first.tokens) == (1 if select else 0)
        results.append(backend.prefill_step(PrefillInput(slot, prompt[32:], 32, pages, s)))
    assert list(results[0].tokens) == list(results[1].tokens)
    assert results[0].logprobs == results[1].logprobs
    with pytest.raises(ValueError, match="select=True"):
        PrefillInput(0, [1], 0, [1], s, allowed=TokenMasks((0,), Future()), select=False)
    backend.close()

@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_prefill_step_says_launched_once_per_call(name: str) -> None:
    """Every backend calls prefill_step's `launched` exactly once per call, whether the chunk
    selects a token or not and with prompt logprobs, and returns the same as without it."""
    backend = create_backend(name, _spec(name))
    prompt = [(5 * i) % 90 + 3 for i in range(40)]
    for params in (SamplingParams(), SamplingParams(prompt_logprobs=1)):
        s = SequenceSampling(params, 0)
        targets = {"first": None, "last": None}
        if params.prompt_logprobs is not None:
            targets = {"first": prompt[1:33], "last": prompt[33:]}
        calls: list[int] = []
        first = backend.prefill_step(PrefillInput(0, prompt[:32], 0, [1, 2], s, targets["first"],
                                                  select=False), partial(calls.append, 1))
        assert calls == [1] and not first.tokens
        last = backend.prefill_step(PrefillInput(0, prompt[32:], 32, [1, 2], s, targets["last"]),
                                    partial(calls.append, 2))
        assert calls == [1, 2]
        again = backend.prefill_step(PrefillInput(1, prompt, 0, [3, 4], s,
                                                  prompt[1:] if targets["last"] else None))
        assert list(last.tokens) == list(again.tokens)
    backend.close()


@pytest.mark.parametrize("name", sorted(BACKENDS))
@pytest.mark.parametrize("rep", [1e9, 1e-30])
def test_masks_hold_under_extreme_repetition_penalties(name: str, rep: float) -> None:
    """allowed_token_ids' and min_tokens' masks are not scaled by a repetition penalty (on tt a
    finite mask times 1e9 overflowed to NaN, times 1e-30 unmasked tokens): the one token left is
    chosen, with a finite logprob, greedy and sampled, in prefill and decode."""
    backend = create_backend(name, _spec(name))
    for temperature in (0.0, 1.0):
        params = SamplingParams(allowed_token_ids=(2, 40), min_tokens=3, temperature=temperature,
                                repetition_penalty=rep, logprobs=1, seed=3)
        s = SequenceSampling(params, 3, (2,))  # 2: a stop id, masked by min_tokens
        first = backend.prefill_step(PrefillInput(0, [1, 2, 3, 40, 5], 0, [1, 2], s))
        step = backend.decode_step(DecodeInput([0], [first.tokens[0]], [5], [[1, 2]], [s]))
        for out in (first, step):
            assert list(out.tokens) == [40] and np.isfinite(out.logprobs[0].logprob)
    backend.close()


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_a_vanishing_temperature_samples_the_argmax_beside_another_request(name: str) -> None:
    """temperature 1e-40 (1 / T is infinite in float32; tt's sampling inputs could not hold it
    and the step failed for the whole batch; torch's logprobs were NaN): sampled as
    MIN_TEMPERATURE, so the greedy token with finite logprobs, in prefill and in a decode step
    shared with a request at temperature 1."""
    assert SamplingParams(temperature=1e-40).temperature == 1e-6
    assert SamplingParams(temperature=0.0).temperature == 0.0
    backend = create_backend(name, _spec(name))
    prompt = [1, 7, 3, 40, 5]
    greedy = backend.prefill_step(PrefillInput(0, prompt, 0, [1, 2], GREEDY)).tokens[0]
    tiny = SequenceSampling(SamplingParams(temperature=1e-40, top_k=5, logprobs=2, seed=3), 3)
    other = SequenceSampling(SamplingParams(temperature=1.0, logprobs=2, seed=4), 4)
    first = backend.prefill_step(PrefillInput(0, prompt, 0, [1, 2], tiny))
    assert list(first.tokens) == [greedy] and np.isfinite(first.logprobs[0].logprob)
    second = backend.prefill_step(PrefillInput(1, prompt, 0, [3, 4], other))
    want = backend.prefill_step(PrefillInput(0, [*prompt, greedy], 0, [1, 2], GREEDY)).tokens[0]
    step = backend.decode_step(DecodeInput([0, 1], [greedy, second.tokens[0]], [5, 5],
                                           [[1, 2], [3, 4]], [tiny, other]))
    assert step.tokens[0] == want
    assert all(np.isfinite(lp.logprob) for lp in step.logprobs)
    backend.close()


def test_torch_and_tt_serve_every_feature() -> None:
    for name in ("torch", "tt"):
        backend = create_backend(name, _spec(name))
        assert backend.capabilities.features == FEATURES
        backend.close()


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_unknown_options_and_tensor_parallel_are_refused_by_name(name: str) -> None:
    with pytest.raises(ConfigError, match=f"unknown {name} backend option.*bogus"):
        create_backend(name, _spec(name, bogus=1))
    if name == "tt":
        with pytest.raises(ConfigError, match="tensor_parallel=2 needs the torch backend"):
            create_backend(name, BackendSpec(tensor_parallel=2))
    mode = "stored" if name == "torch" else "dequantize"  # tt refuses stored anyway (below)
    loaded = dataclasses.replace(_spec(name), weights=mode)
    with pytest.raises(ConfigError, match=f"weights='{mode}' applies when a checkpoint is read"):
        create_backend(name, loaded)  # already loaded weights: refused, not ignored
    if name == "tt":  # torch's settings: refused, not ignored
        for field, value in (("device", "cuda"), ("dtype", "bfloat16"), ("weights", "stored")):
            spec = dataclasses.replace(_spec(name), **{field: value})
            with pytest.raises(ConfigError, match=f"{field}='{value}' applies to the torch"):
                create_backend(name, spec)


def test_a_request_beyond_the_capabilities_is_refused_alone() -> None:
    """The reproduction of the architecture issue: on a greedy-only backend, one request with
    temperature=1.0 used to kill the engine and every later request."""
    fake, tok, _ = fake_parts()
    core = EngineCore(GreedyOnlyBackend(fake.runtime), tok)
    engine = AsyncEngine(type("Model", (), {"core": core})())

    async def go() -> list[int]:
        with pytest.raises(SamplingParamsError, match="temperature=1.0") as info:
            engine.submit([1, 2, 3], SamplingParams(temperature=1.0))
        assert info.value.param == "temperature"
        with pytest.raises(SamplingParamsError, match="temperature=0.5"):
            engine.submit([1, 2, 3], SamplingParams(temperature=0.5, top_k=5))
        out = await engine.submit([1, 2, 3], SamplingParams(max_new_tokens=3)).result()
        return out.token_ids

    try:
        assert len(asyncio.run(go())) == 3
        assert engine.error is None
    finally:
        engine.shutdown()
    with pytest.raises(SamplingParamsError, match="not supported by the greedy-only backend"):
        Generator(core).generate([[1, 2]], SAMPLED)
    no_top_k = Capabilities(frozenset({"greedy", "temperature", "top_p"}), 1, 8)
    with pytest.raises(SamplingParamsError, match="top_k=5") as info:
        no_top_k.check(SamplingParams(temperature=0.5, top_k=5), "fake")
    assert info.value.param == "top_k"
    no_top_k.check(SamplingParams(temperature=0.5, top_p=0.5), "fake")
    with pytest.raises(SamplingParamsError, match="min_p=0.1") as info:
        no_top_k.check(SamplingParams(temperature=0.5, min_p=0.1), "fake")
    assert info.value.param == "min_p"
    no_top_k.check(SamplingParams(temperature=0, min_p=0.1), "fake")  # greedy: nothing to filter


def test_one_scheduler_two_fronts_take_turns() -> None:
    fake, tok, _ = fake_parts()
    core = EngineCore(fake, tok)
    sync = Generator(core)
    assert sync.scheduler is core.scheduler and sync.pages is core.pages
    model = type("Model", (), {"core": core})()
    before = sync.generate([[1, 2, 3]], SamplingParams(max_new_tokens=4))[0].token_ids
    engine = AsyncEngine(model)
    assert engine.scheduler is core.scheduler
    try:
        with pytest.raises(EngineBusyError, match="an AsyncEngine is driving this model"):
            sync.generate([[1, 2, 3]], SamplingParams(max_new_tokens=4))
        with pytest.raises(EngineBusyError):
            AsyncEngine(model)  # a second asynchronous front on the same scheduler
    finally:
        engine.shutdown()
    assert sync.generate([[1, 2, 3]], SamplingParams(max_new_tokens=4))[0].token_ids == before
    stream = sync.stream([[1, 2, 3]], SamplingParams(max_new_tokens=4))
    next(stream)  # a synchronous stream in progress holds the core
    with pytest.raises(EngineBusyError, match="generate/stream is driving this model"):
        AsyncEngine(model)
    with pytest.raises(EngineBusyError, match="another generate/stream is driving"):
        sync.generate([[4, 5]], SamplingParams(max_new_tokens=2))  # it would take our events
    rest = list(stream)
    assert rest[-1].finished and rest[-1].output.token_ids == before
    stream.close()
    AsyncEngine(model).shutdown()
    a = core.pages.allocator
    assert a.num_free == a.capacity
    alone = Generator(fake_parts()[0], tok)  # the pre-EngineCore signature makes its own core
    assert alone.generate([[1, 2, 3]], SamplingParams(max_new_tokens=4))[0].token_ids == before


def test_scheduler_limits_are_restored_after_an_async_front() -> None:
    fake, tok, _ = fake_parts(max_batch=4)
    core = EngineCore(fake, tok)
    engine = AsyncEngine(type("Model", (), {"core": core})(), SchedulerConfig(max_active=1))
    assert core.scheduler.max_active == 1
    engine.shutdown()
    assert core.scheduler.max_active == 4 and core.scheduler.config == SchedulerConfig()


def test_an_unknown_torch_device_is_refused_by_name() -> None:
    spec = dataclasses.replace(_spec("torch"), device="tpu")
    with pytest.raises(ConfigError, match="device 'tpu' is not a torch device"):
        create_backend("torch", spec)


def test_a_cuda_device_this_machine_lacks_is_refused_before_loading(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    spec = dataclasses.replace(_spec("torch"), device="cuda:3")
    monkeypatch.setattr(BackendSpec, "load", lambda *a, **k: pytest.fail("weights were read"))
    with pytest.raises(ConfigError, match="device 'cuda:3': this machine has 1 CUDA device"):
        create_backend("torch", spec)
