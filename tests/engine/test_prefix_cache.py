"""The prefix cache in the Scheduler, on the recording fake backend: which pages a request starts
with (whole prefill chunks, before its last prompt token), which pages are registered (those of
full prefill chunks only), admission that counts shared pages once, eviction of unheld pages
only, and no page leaked. Bit-identity on real backends: test_prefix_cache_identity.py.
"""

from __future__ import annotations

from array import array

from fakes import FakeBackend, expected_tokens, fake_parts

from llm.engine.contract.backend import PrefillInput
from llm.engine.contract.sampling_params import SamplingParams
from llm.engine.metrics import ServingMetrics
from llm.engine.prefix_cache import PrefixCachePolicy
from llm.engine.scheduler import Scheduler, SchedulerConfig

CHUNK = 8  # prefill chunk; the fake's pages hold 4 tokens


class CachedRecorder(FakeBackend):
    """The fake backend, also recording the `cached` tokens of each prefill call."""

    def prefill(self, inp: PrefillInput) -> int:
        self.cached.append(list(inp.cached))
        return super().prefill(inp)


def make(prefix_cache: bool = True, **parts) -> tuple[Scheduler, CachedRecorder]:
    fake, tok, pages = fake_parts(block_size=4, **parts)
    backend = CachedRecorder(fake.runtime)
    backend.cached = []
    config = SchedulerConfig(max_active=4, prefill_chunk=CHUNK, prefix_cache=prefix_cache)
    return Scheduler(backend, tok, pages, config, ServingMetrics()), backend


def run(sched: Scheduler, prompts: list[list[int]], max_new: int = 3) -> list:
    seqs = [sched.make_sequence(i, p, SamplingParams(max_new_tokens=max_new))
            for i, p in enumerate(prompts)]
    for s in seqs:
        sched.add(s)
    for _ in range(200):
        if all(s.finished for s in seqs):
            break
        sched.step()
    for s, p in zip(seqs, prompts):
        assert s.out.token_ids == expected_tokens(p, max_new)
    return seqs


def no_leak(sched: Scheduler) -> bool:
    a = sched.pages.allocator
    return (not sched.has_work and a.num_unused + a.num_evictable == a.capacity
            and all(a.refs(p) == 0 for p in range(a.num_blocks)))


SYSTEM = list(range(1, 21))  # 20 tokens: chunks [0, 8) and [8, 16) full, [16, 20) not


def test_a_shared_prefix_is_served_in_whole_chunks_and_the_rest_prefilled() -> None:
    sched, backend = make()
    run(sched, [SYSTEM])
    a = sched.pages.allocator
    assert a.num_cached == 4  # pages of the two full chunks; [16, 20) came from a short chunk
    backend.calls.clear()
    backend.cached.clear()
    second, = run(sched, [SYSTEM[:18] + [50, 51, 52]])  # 21 tokens, 18 shared
    assert second.out.cached_tokens == 16
    prefills = [c[2:] for c in backend.calls if c[0] == "prefill"]
    assert prefills == [(16, 5)] and backend.cached == [SYSTEM[:16]]
    short, = run(sched, [SYSTEM[:16]])  # its last token must be computed: one chunk from cache
    assert short.out.cached_tokens == 8
    assert backend.cached[-1] == SYSTEM[:8]
    other, = run(sched, [[99] + SYSTEM[1:]])  # differs in its first page: no hit
    assert other.out.cached_tokens == 0
    m = sched.metrics
    assert m.prompt_tokens == 20 + 21 + 16 + 20 and m.cached_prompt_tokens == 24
    assert "llm_prefix_cache_hit_tokens_total 24" in m.render()
    assert no_leak(sched)


def test_a_multi_turn_chat_reuses_its_earlier_turns() -> None:
    sched, _ = make(max_seq_len=128)
    history = list(range(1, 13))
    cached = []
    for turn in range(4):
        out, = run(sched, [history], max_new=5)
        cached.append(out.out.cached_tokens)
        history = history + out.out.token_ids + [60 + turn] * 6
    # prompts of 12, 23, 34, 45 tokens: the full chunks of the previous prompt are reused
    assert cached == [0, 8, 16, 32]
    assert no_leak(sched)


def test_concurrent_requests_share_pages_and_admission_counts_them_once() -> None:
    # 10 usable pages of 4 tokens; each request's budget is 5 pages (17 + 3 tokens), 4 of them
    # the cached prefix: 3 such requests fit at once only because those 4 are shared
    sched, _ = make(max_seq_len=32, num_blocks=11)
    run(sched, [SYSTEM[:16] + [70]])
    a = sched.pages.allocator
    assert a.num_cached == 4  # [0, 16): two full chunks
    prompts = [SYSTEM[:16] + [80 + i] for i in range(3)]
    seqs = [sched.make_sequence(i, p, SamplingParams(max_new_tokens=3))
            for i, p in enumerate(prompts)]
    for s in seqs:
        sched.add(s)
    sched.step()
    assert len(sched.active) == 3 and all(s.out.cached_tokens == 16 for s in seqs)
    shared = sched.pages.pages(seqs[0].slot)[:4]
    assert all(sched.pages.pages(s.slot)[:4] == shared for s in seqs)
    assert [a.refs(p) for p in shared] == [3] * 4 and a.num_free == 10 - 4 - 3
    # a request needing more pages than are free waits: held pages are never evicted
    big = sched.make_sequence(9, list(range(30, 55)), SamplingParams(max_new_tokens=3))
    sched.add(big)  # 7 pages
    sched.step()
    assert big in sched.waiting and a.num_cached == 4
    while not all(s.finished for s in seqs):
        sched.step()
    keys = sched.prefix.policy.page_keys(SYSTEM[:16])
    assert a.lookup(keys) == shared and a.num_unused == 6
    sched.step()  # `big` is admitted: 6 unused pages, then the deepest cached page is evicted
    assert big.slot >= 0 and a.lookup(keys) == shared[:3]
    while not big.finished:
        sched.step()
    assert no_leak(sched)


def test_cancelling_a_request_drops_its_hold_on_shared_pages() -> None:
    sched, _ = make(max_seq_len=64)
    run(sched, [SYSTEM])
    seqs = [sched.make_sequence(i, SYSTEM + [90 + i] * 12, SamplingParams(max_new_tokens=9))
            for i in range(2)]
    for s in seqs:
        sched.add(s)
    sched.step()
    a = sched.pages.allocator
    shared = sched.pages.pages(seqs[0].slot)[:4]
    assert [a.refs(p) for p in shared] == [2] * 4
    sched.cancel(seqs[0])  # mid-prefill
    assert [a.refs(p) for p in shared] == [1] * 4
    sched.cancel(seqs[1])
    assert no_leak(sched) and a.num_cached >= 4


def test_prefix_cache_off_computes_every_prompt() -> None:
    sched, backend = make(prefix_cache=False)
    run(sched, [SYSTEM, SYSTEM])
    assert backend.cached == [[], [], [], [], [], []]  # 3 chunks per prompt, none cached
    assert sched.pages.allocator.num_cached == 0 and no_leak(sched)
    assert sched.metrics.cached_prompt_tokens == 0


def test_policy_keys_chain_and_hits_align_to_chunks_and_pages() -> None:
    policy = PrefixCachePolicy(block_size=4, prefill_chunk=6)  # hits in multiples of 12
    keys = policy.page_keys(list(range(10)))
    assert len(keys) == 2 and keys == policy.page_keys(list(range(8)))
    assert policy.page_keys(range(10), array("q", range(10)).tobytes()) == keys  # packed given
    assert policy.page_keys([9] + list(range(1, 8)))[1] != keys[1]  # the chain carries page 0
    assert PrefixCachePolicy(4, 8).page_keys(list(range(8))) != keys  # another chunk size
    assert policy.usable_pages(prompt_len=30, cached_pages=5) == 3  # 20 -> 12 tokens
    assert policy.usable_pages(prompt_len=12, cached_pages=3) == 0  # the last token is computed
    assert policy.usable_pages(prompt_len=25, cached_pages=6) == 6  # 24 tokens
    assert policy.registrable_pages(prefilled=12, chunk_len=6) == 3
    assert policy.registrable_pages(prefilled=14, chunk_len=2) == 0  # after a short chunk
