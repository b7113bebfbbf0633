"""Penalties, logit_bias, min_tokens and log probabilities of the torch backend, against an
independent reference: transformers' logits (a full forward per step), Hugging Face's
RepetitionPenaltyLogitsProcessor, OpenAI's presence / frequency penalties written out plainly,
and torch.log_softmax. Batch invariance and the once-only counting of a recomputed step; CUDA
graphs against eager where CUDA is present.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from hf_reference import SMALL_CONFIGS, hf_model, state_dict
from transformers import RepetitionPenaltyLogitsProcessor

from llm.backends.torch.runner import TorchBackend
from llm.backends.torch.sampling import SamplingTensors, sample
from llm.engine.contract.backend import DecodeInput, PrefillInput, SequenceSampling
from llm.engine.contract.outputs import TokenLogprobs
from llm.engine.contract.sampling_params import SamplingParams
from llm.engine.paged_kv import PageTable, PageTableSpec
from llm.model.checkpoint.common import Checkpoint
from llm.model.config import RuntimeConfig

CONFIG = SMALL_CONFIGS["llama_gqa"]
PROMPTS = [[5, 6, 7, 8, 9, 5, 6], list(range(10, 47)), [3, 200, 3]]
STEPS = 12


@pytest.fixture(scope="module")
def hf():
    return hf_model(CONFIG)


def _backend(hf, device: str = "cpu", cuda_graphs: bool = True) -> TorchBackend:
    rt = RuntimeConfig(device=device, max_batch=4, max_seq_len=96, block_size=16)
    return TorchBackend(Checkpoint(CONFIG, state_dict(hf), source=None), rt,
                        cuda_graphs=cuda_graphs)


def run(backend: TorchBackend, prompts: list[list[int]], sampling: list[SequenceSampling],
        steps: int = STEPS, chunk: int = 16, repeat_step: int | None = None):
    """Prefill each prompt (in chunks) into slot i, decode all together; per user: tokens,
    their TokenLogprobs (or None) and the prompt's (or None). repeat_step: run that decode step
    twice, as the CUDA-graph pipeline recomputes a step whose batch changed."""
    rt = backend.runtime
    pages = PageTable(PageTableSpec(rt.total_blocks, rt.block_size, rt.blocks_per_seq),
                      rt.max_batch)
    toks, lps, prompt_lps = [], [], []
    for slot, (p, s) in enumerate(zip(prompts, sampling)):
        pages.reserve(slot, len(p) + steps)
        got = []
        for start in range(0, len(p), chunk):
            n = min(chunk, len(p) - start)
            targets = p[start + 1:start + n + 1] if s.params.prompt_logprobs is not None else None
            out = backend.prefill_step(PrefillInput(slot, p[start:start + n], start,
                                                    pages.row(slot), s, targets))
            got += out.prompt_logprobs or []
        toks.append([out.tokens[0]])
        lps.append([out.logprobs[0]] if out.logprobs else [None])
        prompt_lps.append(got if s.params.prompt_logprobs is not None else None)
    slots = list(range(len(prompts)))
    for t in range(steps - 1):
        inp = DecodeInput(slots, [o[-1] for o in toks], [len(p) + t for p in prompts],
                          pages.table(slots), sampling)
        if t == repeat_step:
            backend.decode_step(inp)
        out = backend.decode_step(inp)
        for i in slots:
            toks[i].append(out.tokens[i])
            lps[i].append(out.logprobs[i] if out.logprobs else None)
    return toks, lps, prompt_lps


def processed(logits: torch.Tensor, prompt: list[int], generated: list[int],
              p: SamplingParams, stop_ids: tuple[int, ...]) -> torch.Tensor:
    """The reference: what the sampler picks from, given the model's logits [V]."""
    x = logits.clone().double()
    for token, bias in p.logit_bias:
        x[token] += bias
    if len(generated) < p.min_tokens:
        x[list(stop_ids)] = float("-inf")
    if p.repetition_penalty != 1.0:
        ids = torch.tensor([prompt + generated])
        x = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(ids, x[None])[0]
    for token, count in Counter(generated).items():
        x[token] -= p.frequency_penalty * count + p.presence_penalty
    return x


def reference(hf, prompt: list[int], s: SequenceSampling, steps: int = STEPS):
    """Tokens and TokenLogprobs by transformers' logits, the reference penalties and the same
    counter-based sampler (its noise depends only on seed and position)."""
    p = s.params
    generated: list[int] = []
    lps = []
    for _ in range(steps):
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + generated])).logits[0, -1]  # [V]
        x = processed(logits, prompt, generated, p, s.stop_ids).float()
        st = SamplingTensors.build([p], [s.seed], "cpu")
        token = int(sample(x[None], st, torch.tensor([len(prompt) + len(generated)]))[0])
        lp = torch.log_softmax(x / (p.temperature or 1.0), -1)
        values, ids = lp.topk(p.logprobs or 0)
        lps.append((TokenLogprobs(token, float(lp[token]), tuple(zip(ids.tolist(),
                                                                      values.tolist()))), lp))
        generated.append(token)
    return generated, lps


def assert_logprobs_close(got: list[TokenLogprobs],
                          want: list[tuple[TokenLogprobs, torch.Tensor]]) -> None:
    """Equal within float tolerance; the top lists may order near-ties differently, so each
    alternative is checked against the reference's whole distribution [V]."""
    assert len(got) == len(want)
    for g, (w, full) in zip(got, want):
        assert g.token == w.token
        assert g.logprob == pytest.approx(w.logprob, abs=2e-4)
        assert len(g.top) == len(w.top) and len({t for t, _ in g.top}) == len(g.top)
        assert [v for _, v in g.top] == pytest.approx([v for _, v in w.top], abs=2e-4)
        assert [v for _, v in g.top] == pytest.approx([float(full[t]) for t, _ in g.top],
                                                      abs=2e-4)


CASES = {
    "repetition": SamplingParams(repetition_penalty=1.8, logprobs=3),
    "repetition_below_1": SamplingParams(repetition_penalty=0.6, logprobs=0),
    "presence_frequency": SamplingParams(presence_penalty=1.5, frequency_penalty=0.7, logprobs=5),
    "negative_frequency": SamplingParams(frequency_penalty=-1.2, logprobs=2),
    "logit_bias": SamplingParams(logit_bias={17: 100.0, 40: 6.5, 3: -100.0}, logprobs=4),
    "min_tokens": SamplingParams(min_tokens=8, logprobs=1),
    "sampled_all": SamplingParams(temperature=0.8, top_k=40, seed=3, presence_penalty=0.5,
                                  frequency_penalty=0.3, repetition_penalty=1.2,
                                  logit_bias={9: 2.0}, min_tokens=4, logprobs=20),
}


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="CUDA is not available"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_penalties_and_logprobs_match_the_reference(hf, case: str, device: str) -> None:
    """On CUDA: the fused penalty kernel inside the captured decode graphs."""
    params = CASES[case]
    backend = _backend(hf, device)
    prompt = PROMPTS[0]
    stop = (2,)
    if case == "min_tokens":  # stop on the tokens the model would pick first, unpenalized
        plain = reference(hf, prompt, SequenceSampling(SamplingParams(), 0))[0]
        stop = tuple(sorted(set(plain[:3])))
    s = SequenceSampling(params, params.seed or 0, stop)
    want_tokens, want_lps = reference(hf, prompt, s)
    toks, lps, _ = run(backend, [prompt], [s])
    assert toks[0] == want_tokens
    assert_logprobs_close(lps[0], want_lps)
    if case == "min_tokens":
        assert not set(toks[0][:8]) & set(stop)


def test_logprobs_without_penalties_and_prompt_logprobs_in_chunks(hf) -> None:
    """Greedy tokens are transformers' argmax; prompt logprobs equal log_softmax of its logits
    over the whole prompt, whether the prompt is prefilled whole or in chunks of 16."""
    prompt = PROMPTS[1]
    s = SequenceSampling(SamplingParams(logprobs=5, prompt_logprobs=3), 0)
    with torch.no_grad():
        lp = torch.log_softmax(hf(torch.tensor([prompt])).logits[0].double(), -1)  # [S, V]
    want = []
    for i, token in enumerate(prompt[1:]):
        values, ids = lp[i].topk(3)
        want.append((TokenLogprobs(token, float(lp[i, token]),
                                   tuple(zip(ids.tolist(), values.tolist()))), lp[i]))
    backend = _backend(hf)
    for chunk in (16, 64):
        toks, lps, prompt_lps = run(backend, [prompt], [s], chunk=chunk)
        assert_logprobs_close(prompt_lps[0], want)
        want_tokens, want_lps = reference(hf, prompt, s)
        assert toks[0] == want_tokens
        assert_logprobs_close(lps[0], want_lps)


def test_batch_invariance_and_repeated_step(hf) -> None:
    """A request's tokens and logprobs are the same alone and next to others (plain, penalized,
    sampled), and when a decode step is run twice (its generated token is counted once)."""
    backend = _backend(hf)
    a = SequenceSampling(CASES["sampled_all"], 3, (2,))
    b = SequenceSampling(SamplingParams(), 0, (2,))
    c = SequenceSampling(SamplingParams(frequency_penalty=2.0, logit_bias={5: -3.0},
                                        logprobs=1), 0, (2,))
    alone_t, alone_l, _ = run(backend, [PROMPTS[0]], [a])
    for others in ([b], [b, c], [c]):
        toks, lps, _ = run(backend, [PROMPTS[0], *PROMPTS[1:1 + len(others)]], [a, *others],
                           repeat_step=4)
        assert toks[0] == alone_t[0]
        for g, w in zip(lps[0], alone_l[0], strict=True):
            assert g.token == w.token and g.logprob == pytest.approx(w.logprob, abs=1e-5)
            assert [t for t, _ in g.top] == [t for t, _ in w.top]
            assert [v for _, v in g.top] == pytest.approx([v for _, v in w.top], abs=1e-5)
        if c in others:  # the neighbour is right too
            i = 1 + others.index(c)
            want_tokens, want_lps = reference(hf, PROMPTS[i], c)
            assert toks[i] == want_tokens
            assert_logprobs_close(lps[i], want_lps)


def test_greedy_with_penalties_is_deterministic(hf) -> None:
    backend = _backend(hf)
    s = SequenceSampling(SamplingParams(repetition_penalty=1.5, presence_penalty=1.0,
                                        logprobs=2), 0, (2,))
    first = run(backend, PROMPTS, [s] * 3)
    assert run(backend, PROMPTS, [s] * 3) == first


def test_uncount_forgets_only_the_discarded_step() -> None:
    """The counts of a step launched ahead and thrown away are undone; a step's counts that are
    not the latest are left alone."""
    from llm.backends.torch.penalties import SlotPenalties

    pen = SlotPenalties(2, 10, torch.device("cpu"), fused=False)
    slots = torch.tensor([0, 1])
    pen.count(slots, torch.tensor([3, 4]), torch.tensor([5, 6]))
    before = pen.counts.clone(), pen.counted.clone()
    pen.count(slots, torch.tensor([7, 4]), torch.tensor([6, 7]))  # the step launched ahead
    assert int(pen.counts[1, 4]) == 2
    pen.uncount(slots, torch.tensor([7, 4]), torch.tensor([6, 7]))
    assert torch.equal(pen.counts, before[0]) and torch.equal(pen.counted, before[1])
    pen.uncount(slots, torch.tensor([3, 4]), torch.tensor([2, 2]))  # not their latest count
    assert torch.equal(pen.counts, before[0]) and torch.equal(pen.counted, before[1])



def test_slot_reuse_skips_neutral_rows_and_resets_the_others() -> None:
    """A plain request in a neutral row launches nothing and its logits stay as they are, even
    over a previous request's counts; a penalized request after it starts from a clean row."""
    from llm.backends.torch.penalties import SlotPenalties

    pen = SlotPenalties(2, 10, torch.device("cpu"), fused=False)
    penalized = SequenceSampling(SamplingParams(presence_penalty=1.0, frequency_penalty=0.5,
                                                repetition_penalty=2.0, logit_bias={1: -3.0},
                                                min_tokens=2), 0, (5,))
    plain = SequenceSampling(SamplingParams(), 0, (5,))
    slot, logits = torch.tensor([0]), torch.linspace(-2.0, 2.0, 10)[None]  # [1, V]
    pen.begin(0, penalized)
    pen.add_prompt(0, penalized, [2, 3], 2)
    pen.count(slot, torch.tensor([4]), torch.tensor([2]))
    assert not torch.equal(pen.apply(logits, slot, torch.tensor([3])), logits)
    pen.begin(0, plain)  # a non-neutral row: reset
    pen.add_prompt(0, plain, [4, 4], 2)
    pen.count(slot, torch.tensor([4]), torch.tensor([2]))  # a full-path batch counts it too
    assert torch.equal(pen.apply(logits, slot, torch.tensor([3])), logits)
    before = [t.clone() for t in (pen.counts, pen.counted, pen.min_pos)]
    pen.begin(0, plain)  # neutral: nothing written, the stale counts are unused
    pen.add_prompt(0, plain, [6], 1)
    assert all(torch.equal(a, b) for a, b in zip(before, (pen.counts, pen.counted, pen.min_pos)))
    assert torch.equal(pen.apply(logits, slot, torch.tensor([1])), logits)
    fresh = SlotPenalties(2, 10, torch.device("cpu"), fused=False)
    for p in (pen, fresh):  # a penalized request after them sees none of their counts
        p.begin(0, penalized)
        p.add_prompt(0, penalized, [2], 1)
    assert torch.equal(pen.apply(logits, slot, torch.tensor([1])),
                       fresh.apply(logits, slot, torch.tensor([1])))


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")


def _same(got: tuple, want: tuple) -> None:
    """Two backends' `run` results: equal tokens, logprobs within float tolerance."""
    assert got[0] == want[0]
    for g_user, w_user in zip(got[1], want[1], strict=True):
        for g, w in zip(g_user, w_user, strict=True):
            assert (g is None) == (w is None)
            if g is not None:
                assert g.token == w.token and g.logprob == pytest.approx(w.logprob, abs=1e-4)
                assert [v for _, v in g.top] == pytest.approx([v for _, v in w.top], abs=1e-4)


@CUDA
def test_cuda_graph_full_path_equals_eager(hf) -> None:
    """Penalized, logprobs and plain users in one captured batch (3 users, bucket 4), with a
    step run twice (the pipeline's recompute); then a plain batch, which takes the plain graph."""
    graphs, eager = _backend(hf, "cuda"), _backend(hf, "cuda", cuda_graphs=False)
    assert graphs.graphs is not None and eager.graphs is None
    assert {(4, False, True), (4, True, True), (4, True, False)} <= set(graphs.graphs.graphs)
    mixed = [SequenceSampling(CASES["sampled_all"], 3, (2,)),
             SequenceSampling(SamplingParams(), 0, (2,)),
             SequenceSampling(CASES["presence_frequency"], 0, (2,))]
    for sampling in (mixed, [SequenceSampling(SamplingParams(), 0, (2,))] * 3):
        _same(run(graphs, PROMPTS, sampling, repeat_step=3),
              run(eager, PROMPTS, sampling, repeat_step=3))
    stats = graphs.graphs.stats
    assert stats["ahead_hits"] > 0


def _churn(backend: TorchBackend) -> list[tuple[list[int], list]]:
    """Penalized users leaving and joining mid-way under the pipelined decode."""
    rt = backend.runtime
    pages = PageTable(PageTableSpec(rt.total_blocks, rt.block_size, rt.blocks_per_seq),
                      rt.max_batch)
    pen = SequenceSampling(CASES["sampled_all"], 3, (2,))
    rep = SequenceSampling(CASES["repetition"], 0, (2,))
    users: dict[int, tuple[list[int], SequenceSampling, list[int], list]] = {}
    done = []

    def join(slot: int, prompt: list[int], s: SequenceSampling) -> None:
        pages.reserve(slot, len(prompt) + 30)
        out = backend.prefill_step(PrefillInput(slot, prompt, 0, pages.row(slot), s))
        users[slot] = (prompt, s, [out.tokens[0]], list(out.logprobs or [None]))

    for slot, (p, s) in enumerate(zip(PROMPTS, (pen, rep, pen))):
        join(slot, p, s)
    for step in range(20):
        if step == 6:
            prompt, _, toks, lps = users.pop(0)
            done.append((toks, lps))
            pages.release(0)
        if step == 9:
            join(0, [7, 7, 7, 1, 2], rep)
        active = sorted(users)
        out = backend.decode_step(DecodeInput(
            active, [users[s][2][-1] for s in active],
            [len(users[s][0]) + len(users[s][2]) - 1 for s in active], pages.table(active),
            [users[s][1] for s in active]))
        for i, s in enumerate(active):
            users[s][2].append(out.tokens[i])
            users[s][3].append(out.logprobs[i])
    return done + [(users[s][2], users[s][3]) for s in sorted(users)]


@CUDA
def test_pipelined_graph_decode_with_penalized_users_leaving_and_joining(hf) -> None:
    graphs, eager = _backend(hf, "cuda"), _backend(hf, "cuda", cuda_graphs=False)
    got, want = _churn(graphs), _churn(eager)
    for (gt, gl), (wt, wl) in zip(got, want, strict=True):
        _same(([gt], [gl]), ([wt], [wl]))
