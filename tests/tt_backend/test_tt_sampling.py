"""Sampling on the device (llm/backends/tt/sampling.py) on the emulator: the frequencies of many
draws on fixed logits match softmax of the top-k / top-p filtered logits / T (chi-square, with a
planted wrong distribution that the same test rejects); top_k = 1 and greedy rows give the
argmax; a request's sampled tokens depend on its seed only, whatever else shares the batch, its
slot, or whether decode is traced; the tt backend serves every sampling mode the torch backend
serves."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from hf_reference import hf_model, state_dict
from scipy.stats import chi2
from test_tt_runner import GREEDY
from tt_helpers import MESH_CONFIG, TT_CONFIGS, build_parts, put

from llm.backends.torch.runner import TorchBackend
from llm.backends.tt.inverse_cdf import InverseCdf
from llm.backends.tt.logprobs import LogprobsOps
from llm.backends.tt.mesh import TILE
from llm.backends.tt.runner import TTBackend
from llm.backends.tt.sampling import Sampler, host_inputs
from llm.engine.contract.backend import DecodeInput, PrefillInput, SequenceSampling
from llm.engine.contract.sampling_params import SamplingParams
from llm.model.checkpoint.common import Checkpoint
from llm.model.config import RuntimeConfig

# (temperature, top_k, top_p) per row; top_p values are exact in bf16 (the op's p dtype). The
# draws below pass no `cdf`, so the rows with top_k 0 and 50 take the 32-candidate path here,
# which equals their exact distribution because these logits put no mass (< 1e-11) outside their
# 12 best tokens; their exact path is tested in test_tt_sampling_exact.py.
ROWS = [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.75), (1.0, 8, 0.5), (0.5, 50, 0.875),
        (2.0, 12, 1.0)]
# (temperature, top_k, top_p, min_p): min_p keeps 7 and 6 of the 12 tokens; before top-p (the
# third row: 5 tokens, where top-p on the whole distribution would keep 6)
MIN_P_ROWS = [(1.0, 0, 1.0, 0.1), (0.7, 8, 1.0, 0.05), (1.0, 0, 0.875, 0.1)]
DRAWS = 1200
SIGNIFICANCE = 1e-4  # per row; a correct sampler fails one of the rows with probability ~6e-4


def _logits(vocab: int) -> torch.Tensor:
    """[vocab]: 12 tokens spread over 4 nats at scattered ids, the rest 40 below."""
    x = torch.full((vocab,), -40.0)
    ids = torch.tensor([3, 17, 40, 41, 99, 150, 151, 200, 231, 250, 280, 319])
    x[ids] = torch.linspace(2.0, -2.0, 12)
    return x.bfloat16().float()


def _expected(x: torch.Tensor, temperature: float, top_k: int, top_p: float,
              min_p: float = 0.0) -> torch.Tensor:
    """The torch backend's distribution: x / T without the tokens below min_p times the best
    one's probability, top-k, softmax, then the smallest prefix of mass reaching top_p (the best
    token always kept), renormalised."""
    order = torch.argsort(x, descending=True)
    s = x[order].double() / temperature
    if min_p > 0:
        s[s < s[0] + math.log(min_p)] = float("-inf")
    if top_k > 0:
        s[top_k:] = float("-inf")
    probs = torch.softmax(s, 0)
    keep = (torch.cumsum(probs, 0) - probs) < top_p
    probs = torch.where(keep, probs, 0.0)
    out = torch.zeros_like(probs)
    out[order] = probs / probs.sum()
    return out


def _chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of the counts under probs (cells of expected count < 5 pooled; a draw outside
    the support gives 0)."""
    n = counts.sum()
    if counts[probs == 0].sum() > 0:
        return 0.0
    expect = probs * n
    big = expect >= 5
    obs = torch.cat([counts[big], counts[~big].sum()[None]]).double()
    exp = torch.cat([expect[big], expect[~big].sum()[None]]).double()
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    stat = float(((obs - exp) ** 2 / exp).sum())
    return float(chi2.sf(stat, len(obs) - 1))


@pytest.fixture(scope="module")
def draws():
    """Per row of ROWS (plus a greedy row and a top_k = 1 row): DRAWS tokens drawn by the Sampler
    on the same logits, at DRAWS positions of one seed each."""
    config = TT_CONFIGS["llama_gqa"]
    parts = build_parts(config)
    sampler = Sampler(parts.mesh, parts.cfg)
    x = _logits(config.vocab_size)
    geo = parts.cfg.geo
    tile = torch.zeros(1, 1, TILE, geo.vocab_padded)
    tile[..., :config.vocab_size] = x
    logits = put(parts, tile)
    params = [SamplingParams(temperature=t, top_k=k, top_p=p) for t, k, p in ROWS]
    params += [SamplingParams(), SamplingParams(temperature=0.8, top_k=1)]
    params += [SamplingParams(temperature=t, top_k=k, top_p=p, min_p=m)
               for t, k, p, m in MIN_P_ROWS]
    out = torch.zeros(len(params), DRAWS, dtype=torch.int64)
    for i in range(DRAWS):
        rows = {r: (pr, 1000 + r, i) for r, pr in enumerate(params)}
        drawn = sampler(logits, **sampler.put(host_inputs(rows)))
        out[:, i] = parts.mesh.read(drawn).reshape(-1)[:len(params)].to(torch.int64)
    return x, out


def test_frequencies_match_the_filtered_softmax(draws) -> None:
    x, out = draws
    for r, (t, k, p) in enumerate(ROWS):
        counts = torch.bincount(out[r], minlength=x.numel())
        pv = _chi_square_p_value(counts, _expected(x, t, k, p))
        assert pv > SIGNIFICANCE, (ROWS[r], pv, counts.nonzero().flatten().tolist())


def test_the_statistic_rejects_a_wrong_distribution(draws) -> None:
    """The same counts against a neighbouring distribution (temperature 30% or 2x off, top-p or
    a smaller top-k not applied) are rejected: the test has the power to fail."""
    x, out = draws
    wrong = {0: (1.3, 0, 1.0), 1: (0.7, 6, 1.0), 2: (1.3, 0, 1.0), 3: (1.0, 8, 1.0),
             4: (0.5, 50, 1.0), 5: (4.0, 12, 1.0)}
    for r, (t, k, p) in wrong.items():
        counts = torch.bincount(out[r], minlength=x.numel())
        assert _chi_square_p_value(counts, _expected(x, t, k, p)) < SIGNIFICANCE, ROWS[r]


def test_min_p_rows_match_and_without_min_p_is_rejected(draws) -> None:
    """The 32-candidate path with min_p: the frequencies match the torch backend's min_p
    filter, and the same counts reject the distribution without it."""
    x, out = draws
    first = len(ROWS) + 2
    for i, (t, k, p, m) in enumerate(MIN_P_ROWS):
        counts = torch.bincount(out[first + i], minlength=x.numel())
        assert _chi_square_p_value(counts, _expected(x, t, k, p, m)) > SIGNIFICANCE, m
        assert _chi_square_p_value(counts, _expected(x, t, k, p)) < SIGNIFICANCE, m


def test_rows_without_top_k_or_top_p_sample_the_whole_vocabulary() -> None:
    """top_k = 0 with top_p = 1 draws from softmax over every token (inverse_cdf.py): on logits
    spreading 60% of the mass past the 32 most likely tokens, the frequencies match the whole
    softmax and reject the 32-candidate one; masked (padded) ids are never drawn; a greedy
    neighbour row still draws its argmax."""
    config = TT_CONFIGS["odd_heads"]  # vocab 300, padded to 320
    parts = build_parts(config)
    sampler = Sampler(parts.mesh, parts.cfg)
    ops = LogprobsOps(parts.mesh, parts.cfg, parts.cfg.geo.vocab_padded)
    cdf = InverseCdf(parts.mesh, parts.cfg, parts.cfg.geo.vocab_padded, ops.ones)
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(config.vocab_size, generator=gen) * 0.5).bfloat16().float()
    tile = torch.zeros(1, 1, TILE, parts.cfg.geo.vocab_padded)
    tile[..., :config.vocab_size] = x
    logits = put(parts, tile)
    params = [SamplingParams(temperature=1.0), SamplingParams(temperature=2.0), SamplingParams()]
    n = 800
    out = torch.zeros(len(params), n, dtype=torch.int64)
    for i in range(n):
        rows = {r: (pr, 50 + r, i) for r, pr in enumerate(params)}
        drawn = sampler(logits, **sampler.put(host_inputs(rows)), cdf=cdf)
        out[:, i] = parts.mesh.read(drawn).reshape(-1)[:len(params)].to(torch.int64)
    for r, t in enumerate((1.0, 2.0)):
        whole = torch.softmax(x.double() / t, 0)
        assert float(whole[torch.argsort(x, descending=True)[32:]].sum()) > 0.6
        counts = torch.bincount(out[r], minlength=x.numel())
        assert counts.numel() == x.numel()  # no padded id
        assert _chi_square_p_value(counts, whole) > SIGNIFICANCE, r
        assert _chi_square_p_value(counts, _expected(x, t, 32, 1.0)) < SIGNIFICANCE, r
    assert out[2].eq(int(torch.argmax(x))).all()


def test_prompt_token_ranks_are_exact() -> None:
    """LogprobsOps.below counts, per row, the columns whose fp32 z is below the token's, exactly
    (ties count as not below: vLLM's rank is V_pad less it); padded columns (-inf) are always
    below; the token's z is found by a topk, so no sum rounds it."""
    config = TT_CONFIGS["odd_heads"]  # vocab 300, padded to 320
    parts = build_parts(config)
    width = parts.cfg.geo.vocab_padded
    ops = LogprobsOps(parts.mesh, parts.cfg, width)
    penalties_hot = torch.zeros(1, 1, TILE, width)
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(1, 1, TILE, width, generator=gen) * 3.0 + 1e-3 * torch.arange(width)
    z[..., 100:140] = z[..., 100:101]  # ties with column 100
    z[..., config.vocab_size:] = float("-inf")
    tokens = torch.randint(0, config.vocab_size, (TILE,), generator=gen)
    real = z[0, 0, :, :config.vocab_size]
    tokens[:4] = torch.tensor([100, 120, int(real[2].argmax()), int(real[3].argmin())])
    penalties_hot[0, 0, torch.arange(TILE), tokens] = 1.0
    got = parts.mesh.read(ops.below(put(parts, z, dtype=parts.ttnn.float32),
                                    put(parts, penalties_hot))).float().reshape(TILE)
    zc = z[0, 0, torch.arange(TILE), tokens]  # [32]
    want = (z[0, 0] < zc[:, None]).sum(-1)  # [32]
    assert torch.equal(got.to(torch.int64), want)
    ranks = width - got.to(torch.int64)
    assert ranks[2] == 1 and ranks[3] == config.vocab_size  # the best and the worst token
    for r in (0, 1):  # a token tied with 39 others: the tie's worst rank
        assert ranks[r] == int((real[r] > zc[r]).sum()) + 40


def test_greedy_and_top_k_1_rows_draw_the_argmax(draws) -> None:
    x, out = draws
    best = int(torch.argmax(x))
    assert out[len(ROWS)].eq(best).all() and out[len(ROWS) + 1].eq(best).all()


@pytest.mark.parametrize("mesh", [(1, 2), (1, 8)])
def test_mesh_draws_equal_one_device(mesh) -> None:
    """The vocabulary split over a mesh (all-gathered before the top-k) draws the same tokens as
    one device from the same logits and seeds; the padding columns (vocabulary 300 padded to
    320 / 512) are never drawn, though their logits are the largest."""
    config = replace(MESH_CONFIG, vocab_size=300)
    params = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.8, top_k=4),
              SamplingParams(temperature=1.2, top_p=0.5), SamplingParams()]
    g = torch.Generator().manual_seed(2)  # distinct values, exact in bf16: no top-k ties
    x = torch.stack([torch.randperm(config.vocab_size, generator=g) - 150.0
                     for _ in range(TILE)]) / 32
    got = {}
    for shape in ((1, 1), mesh):
        parts = build_parts(config, shape)
        sampler = Sampler(parts.mesh, parts.cfg)
        tile = torch.full((1, 1, TILE, parts.cfg.geo.vocab_padded), 50.0)
        tile[..., :config.vocab_size] = x
        logits = put(parts, tile, shard_dim=3)
        draws = []
        for i in range(40):
            rows = {r: (pr, 7 + r, i) for r, pr in enumerate(params)}
            drawn = sampler(logits, **sampler.put(host_inputs(rows)))
            draws.append(parts.mesh.read(drawn).reshape(-1)[:len(params)].tolist())
        got[shape] = torch.tensor(draws)
    assert torch.equal(got[mesh], got[(1, 1)])
    assert got[mesh].max() < config.vocab_size and len(set(got[mesh][:, 0].tolist())) > 5


def _backend(trace: bool = True) -> tuple[TTBackend, object]:
    config = TT_CONFIGS["llama_gqa"]
    ck = Checkpoint(config, state_dict(hf_model(config)), source=None)
    rt = RuntimeConfig(max_batch=4, max_seq_len=96, block_size=32)
    return TTBackend(ck, rt, trace=trace, implementation="emulator"), config


def _run(backend, users: dict[int, tuple[list[int], SequenceSampling]], steps: int):
    """Prefill each slot's prompt (its own 3 pages), then decode all slots together."""
    seqs, pos, pages = {}, {}, {}
    for slot, (prompt, s) in users.items():
        pages[slot] = [1 + 3 * slot, 2 + 3 * slot, 3 + 3 * slot]
        seqs[slot] = [backend.prefill(PrefillInput(slot, prompt, 0, pages[slot], s))]
        pos[slot] = len(prompt)
    slots = sorted(users)
    for _ in range(steps):
        nxt = backend.decode(DecodeInput(slots, [seqs[u][-1] for u in slots],
                                         [pos[u] for u in slots], [pages[u] for u in slots],
                                         [users[u][1] for u in slots]))
        for u, t in zip(slots, nxt):
            seqs[u].append(t)
            pos[u] += 1
    return seqs


def test_seeded_tokens_do_not_depend_on_the_batch() -> None:
    """User A's sampled tokens: alone in slot 0; in slot 2 beside a sampling user and a greedy
    user; untraced: all equal. Another seed gives other tokens; top_k = 1 gives the greedy ones."""
    backend, config = _backend()
    a_prompt, b_prompt, c_prompt = [5, 9, 33, 7], [11] * 37, [2, 4, 6, 8, 10]
    a = SequenceSampling(SamplingParams(temperature=1.5, top_p=0.95), 1234)
    b = SequenceSampling(SamplingParams(temperature=0.9, top_k=20), 99)
    steps = 10
    alone = _run(backend, {0: (a_prompt, a)}, steps)[0]
    mixed = _run(backend, {0: (b_prompt, b), 1: (c_prompt, GREEDY), 2: (a_prompt, a)}, steps)
    assert mixed[2] == alone
    untraced, _ = _backend(trace=False)
    assert _run(untraced, {3: (a_prompt, a)}, steps)[3] == alone
    other = SequenceSampling(a.params, 4321)
    assert _run(backend, {0: (a_prompt, other)}, steps)[0] != alone
    greedy = _run(backend, {0: (c_prompt, GREEDY)}, steps)[0]
    assert mixed[1] == greedy  # the greedy user beside two sampling users
    top1 = SequenceSampling(SamplingParams(temperature=0.7, top_k=1), 5)
    assert _run(backend, {1: (c_prompt, top1)}, steps)[1] == greedy
    # a (top_p < 1, no top-k) draws by inverse CDF after the top-p search (thresholds.py)
    assert backend.decoder.traces.keys() == {"greedy", "sample+exact+topp"}


def test_tt_serves_every_sampling_mode_torch_serves() -> None:
    backend, config = _backend()
    ck = Checkpoint(config, state_dict(hf_model(config)), source=None)
    torch_caps = TorchBackend(ck, RuntimeConfig(max_batch=1, max_seq_len=64)).capabilities
    assert torch_caps.sampling <= backend.capabilities.sampling
    for params in (SamplingParams(temperature=1.0), SamplingParams(temperature=0.6, top_k=64),
                   SamplingParams(temperature=1.2, top_p=0.3),
                   SamplingParams(temperature=0.8, top_k=3, top_p=0.9),
                   SamplingParams(temperature=0.8, min_p=0.05)):
        backend.capabilities.check(params, "tt")
