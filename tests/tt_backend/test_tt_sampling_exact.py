"""Exact top-k > 32 and top-p on the tt backend (thresholds.py, inverse_cdf.py) on the emulator: the
kept sets equal the torch backend's filter row for row; many draws match the filtered softmax
(chi-square) on logits with most of the mass past the 32 best tokens, where the 32-candidate
path is rejected by the same statistic; a row's tokens depend on its seed only, whatever the batch
and trace variant; traced == untraced; greedy and top_k = 1 rows take argmax's first index on
ties even when ttnn.topk orders tied candidates otherwise."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from test_tt_sampling import SIGNIFICANCE, _backend, _chi_square_p_value, _expected, _run
from tt_helpers import TT_CONFIGS, build_parts, put

from llm.backends.tt.inverse_cdf import InverseCdf
from llm.backends.tt.logprobs import LogprobsOps
from llm.backends.tt.mesh import TILE
from llm.backends.tt.sampling import Sampler, filters_for, host_inputs
from llm.backends.tt.thresholds import Filters
from llm.engine.contract.backend import SequenceSampling
from llm.engine.contract.sampling_params import SamplingParams

CONFIG = TT_CONFIGS["odd_heads"]  # vocab 300, padded to 320
# (temperature, top_k, top_p): top-k past 32, top-p without top-k, and both
SETTINGS = [(1.0, 40, 1.0), (0.8, 100, 1.0), (1.0, 0, 0.5), (1.2, 0, 0.9), (1.0, 100, 0.9)]
ROWS_PER = 6  # rows of the tile per setting (different seeds): 30 rows, plus 2 argmax rows
CALLS = 100  # draws per row: 600 per setting


@pytest.fixture(scope="module")
def parts():
    p = build_parts(CONFIG)
    width = p.cfg.geo.vocab_padded
    return p, Sampler(p.mesh, p.cfg), InverseCdf(p.mesh, p.cfg, width,
                                                 LogprobsOps(p.mesh, p.cfg, width).ones)


def _flat_logits(seed: int = 0) -> torch.Tensor:
    """[vocab] distinct logits, exact in bf16 (steps of 2^-7 over [-0.34, 2)), at shuffled ids:
    most of the mass lies past the 32 best tokens, and no two tie at a top-k / top-p boundary
    (where the kept set may differ from torch's, thresholds.py)."""
    g = torch.Generator().manual_seed(seed)
    values = (torch.arange(CONFIG.vocab_size) - 44) / 128.0
    return values[torch.randperm(CONFIG.vocab_size, generator=g)]


def _tile(parts, x: torch.Tensor):
    p, _, _ = parts
    tile = torch.zeros(1, 1, TILE, p.cfg.geo.vocab_padded)
    tile[..., :CONFIG.vocab_size] = x
    return put(p, tile)


def _draw(parts, logits, rows: dict, exact: bool = True) -> torch.Tensor:
    """One call of the Sampler: rows maps a tile row to (params, seed, position) -> [32] ids."""
    p, sampler, cdf = parts
    filters = filters_for(pr for pr, _, _ in rows.values()) if exact else None
    drawn = sampler(logits, **sampler.put(host_inputs(rows)),
                    cdf=cdf if filters else None, filters=filters)
    return p.mesh.read(drawn).reshape(-1).to(torch.int64)


def _row_params(with_min_p: bool) -> list[SamplingParams]:
    """32 rows mixing top-k (0, past 32), top-p and, with_min_p, min_p (0 to 1)."""
    if not with_min_p:
        ks, ps = (0, 40, 100, 33, 250, 300, 64), (1.0, 0.5, 0.9, 0.3, 0.99)
        return [SamplingParams(temperature=1.0, top_k=ks[r % 7], top_p=ps[r % 5])
                for r in range(TILE)]
    ks, ps, ms = (0, 40, 100, 33), (1.0, 0.5, 0.9), (0.0, 0.01, 0.1, 0.3, 1.0)
    return [SamplingParams(temperature=1.0, top_k=ks[r % 4], top_p=ps[r % 3], min_p=ms[r % 5])
            for r in range(TILE)]


@pytest.mark.parametrize("with_min_p", [False, True])
def test_kept_sets_equal_the_torch_filter(parts, with_min_p) -> None:
    """Row for row, the tokens the searches keep are the torch backend's set (on random logits
    with distinct values, masked padding), and their weights exp(z - m): top-k / top-p, and with
    min_p first (the tokens below min_p times the best one's probability dropped, then top-k and
    top-p over what is left; rows with min_p 0 keep their top-k / top-p sets)."""
    p, _, cdf = parts
    ttnn, width, vocab = p.ttnn, p.cfg.geo.vocab_padded, CONFIG.vocab_size
    x = torch.randn(TILE, vocab, generator=torch.Generator().manual_seed(1 + with_min_p)) * 2
    z = torch.full((1, 1, TILE, width), -1e30)
    z[..., :vocab] = x
    params = _row_params(with_min_p)
    host = host_inputs({r: (pr, 0, 0) for r, pr in enumerate(params)})
    filters = filters_for(params)
    assert filters == Filters(top_k=True, top_p=True, min_p=with_min_p)

    def f32(t):
        return put(p, t, dtype=ttnn.float32)
    m = x.max(-1).values.reshape(1, 1, TILE, 1)
    e = cdf.search.weights(f32(z), f32(m), f32(host["bound_k"]), f32(host["bound_p"]), filters,
                           f32(host["min_log"]))
    e = p.mesh.read(e).float().reshape(TILE, width)
    assert e[:, vocab:].eq(0).all()
    for r, pr in enumerate(params):
        want = _expected(x[r], 1.0, pr.top_k, pr.top_p, pr.min_p) > 0
        assert torch.equal(e[r, :vocab] > 0, want), (pr, int(want.sum()), int((e[r] > 0).sum()))
        assert torch.allclose(e[r, :vocab][want], torch.exp(x[r] - x[r].max())[want])


def test_min_p_decode_traced_equals_untraced() -> None:
    """A min_p user beside a top-p one replays "sample+exact+minp+topp": the untraced backend's
    tokens, and the user's tokens alone."""
    backend, _ = _backend()
    a = SequenceSampling(SamplingParams(temperature=1.5, min_p=0.2), 31)
    b = SequenceSampling(SamplingParams(temperature=1.0, top_p=0.9), 32)
    users = {0: ([5, 9, 33, 7], a), 3: ([11] * 37, b)}
    traced = _run(backend, users, 6)
    assert backend.decoder.mode == "sample+exact+minp+topp"
    assert _run(_backend(trace=False)[0], users, 6) == traced
    assert _run(backend, {1: ([5, 9, 33, 7], a)}, 6)[1] == traced[0]


@pytest.fixture(scope="module")
def draws(parts):
    """SETTINGS x ROWS_PER rows (each its own seed), a greedy and a top_k = 1 row: CALLS
    draws each on the same flat logits, through the exact path and the 32-candidate path."""
    x = _flat_logits()
    logits = _tile(parts, x)
    params = [SamplingParams(temperature=t, top_k=k, top_p=q)
              for t, k, q in SETTINGS for _ in range(ROWS_PER)]
    params += [SamplingParams(), SamplingParams(temperature=0.9, top_k=1)]
    exact = torch.zeros(len(params), CALLS, dtype=torch.int64)
    old = torch.zeros(len(params), CALLS, dtype=torch.int64)
    for i in range(CALLS):
        rows = {r: (pr, 300 + r, i) for r, pr in enumerate(params)}
        exact[:, i] = _draw(parts, logits, rows)[:len(params)]
        old[:, i] = _draw(parts, logits, rows, exact=False)[:len(params)]
    return x, exact, old


def _counts(x, out, s: int) -> torch.Tensor:
    rows = out[s * ROWS_PER:(s + 1) * ROWS_PER].reshape(-1)
    return torch.bincount(rows, minlength=x.numel())


def test_draws_match_the_filtered_softmax(draws) -> None:
    """Each setting's 600 draws match softmax of the torch-filtered logits / T, and reject the
    32-candidate distribution (top-k capped at 32, top-p over the 32 best)."""
    x, exact, _ = draws
    for s, (t, k, q) in enumerate(SETTINGS):
        want = _expected(x, t, k, q)
        assert float(want[torch.argsort(x, descending=True)[32:]].sum()) > 0.1, SETTINGS[s]
        counts = _counts(x, exact, s)
        assert _chi_square_p_value(counts, want) > SIGNIFICANCE, (SETTINGS[s], counts)
        capped = _expected(x, t, min(k, 32) if k else 32, q)
        assert _chi_square_p_value(counts, capped) < SIGNIFICANCE, SETTINGS[s]
    best = int(torch.argmax(x))
    assert exact[-2].eq(best).all() and exact[-1].eq(best).all()


def test_the_32_candidate_path_fails_the_same_test(draws) -> None:
    """The same rows routed to the old 32-candidate path (no inverse-CDF draw): rejected."""
    x, _, old = draws
    for s, (t, k, q) in enumerate(SETTINGS):
        rows = old[s * ROWS_PER:(s + 1) * ROWS_PER].reshape(-1)
        counts = torch.bincount(rows, minlength=x.numel())
        assert _chi_square_p_value(counts, _expected(x, t, k, q)) < SIGNIFICANCE, SETTINGS[s]


def test_a_rows_tokens_do_not_depend_on_the_batch(parts) -> None:
    """A top_k = 40 row drawn alone in row 0 ("+exact+topk"), in row 7 beside top-p, whole-
    vocabulary, 32-candidate and greedy rows ("+exact+topk+topp"): the same tokens."""
    logits = _tile(parts, _flat_logits(3))
    mine = SamplingParams(temperature=1.0, top_k=40)
    others = {0: SamplingParams(temperature=1.0, top_p=0.6), 1: SamplingParams(temperature=0.7),
              2: SamplingParams(temperature=1.0, top_k=8), 3: SamplingParams()}
    assert filters_for([mine]) == Filters(top_k=True)
    assert filters_for([mine, *others.values()]) == Filters(top_k=True, top_p=True)
    alone, mixed = [], []
    for i in range(12):
        alone.append(int(_draw(parts, logits, {0: (mine, 11, i)})[0]))
        rows = {r: (pr, 50 + r, i) for r, pr in others.items()} | {7: (mine, 11, i)}
        mixed.append(int(_draw(parts, logits, rows)[7]))
    assert alone == mixed and len(set(alone)) > 4


def test_traced_equals_untraced_and_alone() -> None:
    """Decode through the backend: users with top_k = 50 and top_p = 0.8 (no top-k) replay
    "sample+exact+topk+topp"; the tokens equal the untraced backend's, and a user's equal its
    tokens alone ("sample+exact+topp")."""
    backend, _ = _backend()
    a = SequenceSampling(SamplingParams(temperature=1.2, top_p=0.8), 21)
    b = SequenceSampling(SamplingParams(temperature=0.9, top_k=50), 22)
    users = {0: ([5, 9, 33, 7], b), 2: ([11] * 37, a)}
    steps = 6
    traced = _run(backend, users, steps)
    assert backend.decoder.mode == "sample+exact+topk+topp"
    assert _run(_backend(trace=False)[0], users, steps) == traced
    assert _run(backend, {1: ([11] * 37, a)}, steps)[1] == traced[2]
    assert {"sample+exact+topk+topp", "sample+exact+topp"} <= backend.decoder.traces.keys()


def _last_first_topk(topk):
    """torch.topk ordering tied values last index first (ttnn.topk's non-stable order is
    arbitrary on hardware: an adversarial but valid order)."""
    def ordered(x, k, dim=-1, largest=True, sorted=True):  # noqa: A002
        n = x.shape[dim]
        key = x.flip(dim) if largest else -x.flip(dim)
        _, order = torch.sort(key, dim=dim, descending=True, stable=True)
        idx = (n - 1 - order).narrow(dim, 0, k)
        return torch.gather(x, dim, idx), idx
    return ordered


def test_ties_at_the_top_give_argmax_first_index(parts, monkeypatch) -> None:
    """Two tokens tie for the maximum: greedy and top_k = 1 rows draw the first of them even
    when ttnn.topk puts the other first."""
    x = _flat_logits(5)
    x[[10, 200]] = float(x.max()) + 1.0
    logits = _tile(parts, x)
    monkeypatch.setattr(torch, "topk", _last_first_topk(torch.topk))
    rows = {0: (SamplingParams(), 1, 0), 1: (SamplingParams(temperature=0.7, top_k=1), 2, 0),
            2: (SamplingParams(temperature=1.0, top_k=2), 3, 0)}
    for i in range(4):
        got = _draw(parts, logits, {r: (pr, s, i) for r, (pr, s, _) in rows.items()})
        assert got[0] == 10 and got[1] == 10 and int(got[2]) in (10, 200)
    p, sampler, _ = parts
    ttnn = p.ttnn
    values, ids = ttnn.topk(logits, k=32, dim=-1, largest=True, sorted=True)
    assert int(p.mesh.read(ids).reshape(TILE, 32)[0, 0]) == 200  # the patch is in effect


def test_the_full_path_filters_exactly_too() -> None:
    """Through logprobs.select (a user asks for logprobs): top_k = 64 and top_p = 0.7 users
    replay "logprobs+exact+topk+topp", traced == untraced, and each user's tokens equal its tokens
    through the plain sampling path (the same filtered distribution and stream)."""
    plain = {0: SamplingParams(temperature=1.1, top_k=64), 1: SamplingParams(temperature=0.9,
                                                                               top_p=0.7)}
    prompts = {0: [5, 9, 33, 7], 1: [11] * 37}
    full = {u: SequenceSampling(replace(p, logprobs=2), 40 + u) for u, p in plain.items()}
    backend, _ = _backend()
    traced = _run(backend, {u: (prompts[u], s) for u, s in full.items()}, 5)
    assert backend.decoder.mode == "logprobs+exact+topk+topp"
    untraced = _run(_backend(trace=False)[0], {u: (prompts[u], s) for u, s in full.items()}, 5)
    assert untraced == traced
    sampled = _run(backend, {u: (prompts[u], SequenceSampling(p, 40 + u))
                             for u, p in plain.items()}, 5)
    assert sampled == traced and len(set(traced[0] + traced[1])) > 4
