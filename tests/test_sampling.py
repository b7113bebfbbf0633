"""Sampling parameters validation and on-device token selection."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from llm.backends.torch.sampling import SamplingTensors, column_hashes, draw_whole_rows, sample
from llm.engine.contract.sampling_params import SamplingParams, SamplingParamsError


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": -0.1}, "temperature must be in"),
    ({"temperature": float("nan")}, "temperature must be a finite number"),
    ({"temperature": float("inf")}, "temperature must be a finite number"),
    ({"temperature": "hot"}, "temperature must be a finite number"),
    ({"temperature": 10**400}, "temperature must be a finite number"),
    ({"logit_bias": {5: -10**400}}, "logit_bias[5] must be a finite number"),
    ({"top_p": 0.0}, "top_p must be in (0.0, 1.0]"),
    ({"top_p": 1.5}, "top_p must be in"),
    ({"top_k": -1}, "top_k must be >= 0"),
    ({"top_k": 2.5}, "top_k must be an integer"),
    ({"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
    ({"max_new_tokens": True}, "max_new_tokens must be an integer"),
    ({"seed": 2**63}, "seed must be < 2**63"),
    ({"seed": -2**63 - 1}, "seed must be >= "),
    ({"stop": ["ok", ""]}, "stop strings must be non-empty"),
    ({"stop": None}, "stop must be a string or a list of strings, got None"),
    ({"stop_token_ids": None}, "stop_token_ids must be a list of ints, got None"),
    ({"stop_token_ids": [-1]}, "stop_token_ids entry must be >= 0"),
    ({"logprobs": 21}, "logprobs must be at most 20"),
    ({"logprobs": -1}, "logprobs must be >= 0"),
    ({"prompt_logprobs": 1.5}, "prompt_logprobs must be an integer"),
    ({"presence_penalty": 2.5}, "presence_penalty must be in [-2.0, 2.0]"),
    ({"frequency_penalty": float("nan")}, "frequency_penalty must be a finite number"),
    ({"repetition_penalty": 0.0}, "repetition_penalty must be in [1e-30, 1e+30]"),
    ({"repetition_penalty": 1e308}, "repetition_penalty must be in [1e-30, 1e+30]"),
    ({"repetition_penalty": 1e-40}, "repetition_penalty must be in [1e-30, 1e+30]"),
    ({"logit_bias": {"12": 1.0}}, "logit_bias key '12' is not a token id"),
    ({"logit_bias": {-3: 1.0}}, "logit_bias key -3 is not a token id"),
    ({"logit_bias": {5: 101}}, "logit_bias[5] must be in [-100.0, 100.0]"),
    ({"logit_bias": 7}, "logit_bias must map token ids to numbers"),
    ({"min_tokens": -1}, "min_tokens must be >= 0"),
    ({"min_p": 1.5}, "min_p must be in [0.0, 1.0]"),
    ({"min_p": -0.1}, "min_p must be in"),
    ({"min_p": float("nan")}, "min_p must be a finite number"),
    ({"skip_special_tokens": "yes"}, "skip_special_tokens must be True or False"),
    ({"include_stop_str_in_output": 1}, "include_stop_str_in_output must be True or False"),
    ({"min_tokens": 9, "max_new_tokens": 8}, "min_tokens=9 exceeds max_new_tokens=8"),
])
def test_invalid_params_name_the_argument(kwargs, message) -> None:
    with pytest.raises(SamplingParamsError) as e:
        SamplingParams(**kwargs)
    assert message in str(e.value)
    assert e.value.param == ("min_tokens" if "min_tokens" in kwargs else next(iter(kwargs)))


def test_penalty_params_are_kept_normalised() -> None:
    p = SamplingParams(logit_bias={9: 1, 3: -2.5}, presence_penalty=0.5)
    assert p.logit_bias == ((3, -2.5), (9, 1.0)) and p.penalized
    assert p == SamplingParams(logit_bias=[(9, 1.0), (3, -2.5)], presence_penalty=0.5)
    assert not SamplingParams(logprobs=3).penalized
    for kwargs in ({"repetition_penalty": 1.1}, {"frequency_penalty": -1}, {"min_tokens": 1}):
        assert SamplingParams(**kwargs).penalized


def test_stop_accepts_a_single_string() -> None:
    assert SamplingParams(stop="\n").stop == ("\n",)


def _tensors(params: list[SamplingParams], seeds: list[int]) -> SamplingTensors:
    return SamplingTensors.build(params, seeds, "cpu")


def test_greedy_is_argmax() -> None:
    logits = torch.randn(4, 50)
    st = _tensors([SamplingParams()] * 4, [0] * 4)
    assert torch.equal(sample(logits, st, torch.arange(4)), logits.argmax(-1))
    # the general path with temperature 0 rows gives argmax too
    assert torch.equal(sample(logits, st, torch.arange(4), all_greedy=False), logits.argmax(-1))


def test_seeded_rows_do_not_depend_on_batch_company() -> None:
    torch.manual_seed(0)
    logits = torch.randn(5, 100)
    params = [SamplingParams(temperature=0.9, top_p=0.95, top_k=40, seed=s) for s in range(5)]
    params[2] = SamplingParams()  # one greedy user in the batch
    pos = torch.tensor([3, 17, 4, 99, 0])
    together = sample(logits, _tensors(params, [p.seed or 0 for p in params]), pos)
    for i in range(5):
        alone = sample(logits[i:i + 1], _tensors([params[i]], [params[i].seed or 0]), pos[i:i + 1])
        assert int(alone) == int(together[i])
    assert int(together[2]) == int(logits[2].argmax())


def test_rows_without_top_k_or_top_p_skip_the_sort_with_the_same_tokens() -> None:
    """A batch where no row uses top-k / top-p is not sorted (SamplingTensors.filtered False);
    its rows draw what they draw sorted, in a batch beside a top-p row; bf16-rounded logits
    (ties) included, a top_p of 1.0 keeps every token either way."""
    torch.manual_seed(1)
    logits = torch.cat([torch.randn(4, 3000), torch.randn(4, 3000).bfloat16().float()]) * 3
    plain = [SamplingParams(temperature=t, min_p=m, top_p=1.0) for t in (0.5, 1.0, 2.0, 0.8)
             for m in (0.0, 0.05)]
    seeds, pos = list(range(8)), torch.arange(8) * 11
    st = _tensors(plain, seeds)
    assert not st.filtered
    unsorted = sample(logits, st, pos)
    assert sample(logits, dataclasses.replace(st, filtered=True), pos).tolist() == \
        unsorted.tolist()
    mixed = plain[:7] + [SamplingParams(temperature=0.8, top_p=0.5)]
    st_mixed = _tensors(mixed, seeds)
    assert st_mixed.filtered
    assert sample(logits, st_mixed, pos)[:7].tolist() == unsorted[:7].tolist()


@pytest.mark.parametrize("scale", [1.0, 4.0, 40.0])
def test_the_row_draw_equals_the_whole_row_definition(scale) -> None:
    """The CPU's draw over the tokens that can win equals the torch ops over whole rows
    (`draw_whole_rows`, what the GPU kernel computes) for every mode: flat and peaked rows,
    bf16-rounded values (ties at the top-k boundary), rows with masked (-inf) tokens."""
    g = torch.Generator().manual_seed(int(scale))
    modes = [SamplingParams(temperature=0.8), SamplingParams(temperature=1.0, top_p=0.9),
             SamplingParams(temperature=0.7, top_k=5), SamplingParams(temperature=1.2, top_k=300),
             SamplingParams(temperature=1.0, min_p=0.1), SamplingParams(temperature=0.9, top_p=0.5,
                                                                        top_k=40, min_p=0.02),
             SamplingParams(temperature=2.0, top_k=2000, top_p=0.95)]
    n = 12 * len(modes)
    logits = torch.randn(n, 3000, generator=g) * scale
    logits[::3] = logits[::3].bfloat16().float()
    logits[1::4, ::7] = float("-inf")
    params = [modes[i % len(modes)] for i in range(n)]
    st = _tensors(params, list(range(n)))
    pos = torch.arange(n) * 13
    x = logits / st.temperature[:, None]
    want = draw_whole_rows(x, st, pos).tolist()
    assert sample(logits, st, pos).tolist() == want
    # with the vocabulary's column hashes held (as the torch backend holds them on the CPU)
    held = dataclasses.replace(st, col_hash=column_hashes(3000, "cpu"))
    assert sample(logits, held, pos).tolist() == want
    wrong = dataclasses.replace(st, col_hash=column_hashes(2999, "cpu"))  # not this vocabulary
    assert sample(logits, wrong, pos).tolist() == want


@pytest.mark.parametrize("scale", [3.0, 8.0])
def test_the_row_draw_skips_only_tokens_that_cannot_win(scale) -> None:
    """The CPU draw cuts below the best token's score less the largest noise, and scores a token
    more than _FAR below it only if its noise can exceed _FAR: many rows whose tokens spread over
    that band (thousands of candidates), plain, with a tiny min_p (the anchor's cut first), with
    top-p 0.999 and top-k 4000 (sorted candidates, then pruned): the same tokens as the torch
    ops over whole rows."""
    g = torch.Generator().manual_seed(int(scale))
    modes = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, min_p=1e-9),
             SamplingParams(temperature=1.0, top_p=0.999), SamplingParams(temperature=1.3,
                                                                         top_k=4000)]
    n = 24 * len(modes)
    logits = torch.randn(n, 6000, generator=g) * scale
    logits[::5, :40] += 6 * scale  # a few strong tokens over the bulk
    logits[1::6, ::11] = float("-inf")
    params = [modes[i % len(modes)] for i in range(n)]
    st = dataclasses.replace(_tensors(params, list(range(100, 100 + n))),
                             col_hash=column_hashes(6000, "cpu"))
    pos = torch.arange(n) * 7 + 3
    want = draw_whole_rows(logits / st.temperature[:, None], st, pos).tolist()
    assert sample(logits, st, pos).tolist() == want
    assert sample(logits, dataclasses.replace(st, col_hash=None), pos).tolist() == want


def test_a_top_k_of_one_beside_plain_sampled_rows_is_its_argmax() -> None:
    """top_k 1 with a temperature is greedy, yet the sampler sees its temperature: the batch
    must be sorted for it (found by review: unsorted, it drew from the whole row)."""
    torch.manual_seed(0)
    logits = torch.randn(2, 50)
    params = [SamplingParams(temperature=1.0, top_k=1), SamplingParams(temperature=1.0)]
    st = _tensors(params, [1, 2])
    assert st.filtered
    for step in range(50):
        pos = torch.tensor([step, step])
        assert sample(logits, st, pos)[0] == torch.argmax(logits[0])
        assert draw_whole_rows(logits / st.temperature[:, None], st, pos)[0] == \
            torch.argmax(logits[0])


def test_a_row_of_nans_gets_its_argmax_not_an_error() -> None:
    """A broken row (NaN logits) in a sampled batch: no error, the other rows sample as usual
    (on the CPU; the GPU's sorted path gives another token of the broken row)."""
    logits = torch.randn(2, 300)
    logits[0] = float("nan")
    st = _tensors([SamplingParams(temperature=0.8, top_p=0.9)] * 2, [1, 2])
    pos = torch.tensor([4, 5])
    got = sample(logits, st, pos)
    assert got[0] == torch.argmax(logits[0]) and got[1] == sample(logits[1:], _tensors(
        [SamplingParams(temperature=0.8, top_p=0.9)], [2]), pos[1:])[0]


def test_a_row_with_positive_infinity_gets_its_first_infinity() -> None:
    """Overflowed logits (+inf) in a sampled row: its first +inf token, as the whole-row
    definition's fallback picks it (min_p's floor would be inf - inf there), never an error."""
    logits = torch.randn(3, 300)
    logits[0, [7, 40]] = float("inf")
    logits[1, :] = float("-inf")  # every token masked: its argmax, 0
    st = _tensors([SamplingParams(temperature=0.8), SamplingParams(temperature=1.0, min_p=0.1),
                   SamplingParams(temperature=0.8)], [1, 2, 3])
    got = sample(logits, st, torch.tensor([4, 5, 6])).tolist()
    assert got[:2] == [7, 0]


def test_logits_over_temperature_that_overflow_draw_as_the_whole_row_definition() -> None:
    """Finite logits whose quotient by the temperature overflows float32 to +inf in several
    places: the first of them, as `draw_whole_rows` gives (was the argmax of the logits, here
    token 20, on the CPU: a mismatch found by a review on 2026-12-05)."""
    logits = torch.randn(2, 300)
    logits[0, 10], logits[0, 20] = 4e33, 5e33
    st = _tensors([SamplingParams(temperature=1e-5), SamplingParams(temperature=0.7)], [1, 2])
    pos = torch.tensor([3, 4])
    x = logits / st.temperature.clamp_min(1e-6)[:, None]
    assert torch.isinf(x[0, [10, 20]]).all()
    got = sample(logits, st, pos)
    assert got.tolist() == draw_whole_rows(x, st, pos).tolist() and int(got[0]) == 10


def _histogram(logits: torch.Tensor, p: SamplingParams, n: int = 20000) -> torch.Tensor:
    """Sample one distribution at n different positions (independent draws of the counter RNG)."""
    st = _tensors([p] * n, [p.seed] * n)
    tokens = sample(logits.expand(n, -1), st, torch.arange(n))
    return torch.bincount(tokens, minlength=logits.shape[-1]).double() / n


def _close(freq: torch.Tensor, probs: torch.Tensor, n: int = 20000) -> None:
    tol = 4 * torch.sqrt(probs * (1 - probs) / n) + 1e-9  # 4 sigma per bin
    assert torch.all((freq - probs).abs() <= tol), (freq, probs)


def test_temperature_sampling_follows_softmax() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    p = SamplingParams(temperature=0.7, seed=123)
    _close(_histogram(logits, p), torch.softmax(logits[0].double() / 0.7, -1))


def test_top_k_and_top_p_truncate_then_renormalise() -> None:
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])
    probs = torch.softmax(logits[0].double(), -1)  # ~[.64, .24, .09, .03, .01]
    topk = probs.clone()
    topk[2:] = 0
    _close(_histogram(logits, SamplingParams(temperature=1.0, top_k=2, seed=5)), topk / topk.sum())
    # top_p=0.9: tokens 0,1 hold 0.88 < 0.9, so token 2 joins; tokens 3,4 are cut.
    nucleus = probs.clone()
    nucleus[3:] = 0
    _close(_histogram(logits, SamplingParams(temperature=1.0, top_p=0.9, seed=6)),
           nucleus / nucleus.sum())


def test_min_p_drops_tokens_below_its_share_of_the_top_one_then_renormalises() -> None:
    """At temperature 0.5 the probabilities are ~[.86, .12, .02, ...]: min_p 0.1 keeps the
    tokens with p >= 0.086 (0 and 1), applied before top-k / top-p (vLLM's order: top_p 0.87
    then keeps token 0 alone, .881 of the renormalised pair, where on the whole distribution
    its .865 would let token 1 in); a min_p that drops nothing samples as min_p 0, draw for
    draw."""
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])
    probs = torch.softmax(logits[0].double() / 0.5, -1)
    kept = probs.clone()
    kept[2:] = 0
    _close(_histogram(logits, SamplingParams(temperature=0.5, min_p=0.1, seed=8)),
           kept / kept.sum())
    _close(_histogram(logits, SamplingParams(temperature=0.5, min_p=0.1, top_p=0.87, seed=9)),
           torch.tensor([1.0, 0, 0, 0, 0], dtype=torch.float64))
    n = 4000
    for p in (SamplingParams(temperature=1.0, seed=3), SamplingParams(temperature=1.0, seed=3,
                                                                        top_k=3, top_p=0.95)):
        off = _tensors([p] * n, [3] * n)
        same = sample(logits.expand(n, -1), off, torch.arange(n))
        on = SamplingParams(**{**p.__dict__, "min_p": 1e-9})  # drops nothing here
        assert torch.equal(sample(logits.expand(n, -1), _tensors([on] * n, [3] * n),
                                  torch.arange(n)), same)


def test_a_top_p_below_float32s_range_keeps_the_top_token() -> None:
    p = SamplingParams(temperature=1.0, top_p=5e-324, seed=7)  # 0.0 in float32
    assert p.top_p == 2.0 ** -24
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])
    _close(_histogram(logits, p), torch.tensor([1.0, 0, 0, 0, 0], dtype=torch.float64))


def test_different_seeds_give_different_streams_and_same_seed_repeats() -> None:
    logits = torch.zeros(1, 1000)
    pos = torch.arange(64)

    def run(seed: int) -> list[int]:
        p = SamplingParams(temperature=1.0, seed=seed)
        return sample(logits.expand(64, -1), _tensors([p] * 64, [seed] * 64), pos).tolist()

    assert run(1) == run(1)
    assert run(1) != run(2)
    assert len(set(run(3))) > 50  # uniform over 1000 tokens: few collisions among 64 draws
    assert math.isclose(SamplingParams(top_k=1, temperature=1.0).greedy, True)


def test_any_int64_seed_samples_reproducibly() -> None:
    """OpenAI's API takes any int64 seed: negative and extreme ones sample like any other,
    reproducibly and differently from each other."""
    torch.manual_seed(0)
    logits = torch.randn(1, 500)
    pos = torch.tensor([7])
    p = SamplingParams(temperature=1.0)
    draws = {}
    for seed in (-1, -2**63, 2**63 - 1, 0, 1):
        SamplingParams(temperature=1.0, seed=seed)  # accepted
        runs = [sample(logits, _tensors([p], [seed]), pos).item() for _ in range(2)]
        assert runs[0] == runs[1]
        draws[seed] = [sample(torch.randn(1, 500, generator=torch.Generator().manual_seed(k)),
                              _tensors([p], [seed]), pos).item() for k in range(8)]
    assert len({tuple(v) for v in draws.values()}) == len(draws)


def test_host_stream_keys_equal_the_tensor_keys() -> None:
    """The CPU draw's per-row keys in Python integers equal `_stream_key`'s int64 tensor ops,
    for extreme, negative and random seeds and positions."""
    from llm.backends.torch.sampling import _stream_key, _stream_keys_host

    g = torch.Generator().manual_seed(0)
    seeds = [0, 1, -1, 2**63 - 1, -2**63, 2**32, 2**32 - 1, -2**32] + torch.randint(
        -2**63, 2**63 - 1, (500,), generator=g).tolist()
    positions = [0, 1, 2**31 - 1, 131071] + torch.randint(
        0, 2**31, (len(seeds) - 4,), generator=g).tolist()
    want = _stream_key(torch.tensor(seeds), torch.tensor(positions)).tolist()
    assert _stream_keys_host(seeds, positions) == want
