"""cache_salt (vLLM's): prefix-cache pages are shared only between requests of the same salt.

The salt is folded into the root of the page keys' hash chain, so every key of a salted prompt
differs from the same prompt's keys under another salt or none; without a salt the keys are the
plain chain's, as before salts existed. On the recording fake backend: which requests share pages;
on the torch backend (CPU): outputs stay bit-identical to a run without the cache (the style of
test_prefix_cache_identity.py). Through the server: tests/serve/test_cache_salt_http.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import struct

import pytest
from fakes import FakeBackend, FakeTokenizer, expected_tokens, fake_parts
from hf_reference import SMALL_CONFIGS, hf_model, state_dict

from llm.engine.contract.backend import BackendSpec, create_backend
from llm.engine.contract.sampling_params import (
    MAX_CACHE_SALT,
    SamplingParams,
    SamplingParamsError,
)
from llm.engine.core import EngineCore
from llm.engine.generator import Generator
from llm.engine.metrics import ServingMetrics
from llm.engine.prefix_cache import PrefixCachePolicy
from llm.engine.scheduler import Scheduler, SchedulerConfig
from llm.model.checkpoint.common import Checkpoint

SYSTEM = list(range(1, 21))  # 20 tokens: with chunks of 8 and pages of 4, a hit is 16 tokens


def _plain_keys(block_size: int, chunk: int, tokens: list[int]) -> list[bytes]:
    """The page keys as the cache computed them before salts: sha256 chain from the plain root."""
    key = hashlib.sha256(f"llm prefix cache v1: block_size={block_size} prefill_chunk={chunk}"
                         .encode()).digest()
    keys = []
    for i in range(len(tokens) // block_size):
        page = tokens[i * block_size:(i + 1) * block_size]
        key = hashlib.sha256(key + struct.pack(f"{block_size}q", *page)).digest()
        keys.append(key)
    return keys


def test_no_salt_keeps_the_plain_keys_and_each_salt_changes_every_key() -> None:
    policy = PrefixCachePolicy(block_size=4, prefill_chunk=8)
    tokens = list(range(3, 23))
    plain = policy.page_keys(tokens)
    assert plain == policy.page_keys(tokens, salt=None) == _plain_keys(4, 8, tokens)
    a, b = policy.page_keys(tokens, salt="tenant-a"), policy.page_keys(tokens, salt="tenant-b")
    assert a == policy.page_keys(tokens, salt="tenant-a")  # reproducible
    assert len(a) == len(b) == len(plain) == 5
    assert not set(a) & set(plain) and not set(b) & set(plain) and not set(a) & set(b)
    # a salt spelling a page of token ids does not shift another prompt's chain by one page
    first = struct.pack("4q", *tokens[:4]).decode("ascii")
    assert not set(policy.page_keys(tokens[4:], salt=first)) & set(plain)
    assert len({policy.root(), policy.root("x"), policy.root("x "), policy.root("y")}) == 4


@pytest.mark.parametrize("salt", ["", 5, True, b"salt", ["a"], {"a": 1}, "x" * 1025, "\ud800"])
def test_a_malformed_salt_is_refused_naming_it(salt) -> None:
    with pytest.raises(SamplingParamsError) as e:
        SamplingParams(cache_salt=salt)
    assert e.value.param == "cache_salt" and "cache_salt" in str(e.value)
    assert str(MAX_CACHE_SALT) in str(e.value)


def test_the_longest_salt_is_accepted() -> None:
    assert SamplingParams(cache_salt="s" * MAX_CACHE_SALT).cache_salt == "s" * MAX_CACHE_SALT


def _fake_scheduler() -> Scheduler:
    fake, tok, pages = fake_parts(block_size=4)
    config = SchedulerConfig(max_active=4, prefill_chunk=8)
    return Scheduler(FakeBackend(fake.runtime), tok, pages, config, ServingMetrics())


def _run(sched: Scheduler, prompt: list[int], salt: str | None) -> int:
    """Run one request to completion; the prompt tokens it took from the cache."""
    seq = sched.make_sequence(0, prompt, SamplingParams(max_new_tokens=3, cache_salt=salt))
    sched.add(seq)
    while not seq.finished:
        sched.step()
    assert seq.out.token_ids == expected_tokens(prompt, 3)
    return seq.out.cached_tokens


def test_requests_share_cached_pages_only_within_one_salt() -> None:
    sched = _fake_scheduler()
    order = [None, "a", "a", "b", None, "b", "a"]
    assert [_run(sched, SYSTEM, salt) for salt in order] == [0, 0, 16, 0, 16, 16, 16]
    a = sched.pages.allocator
    assert a.num_cached == 3 * 4  # the prefix's 4 pages once per salt (and once unsalted)
    assert sched.metrics.cached_prompt_tokens == 4 * 16
    assert not sched.has_work and a.num_unused + a.num_evictable == a.capacity
    assert all(a.refs(p) == 0 for p in range(a.num_blocks))


def _torch_generator(prefix_cache: bool) -> Generator:
    config = dataclasses.replace(SMALL_CONFIGS["llama_gqa"], hidden_size=128, head_dim=32)
    spec = BackendSpec(Checkpoint(config, state_dict(hf_model(config)), source=None),
                       max_batch=2, max_seq_len=160, block_size=32, options={"threads": 2})
    core = EngineCore(create_backend("torch", spec), FakeTokenizer(),
                      SchedulerConfig(prefill_chunk=32, prefix_cache=prefix_cache))
    return Generator(core)


def test_salted_outputs_are_bit_identical_to_a_run_without_the_cache() -> None:
    rng = random.Random(3)
    system = [rng.randrange(3, 200) for _ in range(70)]
    question = [rng.randrange(3, 200) for _ in range(9)]
    runs = [("a", SamplingParams(max_new_tokens=6, ignore_eos=True)),
            ("a", SamplingParams(max_new_tokens=6, ignore_eos=True)),
            ("b", SamplingParams(temperature=0.9, seed=7, max_new_tokens=6, logprobs=2,
                                 ignore_eos=True)),
            ("b", SamplingParams(temperature=0.9, seed=7, max_new_tokens=6, logprobs=2,
                                 ignore_eos=True)),
            (None, SamplingParams(max_new_tokens=6, ignore_eos=True))]
    outs = {}
    for cached in (False, True):
        gen = _torch_generator(cached)
        try:
            outs[cached] = [gen.generate([system + question],
                                         dataclasses.replace(p, cache_salt=salt))[0]
                            for salt, p in runs]
        finally:
            gen.backend.close()
    assert [o.cached_tokens for o in outs[False]] == [0] * 5
    assert [o.cached_tokens for o in outs[True]] == [0, 64, 0, 64, 0]
    for cold, warm in zip(outs[False], outs[True], strict=True):
        assert warm.token_ids == cold.token_ids and warm.logprobs == cold.logprobs
