"""The continuous-batching Scheduler on a recording fake backend: admission as soon as a slot
frees, chunked prefill interleaved with decode, queue and page limits, cancellation.
"""

from __future__ import annotations

from array import array

import pytest
from fakes import expected_tokens, fake_parts

from llm.engine.contract.sampling_params import SamplingParams, SamplingParamsError
from llm.engine.paged_kv import OutOfPagesError
from llm.engine.scheduler import QueueFullError, Scheduler, SchedulerConfig
from llm.engine.sequence import RequestError


def make(config: SchedulerConfig | None = None, **parts):
    backend, tok, pages = fake_parts(**parts)
    return Scheduler(backend, tok, pages, config), backend


def run(sched: Scheduler, seqs) -> list[list]:
    """Step until every sequence finished; the events of each step."""
    steps = []
    while any(not s.finished for s in seqs):
        steps.append(sched.step())
        assert len(steps) < 1000
    return steps


def all_free(sched: Scheduler) -> bool:
    a = sched.pages.allocator
    return a.num_free == a.capacity and not sched.active and not sched.waiting


def test_outputs_equal_running_alone_and_pages_freed() -> None:
    sched, _ = make(SchedulerConfig(max_active=3, prefill_chunk=8))
    prompts = [[5, 6, 7], list(range(1, 30)), [9], list(range(40, 60)), [3, 3]]
    lengths = [4, 9, 2, 7, 12]
    seqs = [sched.make_sequence(i, p, SamplingParams(max_new_tokens=n))
            for i, (p, n) in enumerate(zip(prompts, lengths))]
    for s in seqs:
        sched.add(s)
    steps = run(sched, seqs)
    for s, p, n in zip(seqs, prompts, lengths):
        assert s.out.token_ids == expected_tokens(p, n)
        assert s.out.finish_reason == "length"
        final = [e for step in steps for e in step if e.index == s.index and e.finished]
        assert len(final) == 1 and final[0].output is s.out
    assert all_free(sched)


def test_new_request_joins_as_soon_as_a_slot_frees() -> None:
    sched, backend = make(SchedulerConfig(max_active=2))
    short = sched.make_sequence(0, [1, 2], SamplingParams(max_new_tokens=2))
    long_ = sched.make_sequence(1, [3, 4], SamplingParams(max_new_tokens=10))
    late = sched.make_sequence(2, [5, 6], SamplingParams(max_new_tokens=3))
    for s in (short, long_, late):
        sched.add(s)
    sched.step()  # prefill both (first tokens), decode both (second tokens): `short` is done
    assert short.finished and late in sched.waiting and len(sched.active) == 1
    backend.calls.clear()
    sched.step()  # `late` takes the free slot while `long_` keeps decoding in the same step
    assert backend.calls == [("prefill", short.slot, 0, 2), ("decode", (long_.slot, late.slot))]
    run(sched, [long_, late])
    assert late.out.token_ids == expected_tokens([5, 6], 3)
    assert all_free(sched)


def test_long_prompt_is_prefilled_in_chunks_between_decode_steps() -> None:
    sched, backend = make(SchedulerConfig(prefill_chunk=16), max_seq_len=256)
    decoding = sched.make_sequence(0, [7], SamplingParams(max_new_tokens=20))
    sched.add(decoding)
    sched.step()
    long_prompt = list(range(1, 71))  # 70 tokens: chunks of 16, 16, 16, 16, 6
    arriving = sched.make_sequence(1, long_prompt, SamplingParams(max_new_tokens=3))
    sched.add(arriving)
    backend.calls.clear()
    before = len(decoding.out.token_ids)
    for _ in range(5):
        sched.step()
    prefills = [c for c in backend.calls if c[0] == "prefill"]
    assert [(c[2], c[3]) for c in prefills] == [(0, 16), (16, 16), (32, 16), (48, 16), (64, 6)]
    kinds = [c[0] for c in backend.calls]
    assert kinds == ["prefill", "decode"] * 5  # every step also decoded the running user
    assert len(decoding.out.token_ids) == before + 5
    run(sched, [decoding, arriving])
    assert arriving.out.token_ids == expected_tokens(long_prompt, 3)
    assert decoding.out.token_ids == expected_tokens([7], 20)


def test_short_prompts_share_one_prefill_budget_and_chunks_stay_aligned() -> None:
    sched, backend = make(SchedulerConfig(prefill_chunk=16), max_seq_len=256)
    seqs = [sched.make_sequence(i, [i + 1] * n, SamplingParams(max_new_tokens=1))
            for i, n in enumerate([5, 6, 20])]
    for s in seqs:
        sched.add(s)
    sched.step()
    # 5 + 6 fit the budget of 16; the 20-token prompt's first chunk (16) does not: next step
    assert [c[2:] for c in backend.calls if c[0] == "prefill"] == [(0, 5), (0, 6)]
    backend.calls.clear()
    sched.step()
    sched.step()
    assert [c[2:] for c in backend.calls if c[0] == "prefill"] == [(0, 16), (16, 4)]
    assert all(s.finished for s in seqs) and all_free(sched)


def test_first_tokens_are_available_before_the_decode_step_runs() -> None:
    sched, backend = make()
    running = sched.make_sequence(0, [1], SamplingParams(max_new_tokens=5))
    sched.add(running)
    sched.step()
    arriving = sched.make_sequence(1, [2, 3], SamplingParams(max_new_tokens=5))
    sched.add(arriving)
    backend.calls.clear()
    phases = sched.step_phases()
    first = next(phases)
    assert [e.index for e in first] == [1] and backend.calls == [("prefill", 1, 0, 2)]
    second = next(phases)
    assert backend.calls[-1] == ("decode", (0, 1)) and {e.index for e in second} == {0, 1}


def test_queue_limit() -> None:
    sched, _ = make(SchedulerConfig(max_active=1, max_queue=1))
    seqs = [sched.make_sequence(i, [1], SamplingParams(max_new_tokens=2)) for i in range(3)]
    sched.add(seqs[0])
    sched.add(seqs[1])
    with pytest.raises(QueueFullError, match="at capacity"):
        sched.add(seqs[2])
    run(sched, seqs[:2])
    sched.add(seqs[2])  # room again
    run(sched, seqs[2:])
    assert all_free(sched)


def test_request_that_does_not_fit_yet_waits_for_pages() -> None:
    # 4 slots but a pool of 6 usable pages of 8 tokens: one 40-token budget (5 pages) at a time
    sched, backend = make(max_batch=4, num_blocks=7)
    seqs = [sched.make_sequence(i, [i + 1] * 8, SamplingParams(max_new_tokens=32))
            for i in range(3)]
    for s in seqs:
        sched.add(s)
    most_active = 0
    while any(not s.finished for s in seqs):
        sched.step()
        most_active = max(most_active, len(sched.active))
        assert sched.pages.allocator.num_free >= 0
    assert most_active == 1
    assert [s.out.token_ids for s in seqs] == [expected_tokens([i + 1] * 8, 32) for i in range(3)]
    assert all_free(sched)


def test_requests_that_can_never_run_are_refused_up_front() -> None:
    sched, _ = make(max_seq_len=64, num_blocks=4)
    with pytest.raises(OutOfPagesError, match="needs 8 KV pages"):
        sched.make_sequence(0, [1] * 10, SamplingParams(max_new_tokens=200))
    with pytest.raises(RequestError, match="prompt has 64 tokens"):
        sched.make_sequence(0, [1] * 64, SamplingParams())
    with pytest.raises(RequestError, match="outside"):
        sched.make_sequence(0, [1, 100], SamplingParams())
    with pytest.raises(RequestError, match="empty"):
        sched.make_sequence(0, [], SamplingParams())


@pytest.mark.parametrize("bad", [True, -1, 100, 2**63, 2**64, -2**63 - 1, 1.0, "1", None])
def test_bad_token_ids_are_named_whatever_the_rest(bad) -> None:
    """The packed fast path (ints in range) and the slow path that names the bad ids agree: a
    bool, a negative id, one past the vocabulary or beyond 64 bits, a non-int."""
    sched, _ = make()
    with pytest.raises(RequestError, match=rf"token ids \[{bad!r}\] outside \[0, 100\)"):
        sched.make_sequence(0, [5, bad, 7], SamplingParams())
    ok = sched.make_sequence(0, [5, 99, 0], SamplingParams())
    assert ok.packed_prompt == array("q", [5, 99, 0]).tobytes()


def test_cancel_frees_slot_and_pages_active_or_waiting() -> None:
    sched, _ = make(SchedulerConfig(max_active=1))
    running = sched.make_sequence(0, [1, 2, 3], SamplingParams(max_new_tokens=50))
    queued = sched.make_sequence(1, [4], SamplingParams(max_new_tokens=50))
    sched.add(running)
    sched.add(queued)
    sched.step()
    alloc = sched.pages.allocator
    assert running.slot in sched.active and alloc.num_free == alloc.capacity - 7  # 53 tokens
    [ev] = sched.cancel(running)
    assert ev.finished and ev.output.finish_reason == "cancelled"
    assert ev.output.token_ids == running.out.token_ids and len(running.out.token_ids) == 2
    assert sched.cancel(running) == []  # twice: nothing more
    assert sched.cancel(queued)[0].output.finish_reason == "cancelled"
    assert all_free(sched)
    assert sched.step() == []


def test_per_request_sampling_parameters_reach_the_backend() -> None:
    sched, backend = make()
    greedy = SamplingParams(max_new_tokens=3)
    hot = SamplingParams(temperature=0.7, top_k=5, top_p=0.9, seed=11, max_new_tokens=3)
    seqs = [sched.make_sequence(0, [1], greedy), sched.make_sequence(1, [2], hot)]
    for s in seqs:
        sched.add(s)
    run(sched, seqs)
    rows = backend.sampling[0]
    assert [r.params for r in rows] == [greedy, hot] and rows[1].seed == 11


def test_stop_conditions_and_held_back_stop_text() -> None:
    sched, _ = make()
    want = expected_tokens([5], 6)
    stop = f"<{want[2]}><{want[3]}>"
    seq = sched.make_sequence(0, [5], SamplingParams(max_new_tokens=20, stop=(stop,)))
    sched.add(seq)
    events = [e for step in run(sched, [seq]) for e in step]
    assert seq.out.finish_reason == "stop" and stop not in seq.out.text
    assert "".join(e.text for e in events) == seq.out.text == f"<{want[0]}><{want[1]}>"
    eos = sched.make_sequence(1, [5], SamplingParams(max_new_tokens=20,
                                                     stop_token_ids=(want[1],)))
    sched.add(eos)
    run(sched, [eos])
    assert eos.out.token_ids == want[:2] and eos.out.finish_reason == "stop"
    assert all_free(sched)


def test_a_stop_token_at_the_length_limit_is_a_stop() -> None:
    """A stop token that is also the last token allowed ends the request with "stop" and its
    stop_reason, its text left out (vLLM checks the stop conditions before the length since
    late 2025, and OpenAI's "stop" is a natural end); so does a stop string that token
    completes; a plain last token is "length"."""
    sched, _ = make()
    want = expected_tokens([5], 6)
    for i, params in enumerate([SamplingParams(max_new_tokens=2, stop_token_ids=(want[1],)),
                                SamplingParams(max_new_tokens=2, stop=(f"<{want[1]}>",)),
                                SamplingParams(max_new_tokens=2)]):
        seq = sched.make_sequence(i, [5], params)
        sched.add(seq)
        run(sched, [seq])
        assert seq.out.token_ids == want[:2]
        if i < 2:
            assert seq.out.finish_reason == "stop" and seq.out.text == f"<{want[0]}>"
            assert seq.out.stop_reason == (want[1] if i == 0 else f"<{want[1]}>")
        else:
            assert seq.out.finish_reason == "length" and seq.out.stop_reason is None
    assert all_free(sched)


def test_stop_text_included_on_request() -> None:
    """include_stop_str_in_output: the text ends after the stop string that ended it (the first
    complete one; the first of the list where one token completes two that begin at one
    character; held-back text streams with it) or with the stop token's text."""
    sched, _ = make()
    want = expected_tokens([5], 6)
    a, ab = f"<{want[2]}>", f"<{want[2]}><{want[3]}>"
    part = a[:-1]  # completed by the same token as a, beginning where a does
    for stops, shown in (((ab,), ab), ((a, ab), a), ((ab, a), a), ((part, a), part),
                         ((a, part), a)):
        seq = sched.make_sequence(0, [5], SamplingParams(max_new_tokens=20, stop=stops,
                                                         include_stop_str_in_output=True))
        sched.add(seq)
        events = [e for step in run(sched, [seq]) for e in step]
        assert seq.out.finish_reason == "stop"
        assert "".join(e.text for e in events) == seq.out.text == f"<{want[0]}><{want[1]}>{shown}"
    tok = sched.make_sequence(1, [5], SamplingParams(max_new_tokens=20, stop_token_ids=(want[1],),
                                                     include_stop_str_in_output=True))
    sched.add(tok)
    run(sched, [tok])
    assert tok.out.text == f"<{want[0]}><{want[1]}>" and tok.out.finish_reason == "stop"
    assert all_free(sched)
    with pytest.raises(SamplingParamsError, match="skip_special_tokens must be True or False"):
        SamplingParams(skip_special_tokens="no")


def test_engine_failure_fails_requests_frees_pages_and_closes() -> None:
    """A backend error in the engine thread: the waiting client gets EngineClosedError, every
    page is freed, and later submissions are refused (no hang)."""
    import asyncio
    from types import SimpleNamespace

    from llm.engine.async_engine import AsyncEngine, EngineClosedError
    from llm.engine.core import EngineCore

    backend, tok, _ = fake_parts()

    def broken_decode(inp):
        raise RuntimeError("device lost")

    backend.decode = broken_decode
    core = EngineCore(backend, tok)
    pages = core.pages
    model = SimpleNamespace(core=core)
    engine = AsyncEngine(model, SchedulerConfig(max_queue=4))

    async def go() -> None:
        stream = engine.submit([1, 2, 3], SamplingParams(max_new_tokens=5))
        with pytest.raises(EngineClosedError, match="device lost"):
            await stream.result()
        with pytest.raises(EngineClosedError):
            engine.submit([1], SamplingParams())

    asyncio.run(go())
    engine.shutdown()
    assert isinstance(engine.error, RuntimeError) and engine.in_flight == 0
    assert pages.allocator.num_free == pages.allocator.capacity
