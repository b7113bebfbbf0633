"""Requests with n > 1 / best_of in the Scheduler, on the recording fake backend: one prefill for
the group (its last chunk forks the others), the prompt's full pages shared and its last partial
page copied, all slots admitted together, cancellation and completion free every page.
Real backends: test_groups_backends.py.
"""

from __future__ import annotations

import pytest
from fakes import expected_tokens, fake_parts

from llm.engine.contract.sampling_params import SamplingParams, SamplingParamsError, choice_seed
from llm.engine.grammar import GrammarError
from llm.engine.scheduler import Scheduler, SchedulerConfig


def make(**parts) -> tuple[Scheduler, object]:
    backend, tok, pages = fake_parts(block_size=4, **parts)
    return Scheduler(backend, tok, pages, SchedulerConfig(prefill_chunk=8)), backend


def run(sched: Scheduler, seq, add: bool = True) -> None:
    if add:
        sched.add(seq)
    for _ in range(100):
        if all(s.finished for s in seq.group):
            return
        sched.step()
    raise AssertionError("the request did not finish")


def no_leak(sched: Scheduler) -> bool:
    a = sched.pages.allocator
    return (not sched.has_work and a.num_free == a.capacity
            and all(a.refs(p) == 0 for p in range(a.num_blocks))
            and len(sched._free_slots) == sched.max_active)


def test_n_sequences_share_one_prefill_and_the_prompt_pages() -> None:
    sched, backend = make()
    prompt = list(range(1, 11))  # 10 tokens: pages [0, 4), [4, 8) full, [8, 10) partial
    seq = sched.make_sequence(0, prompt, SamplingParams(n=3, max_new_tokens=5, seed=9))
    assert [s.sampling.seed for s in seq.group] == [choice_seed(9, i) for i in range(3)]
    assert len(set(s.sampling.seed for s in seq.group)) == 3
    sched.add(seq)
    sched.step()
    sched.step()  # one prefill chunk per step
    assert len(sched.active) == 3
    prefills = [c for c in backend.calls if c[0] == "prefill"]
    assert [c[2:] for c in prefills] == [(0, 8), (8, 2)]  # the prompt, once
    pages = [sched.pages.pages(s.slot) for s in seq.group]
    assert pages[1][:2] == pages[2][:2] == pages[0][:2]  # full prompt pages shared
    assert len({p[2] for p in pages}) == 3  # each its own copy of the partial page
    copies = [c for c in backend.calls if c[0] == "copy"]
    assert copies == [("copy", ((pages[0][2], pages[1][2]), (pages[0][2], pages[2][2])))]
    assert [sched.pages.allocator.refs(p) for p in pages[0][:2]] == [3, 3]
    run(sched, seq, add=False)
    out = seq.out
    assert [c.choice for c in out.choices] == [0, 1, 2] and out.choices[0] is out
    assert all(c.token_ids == expected_tokens(prompt, 5) for c in out.choices)
    assert no_leak(sched)


def test_a_page_aligned_prompt_needs_no_copy_and_groups_wait_for_enough_slots() -> None:
    sched, backend = make(max_batch=3)
    busy = sched.make_sequence(0, [5, 6], SamplingParams(max_new_tokens=6))
    sched.add(busy)
    sched.step()
    group = sched.make_sequence(1, list(range(1, 9)), SamplingParams(n=3, max_new_tokens=2))
    sched.add(group)
    sched.step()
    assert group in sched.waiting  # 2 free slots, 3 needed: waits
    while not busy.finished:
        sched.step()
    run(sched, group, add=False)
    assert not [c for c in backend.calls if c[0] == "copy"]  # 8 tokens: two full pages
    assert all(s.out.token_ids == expected_tokens(list(range(1, 9)), 2) for s in group.group)
    assert no_leak(sched)


def test_a_group_starts_from_a_cached_prefix() -> None:
    sched, backend = make()
    system = list(range(1, 17))  # two full 8-token chunks
    run(sched, sched.make_sequence(0, system + [40, 41], SamplingParams(max_new_tokens=2)))
    seq = sched.make_sequence(1, system + [50, 51, 52], SamplingParams(n=2, max_new_tokens=3))
    sched.add(seq)
    sched.step()
    assert [s.out.cached_tokens for s in seq.group] == [16, 16]
    cached = sched.pages.pages(seq.slot)[:4]
    assert sched.pages.pages(seq.children[0].slot)[:4] == cached
    assert [sched.pages.allocator.refs(p) for p in cached] == [2] * 4
    run(sched, seq, add=False)
    assert all(s.out.token_ids == expected_tokens(system + [50, 51, 52], 3) for s in seq.group)
    assert no_leak(sched) and sched.pages.allocator.num_cached >= 4


def test_cancelling_a_group_frees_every_sequence() -> None:
    sched, _ = make()
    seq = sched.make_sequence(0, list(range(1, 11)), SamplingParams(n=2, max_new_tokens=20))
    sched.add(seq)
    sched.step()
    sched.step()
    events = sched.cancel(seq.children[0])  # any member cancels the request
    assert [(e.choice, e.choice_finish, e.finished) for e in events] == [
        (0, "cancelled", False), (1, "cancelled", True)]  # each choice's end; the last ends it
    assert [s.out.finish_reason for s in seq.group] == ["cancelled", "cancelled"]
    assert sched.cancel(seq) == [] and no_leak(sched)


def test_a_cancelled_group_streams_every_choice_to_its_end() -> None:
    """Text held back for a stop string, and its tokens' ids, reach each choice's last event
    when the request is cancelled: over its events every choice streams all its tokens."""
    sched, _ = make()
    params = SamplingParams(n=2, max_new_tokens=20, stop=["a stop string no fake token makes"])
    seq = sched.make_sequence(0, list(range(1, 11)), params)
    sched.add(seq)
    streamed: dict[int, list[int]] = {0: [], 1: []}
    texts: dict[int, str] = {0: "", 1: ""}
    for _ in range(4):
        for ev in sched.step():
            streamed[ev.choice] += ev.token_ids
            texts[ev.choice] += ev.text
    events = sched.cancel(seq)
    for ev in events:
        streamed[ev.choice] += ev.token_ids
        texts[ev.choice] += ev.text
    for s in seq.group:
        assert streamed[s.out.choice] == s.out.token_ids and len(s.out.token_ids) >= 4
        assert texts[s.out.choice] == s.out.text
    assert events[-1].finished and no_leak(sched)


def test_too_many_sequences_and_best_of_without_logprobs_are_refused_by_name() -> None:
    sched, _ = make(max_batch=2)
    with pytest.raises(SamplingParamsError, match="n=3 sequences run in 3 batch slots") as e:
        sched.make_sequence(0, [1, 2], SamplingParams(n=3))
    assert e.value.param == "n"
    with pytest.raises(SamplingParamsError, match="best_of=2 is not supported") as e:
        sched.make_sequence(0, [1, 2], SamplingParams(best_of=2))  # the fake has no logprobs
    assert e.value.param == "best_of"
    with pytest.raises(SamplingParamsError, match="best_of=1 must be >= n=2"):
        SamplingParams(n=2, best_of=1)
    with pytest.raises(SamplingParamsError, match="n must be >= 1"):
        SamplingParams(n=0)


class _Grammar:
    """A stand-in token-mask state: complete after `stop_after` tokens, or failing at token
    `fail_at` (the scheduler fails the request alone)."""

    def __init__(self, stop_after: int | None = None, fail_at: int | None = None) -> None:
        self.taken, self.stop_after, self.fail_at = 0, stop_after, fail_at

    @property
    def stopped(self) -> bool:
        return self.stop_after is not None and self.taken >= self.stop_after

    def consume(self, token: int) -> None:
        self.taken += 1
        if self.taken == self.fail_at:
            raise GrammarError("guided_regex: the grammar failed", "guided_regex")

    def fill(self, row) -> None:
        row[:] = -1


def test_a_choice_failing_after_another_ended_fails_the_request() -> None:
    """Choice 0 completes its grammar, then choice 1's fails: the request's output (choice 0's)
    carries the failure, and each choice ends once."""
    sched, _ = make()
    seq = sched.make_sequence(0, list(range(1, 6)), SamplingParams(n=2, max_new_tokens=20))
    seq.group[0].grammar, seq.group[1].grammar = _Grammar(stop_after=2), _Grammar(fail_at=4)
    sched.add(seq)
    ends = []
    while sched.has_work:
        ends += [(ev.choice, ev.choice_finish, ev.finished, ev.output) for ev in sched.step()
                 if ev.choice_finish is not None]
    assert [e[:3] for e in ends] == [(0, "stop", False), (1, "error", True)]
    out = ends[-1][3]
    assert out.error is not None and out.error.param == "guided_regex"
    assert [c.finish_reason for c in out.choices] == ["stop", "error"] and no_leak(sched)

