"""The tt backend's features (logprobs, prompt logprobs, penalties, logit_bias, min_tokens, token
masks) against the torch backend on the same small random model.

The tt logits are bf16 (the torch backend's here fp32), so values are compared within BF16_ATOL
and token choices teacher-forced: the torch backend is fed the tt backend's tokens, so both hold
the same history (penalty counts included), and each tt greedy choice must be torch's, or within
bf16 rounding of torch's best (a near tie)."""

from __future__ import annotations

import dataclasses
from concurrent.futures import Future

import numpy as np
import pytest
import torch
from hf_reference import hf_model, state_dict
from tt_helpers import MESH_CONFIG, TT_CONFIGS

from llm.backends.torch.runner import TorchBackend
from llm.backends.tt.runner import TTBackend
from llm.engine.contract.backend import DecodeInput, PrefillInput, SequenceSampling
from llm.engine.contract.sampling_params import SamplingParams
from llm.engine.contract.structured import TokenMasks
from llm.model.checkpoint.common import Checkpoint
from llm.model.config import RuntimeConfig

# logprobs from bf16 logits (|logits| < 8 here: bf16 steps of 2^-5) against fp32: measured up to
# 0.03; twice that
BF16_ATOL = 0.06
STEPS = 6


def _pages(slot: int) -> list[int]:
    return [1 + 3 * slot, 2 + 3 * slot, 3 + 3 * slot]


@pytest.fixture(scope="module")
def backends():
    """(tt backend, torch backend) on the same llama_gqa weights, 4 slots, 96 tokens."""
    torch.set_num_threads(1)
    config = TT_CONFIGS["llama_gqa"]
    ck = Checkpoint(config, state_dict(hf_model(config)), source=None)
    rt = RuntimeConfig(max_batch=4, max_seq_len=96, block_size=32)
    tt = TTBackend(ck, rt, implementation="emulator")
    yield tt, TorchBackend(ck, rt)
    tt.close()


def run(backend, users, steps: int = STEPS, forced=None, masks=None):
    """Prefill user i (prompt, SequenceSampling) into slot i, then decode all together.
    forced: per user, the tokens to feed instead of the backend's own; masks(step) -> the
    TokenMasks of a step (step 0 is the prefill; None: unmasked). Returns (tokens per user,
    StepOutput of each step per user)."""
    outs, seqs = [], []
    for slot, (prompt, s) in enumerate(users):
        targets = prompt[1:] if s.params.prompt_logprobs is not None else None
        allowed = masks(0, [slot]) if masks else None
        out = backend.prefill_step(PrefillInput(slot, prompt, 0, _pages(slot), s, targets,
                                                allowed))
        outs.append([out])
        seqs.append([forced[slot][0] if forced else out.tokens[0]])
    slots = list(range(len(users)))
    for t in range(steps):
        out = backend.decode_step(DecodeInput(
            slots, [q[-1] for q in seqs], [len(users[u][0]) + t for u in slots],
            [_pages(u) for u in slots], [u[1] for u in users],
            masks(t + 1, slots) if masks else None))
        for u in slots:
            outs[u].append(out)
            seqs[u].append(forced[u][t + 1] if forced else out.tokens[u])
    return seqs, outs


def _lp(out, u):
    """User u's TokenLogprobs in a step output (prefill outputs hold one user)."""
    return out.logprobs[u] if len(out.tokens) > 1 else out.logprobs[0]


def assert_close_logprobs(got, want) -> None:
    """tt TokenLogprobs vs torch's at the same position: shared alternatives within BF16_ATOL,
    and every alternative clear of the last one by more than 2 BF16_ATOL in both lists."""
    a, b = dict(got.top), dict(want.top)
    assert len(a) == len(b)
    for tok in a.keys() & b.keys():
        assert a[tok] == pytest.approx(b[tok], abs=BF16_ATOL), (tok, got, want)
    for mine, other in ((a, b), (b, a)) if a else ():
        edge = min(mine.values())
        clear = {t for t, v in mine.items() if v > edge + 2 * BF16_ATOL}
        assert clear <= other.keys(), (got, want)
    if got.token == want.token:
        assert got.logprob == pytest.approx(want.logprob, abs=BF16_ATOL)
    elif got.token in b:  # a sampled row chose differently: its logprob among torch's
        assert got.logprob == pytest.approx(b[got.token], abs=BF16_ATOL)


def assert_greedy_as_torch(tt_out, torch_out, u: int) -> None:
    """tt's greedy token is torch's, or torch's logprob of it is within bf16 of its best."""
    mine, theirs = tt_out.tokens[u if len(tt_out.tokens) > 1 else 0], _lp(torch_out, u)
    if mine != theirs.token:
        assert dict(theirs.top).get(mine, -1e9) >= theirs.logprob - BF16_ATOL, (mine, theirs)


def test_logprobs_and_prompt_logprobs_match_torch(backends) -> None:
    tt, ref = backends
    prompt = [(7 * i + 3) % 300 for i in range(40)]  # 39 prompt targets: two tiles
    users = [(prompt, SequenceSampling(SamplingParams(logprobs=5, prompt_logprobs=3), 0)),
             ([11] * 37, SequenceSampling(SamplingParams(temperature=0.8, logprobs=20), 3)),
             ([2, 4, 6], SequenceSampling(SamplingParams(logprobs=0), 0)),
             ([9, 8], SequenceSampling(SamplingParams(temperature=1.0, seed=5), 5))]
    seqs, outs = run(tt, users)
    assert tt.decoder.mode == "logprobs+exact" and "logprobs+exact" in tt.decoder.traces
    _, want = run(ref, users, forced=seqs)
    got_prompt, want_prompt = outs[0][0].prompt_logprobs, want[0][0].prompt_logprobs
    assert [p.token for p in got_prompt] == prompt[1:]
    for g, w in zip(got_prompt, want_prompt, strict=True):
        assert len(g.top) == 3
        assert_close_logprobs(g, w)
        # bf16 logits reorder near-ties: the rank within a few percent (exact: test_tt_sampling)
        assert abs(g.rank - w.rank) <= max(2, w.rank // 25), (g, w)
        if g.top[0][0] == g.token and g.top[1][1] < g.logprob:
            assert g.rank == 1
    for u in range(3):
        for step in range(STEPS + 1):
            g, w = _lp(outs[u][step], u), _lp(want[u][step], u)
            assert g.token == seqs[u][step] and len(g.top) == users[u][1].params.logprobs
            if users[u][1].params.greedy:
                assert_greedy_as_torch(outs[u][step], want[u][step], u)
            assert_close_logprobs(g, w)
    assert outs[3][0].logprobs is None and outs[3][1].logprobs[3] is None
    # a greedy choice's logprob is its top-1; a sampled one's equals its entry among the top 20
    for s in range(STEPS + 1):
        assert _lp(outs[0][s], 0).top[0] == (seqs[0][s], _lp(outs[0][s], 0).logprob)
        lp = _lp(outs[1][s], 1)
        assert dict(lp.top).get(lp.token, lp.logprob) == pytest.approx(lp.logprob, abs=1e-5)


def test_logprobs_do_not_change_the_tokens(backends) -> None:
    """The full path draws as the plain sampler and argmax do: same seed, same tokens; and its
    untraced run gives the traced one's tokens and logprobs."""
    tt, _ = backends
    plain = [([5, 9, 33], SequenceSampling(SamplingParams(temperature=0.9, top_k=20), 77)),
             ([3, 1, 4, 1, 5], SequenceSampling(SamplingParams(), 0))]
    asked = [(p, SequenceSampling(SamplingParams(temperature=s.params.temperature,
                                                 top_k=s.params.top_k, logprobs=2), s.seed))
             for p, s in plain]
    base, _ = run(tt, plain)
    seqs, outs = run(tt, asked)
    assert seqs == base
    eager = TTBackend(Checkpoint(tt.config, state_dict(hf_model(tt.config)), source=None),
                      tt.runtime, implementation="emulator", trace=False)
    seqs2, outs2 = run(eager, asked)
    eager.close()
    assert seqs2 == seqs
    for u in range(2):
        assert [_lp(o, u) for o in outs2[u]] == [_lp(o, u) for o in outs[u]]


PENALIZED = {
    "presence_frequency": SamplingParams(presence_penalty=1.5, frequency_penalty=1.0),
    "repetition": SamplingParams(repetition_penalty=2.5),
    "negative_frequency": SamplingParams(frequency_penalty=-1.5),
    "logit_bias": SamplingParams(logit_bias=((17, 8.0), (40, 6.0))),
}


@pytest.mark.parametrize("name", sorted(PENALIZED))
def test_penalties_change_greedy_tokens_as_torch(backends, name: str) -> None:
    """Greedy users with a penalty beside plain ones: each tt token is the torch backend's
    (teacher-forced, up to bf16 near ties), and differs from the unpenalized run somewhere."""
    tt, ref = backends
    prompts = [[5, 9, 5, 9, 5, 9, 33], [2, 2, 2, 4], [100, 101, 102], [7]]
    params = PENALIZED[name]
    users = [(p, SequenceSampling(params, 0, (2,))) for p in prompts[:3]]
    users.append((prompts[3], SequenceSampling(SamplingParams(), 0)))
    seqs, outs = run(tt, users)
    assert tt.decoder.mode == "penalties" and "penalties" in tt.decoder.traces
    plain, _ = run(tt, [(p, SequenceSampling(SamplingParams(), 0)) for p in prompts])
    assert plain[3] == seqs[3]  # the unpenalized user beside them
    assert any(seqs[u] != plain[u] for u in range(3))
    with_lp = [(p, dataclasses.replace(s, params=dataclasses.replace(s.params, logprobs=5)))
               for p, s in users]
    _, want = run(ref, with_lp, forced=seqs)
    for u in range(4):
        for step in range(STEPS + 1):
            assert_greedy_as_torch(outs[u][step], want[u][step], u)


def test_min_tokens_masks_stop_ids_until_reached(backends) -> None:
    """The stop ids (here the plain run's own tokens) cannot be chosen before min_tokens
    tokens, as on torch; from then on they can."""
    tt, ref = backends
    prompt = [4, 8, 15, 16, 23, 42]
    plain, _ = run(tt, [(prompt, SequenceSampling(SamplingParams(), 0))])
    stop = tuple(sorted(set(plain[0][:3])))
    users = [(prompt, SequenceSampling(SamplingParams(min_tokens=4), 0, stop))]
    seqs, outs = run(tt, users)
    assert not set(seqs[0][:4]) & set(stop) and seqs[0] != plain[0]
    s = users[0][1]
    with_lp = [(prompt, dataclasses.replace(s, params=dataclasses.replace(s.params, logprobs=5)))]
    _, want = run(ref, with_lp, forced=seqs)
    for step in range(STEPS + 1):
        assert_greedy_as_torch(outs[0][step], want[0][step], 0)
    bias = SamplingParams(min_tokens=2, logit_bias=((stop[0], 30.0),))
    seqs, _ = run(tt, [(prompt, SequenceSampling(bias, 0, stop))])
    assert stop[0] not in seqs[0][:2] and seqs[0][2] == stop[0]  # forced once min_tokens are met


def _random_masks(vocab: int, seed: int, constrained=(0, 1)):
    """(masks, kept): masks(step, slots) -> the TokenMasks of the step's users in
    `constrained` slots, each allowing a random tenth of the vocabulary (None if none of them is
    in the step); kept[(step, slot)]: the allowed set."""
    gen = torch.Generator().manual_seed(seed)
    kept = {}

    def masks(step: int, slots: list[int]) -> TokenMasks | None:
        rows = [i for i, s in enumerate(slots) if s in constrained]
        if not rows:
            return None
        allowed = torch.rand(len(rows), vocab, generator=gen) < 0.1
        for i, a in zip(rows, allowed):
            kept[(step, slots[i])] = set(torch.nonzero(a).flatten().tolist())
        bits = np.packbits(np.pad(allowed.numpy(), ((0, 0), (0, -vocab % 32))), axis=1,
                           bitorder="little").view(np.int32)
        future = Future()
        future.set_result(bits)
        return TokenMasks(tuple(rows), future)
    return masks, kept


def test_token_masks_constrain_tokens_and_logprobs_as_torch(backends) -> None:
    """Masks on all users but the last (unconstrained): every masked user's token is allowed,
    its logprobs are those of the constrained distribution (as torch's, fewer than k allowed
    alternatives show -inf), and the unconstrained user decodes as without masks."""
    tt, ref = backends
    vocab = tt.config.vocab_size
    users = [([5, 9, 33], SequenceSampling(SamplingParams(logprobs=20), 0)),
             ([7, 7], SequenceSampling(SamplingParams(temperature=1.0, logprobs=3), 9)),
             ([1, 2, 3], SequenceSampling(SamplingParams(), 0))]
    masks, kept = _random_masks(vocab, 0)
    seqs, outs = run(tt, users, masks=masks)
    free, _ = run(tt, [users[2]])
    assert seqs[2] == free[0]
    for step in range(STEPS + 1):
        for u in (0, 1):
            allowed = kept[(step, u)]
            assert seqs[u][step] in allowed
            lp = _lp(outs[u][step], u)
            assert {t for t, v in lp.top if v > float("-inf")} <= allowed
    masks2, _ = _random_masks(vocab, 0)  # the same masks for the torch run
    _, want = run(ref, users, forced=seqs, masks=masks2)
    for u in (0, 1):
        for step in range(STEPS + 1):
            g, w = _lp(outs[u][step], u), _lp(want[u][step], u)
            finite_g = [(t, v) for t, v in g.top if v > float("-inf")]
            finite_w = [(t, v) for t, v in w.top if v > float("-inf")]
            assert len(finite_g) == len(finite_w)
            if u == 0:
                assert_greedy_as_torch(outs[u][step], want[u][step], u)
            assert_close_logprobs(type(g)(g.token, g.logprob, tuple(finite_g)),
                                  type(w)(w.token, w.logprob, tuple(finite_w)))


def test_full_steps_write_nothing_while_the_same_users_continue(backends) -> None:
    """Penalty counts, seeds, positions and min_left advance inside the traced step: once
    the batch is set, a step copies nothing from the host; a new request's admission writes the
    per-slot buffers it changed, once."""
    tt, _ = backends
    users = [([5, 9, 33], SequenceSampling(SamplingParams(frequency_penalty=1.0, min_tokens=3),
                                           0, (2,))),
             ([7, 7, 7], SequenceSampling(SamplingParams(temperature=0.9, repetition_penalty=1.3,
                                                         logprobs=1), 4))]
    inputs, pen = tt.decoder.inputs, tt.model.penalties
    writes = []
    real_step = tt.decoder.step

    def counting_step(*args, **kw):
        before = (inputs.host_writes, pen.host_writes)
        out = real_step(*args, **kw)
        writes.append((inputs.host_writes - before[0], pen.host_writes - before[1]))
        return out

    tt.decoder.step = counting_step
    try:
        run(tt, users)
    finally:
        del tt.decoder.step
    assert writes[0] != (0, 0) and writes[1:] == [(0, 0)] * (STEPS - 1)


def test_a_1x2_mesh_gives_one_device_s_logprobs_and_penalized_tokens() -> None:
    """The full path on a mesh (logits all-gathered, the per-slot buffers replicated): teacher-
    forced with one device's tokens, the same logprobs (within bf16) and greedy choices."""
    config = MESH_CONFIG
    ck = Checkpoint(config, state_dict(hf_model(config)), source=None)
    rt = RuntimeConfig(max_batch=2, max_seq_len=96, block_size=32)
    users = [([5, 9, 5, 9, 33], SequenceSampling(SamplingParams(
                 logprobs=4, repetition_penalty=2.0, frequency_penalty=0.5), 0)),
             ([7, 1, 7], SequenceSampling(SamplingParams(temperature=0.8, logprobs=2), 6))]
    one = TTBackend(ck, rt, implementation="emulator")
    seqs, outs = run(one, users)
    one.close()
    two = TTBackend(ck, rt, mesh="1x2", implementation="emulator")
    _, want = run(two, users, forced=seqs)
    two.close()
    for u in range(2):
        for step in range(STEPS + 1):
            assert_close_logprobs(_lp(outs[u][step], u), _lp(want[u][step], u))
            if u == 0:
                assert_greedy_as_torch(outs[u][step], want[u][step], u)
