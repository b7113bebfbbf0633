"""argmax, topk, sampling and plus_one (reference 7, 3)."""

import pytest
import torch
from emu_helpers import on

import llm.ttnn_emu as ttnn

RM = ttnn.ROW_MAJOR_LAYOUT


def test_argmax(device):
    x = torch.randn(1, 1, 32, 100)
    x[0, 0, 3, 7] = x[0, 0, 3, 9] = 50.0  # tie: first index
    out = ttnn.argmax(on(device, x, layout=RM), dim=3)
    assert out.dtype == ttnn.uint32 and out.layout == RM
    got = ttnn.to_torch(out).to(torch.int64)
    assert torch.equal(got, torch.argmax(x.bfloat16().float(), dim=3))
    assert got[0, 0, 3] == 7
    pre = on(device, torch.zeros(1, 1, 32), ttnn.uint32, RM)
    r = ttnn.argmax(on(device, x, layout=RM), dim=3, output_tensor=pre)
    assert r is pre and torch.equal(ttnn.to_torch(pre).to(torch.int64), got)
    with pytest.raises(TypeError):
        ttnn.argmax(on(device, x, layout=RM), dim=3, use_multicore=True)
    with pytest.raises(RuntimeError, match="dtype"):
        ttnn.argmax(on(device, x, ttnn.bfloat8_b), dim=3)


def test_topk(device):
    x = torch.randn(1, 1, 32, 128)
    vals, idx = ttnn.topk(on(device, x), k=8)
    ref_v, ref_i = torch.topk(x.bfloat16().float(), 8)
    assert idx.dtype == ttnn.uint16 and vals.dtype == ttnn.bfloat16
    assert torch.equal(ttnn.to_torch(vals).float(), ref_v)
    assert torch.equal(ttnn.to_torch(idx).to(torch.int64), ref_i)
    labels = torch.arange(128).expand(1, 1, 32, 128) + 1000
    _, lab = ttnn.topk(on(device, x, ttnn.float32), k=8,
                       indices_tensor=on(device, labels, ttnn.uint32))
    assert lab.dtype == ttnn.uint32
    assert torch.equal(ttnn.to_torch(lab).to(torch.int64), torch.topk(x, 8).indices + 1000)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        ttnn.topk(on(device, torch.randn(1, 1, 5, 64)), k=4)


def _sampling_inputs(device, users=4, width=64, k=32, p=1.0, temp=1.0):
    vals = torch.randn(1, 1, users, width)
    idx = torch.randint(0, 50000, (1, 1, users, width))
    tk = on(device, torch.full((users,), k), ttnn.int32, RM)
    tp = on(device, torch.full((users,), p), ttnn.bfloat16, RM)
    tt = on(device, torch.full((users,), temp), ttnn.bfloat16, RM)
    return vals, idx, on(device, vals), on(device, idx, ttnn.int32, RM), tk, tp, tt


def test_sampling_greedy_and_seeded(device):
    vals, idx, tv, ti, tk1, tp, tt = _sampling_inputs(device, k=1)
    out = ttnn.sampling(tv, ti, tk1, tp, tt, seed=3)
    assert tuple(out.shape) == (1, 1, 1, 4) and out.dtype == ttnn.uint32
    best = torch.argmax(vals.bfloat16().float()[0, 0], -1)
    expect = idx[0, 0, torch.arange(4), best]
    assert torch.equal(ttnn.to_torch(out).to(torch.int64)[0, 0, 0], expect)
    _, _, tv, ti, tk, tp, tt = _sampling_inputs(device, k=32)
    a = ttnn.to_torch(ttnn.sampling(tv, ti, tk, tp, tt, seed=7)).to(torch.int64)
    b = ttnn.to_torch(ttnn.sampling(tv, ti, tk, tp, tt, seed=7)).to(torch.int64)
    assert torch.equal(a, b)
    ttnn.manual_seed(11, device=device)
    c = ttnn.to_torch(ttnn.sampling(tv, ti, tk, tp, tt)).to(torch.int64)
    ttnn.manual_seed(11, device=device)
    d = ttnn.to_torch(ttnn.sampling(tv, ti, tk, tp, tt)).to(torch.int64)
    assert torch.equal(c, d)


def test_sampling_top_p_and_distribution(device):
    vals, idx, tv, ti, tk, _, tt = _sampling_inputs(device, users=1, k=32)
    tiny_p = on(device, torch.tensor([0.01]), ttnn.bfloat16, RM)
    out = ttnn.sampling(tv, ti, tk, tiny_p, tt, seed=1)
    assert ttnn.to_torch(out).to(torch.int64).item() == idx[0, 0, 0, vals[0, 0, 0].argmax()]
    v = torch.full((1, 1, 1, 32), -1e4)
    v[0, 0, 0, :2] = 0.0  # two equally likely tokens
    i = torch.arange(32).reshape(1, 1, 1, 32)
    tk2 = on(device, torch.tensor([32]), ttnn.int32, RM)
    one = on(device, torch.tensor([1.0]), ttnn.bfloat16, RM)
    ttnn.manual_seed(0, device=device)
    draws = [ttnn.to_torch(ttnn.sampling(on(device, v), on(device, i, ttnn.int32, RM), tk2, one,
                                         one)).to(torch.int64).item() for _ in range(200)]
    assert set(draws) == {0, 1} and 60 < draws.count(0) < 140


def test_sampling_validation(device):
    _, _, tv, ti, tk, tp, tt = _sampling_inputs(device, width=96)
    with pytest.raises(RuntimeError, match="32 \\* 2\\^n"):
        ttnn.sampling(tv, ti, tk, tp, tt)
    _, _, tv, ti, _, tp, tt = _sampling_inputs(device)
    bad_k = on(device, torch.full((4,), 33), ttnn.int32, RM)
    with pytest.raises(RuntimeError, match="1 <= k <= 32"):
        ttnn.sampling(tv, ti, bad_k, tp, tt)


def test_plus_one_in_place(device):
    t = on(device, torch.tensor([3, -1, 0, 9]), ttnn.int32, RM)
    store = t.padded_shards()[0]
    r = ttnn.plus_one(t, skip_negative_entries=True)
    assert r is t and t.padded_shards()[0] is store
    assert ttnn.to_torch(t).tolist() == [4, -1, 1, 10]
    ttnn.plus_one(t)
    assert ttnn.to_torch(t).tolist() == [5, 0, 2, 11]
    with pytest.raises(RuntimeError, match="dtype"):
        ttnn.plus_one(on(device, torch.zeros(4), ttnn.bfloat16, RM))


def test_manual_seed_per_user_cores(device):
    """A seeds tensor with a user_ids tensor seeds each user's core: a user's draw depends on
    its own seed only (the same seed on another core draws the same), and reseeding repeats it."""
    users = 4
    vals = torch.zeros(1, 1, users, 64)  # uniform over 64 candidates: draws spread widely
    idx = torch.arange(64).expand(1, 1, users, 64)
    tv, ti = on(device, vals), on(device, idx, ttnn.int32, RM)
    tk = on(device, torch.full((users,), 32), ttnn.int32, RM)
    one = on(device, torch.ones(users), ttnn.bfloat16, RM)
    ids = on(device, torch.arange(users), ttnn.uint32, RM)

    def draw(seeds):
        ttnn.manual_seed(on(device, torch.tensor(seeds), ttnn.uint32, RM), user_ids=ids)
        return ttnn.to_torch(ttnn.sampling(tv, ti, tk, one, one)).to(torch.int64)[0, 0, 0]

    a = draw([5, 6, 7, 8])
    assert torch.equal(draw([5, 6, 7, 8]), a)
    b = draw([8, 7, 6, 5])
    assert b.tolist() == a.flip(0).tolist()  # the seed decides, not the core
    firsts = {int(draw([s, 0, 0, 0])[0]) for s in range(20)}
    assert len(firsts) > 5  # different seeds, different draws
    with pytest.raises(RuntimeError, match="user_ids"):
        ttnn.manual_seed(on(device, torch.tensor([1]), ttnn.uint32, RM))
    with pytest.raises(RuntimeError, match="UINT32"):
        ttnn.manual_seed(on(device, torch.tensor([1]), ttnn.int32, RM), user_ids=ids)


def test_manual_seed_forms(device):
    """An int seed for the cores listed in a user_ids tensor; UINT32_MAX leaves a core's PRNG
    as it is; sub_core_grids needs enough cores."""
    vals = torch.zeros(1, 1, 2, 64)
    idx = torch.arange(64).expand(1, 1, 2, 64)
    tv, ti = on(device, vals), on(device, idx, ttnn.int32, RM)
    tk = on(device, torch.full((2,), 32), ttnn.int32, RM)
    one = on(device, torch.ones(2), ttnn.bfloat16, RM)
    ids = on(device, torch.arange(2), ttnn.uint32, RM)

    def draw():
        return ttnn.to_torch(ttnn.sampling(tv, ti, tk, one, one)).to(torch.int64)[0, 0, 0]

    ttnn.manual_seed(9, user_ids=ids)
    first, second = draw(), draw()
    assert first[0] == first[1] and second[0] == second[1]  # both cores seeded alike
    ttnn.manual_seed(9, user_ids=ids)
    assert torch.equal(draw(), first)
    ttnn.manual_seed(0xFFFFFFFF, user_ids=ids)  # skipped: each stream goes on
    assert torch.equal(draw(), second)
    grid = ttnn.CoreRangeSet({ttnn.CoreRange(ttnn.CoreCoord(0, 0), ttnn.CoreCoord(0, 0))})
    with pytest.raises(RuntimeError, match="sub_core_grids has 1 cores, 2 needed"):
        ttnn.sampling(tv, ti, tk, one, one, sub_core_grids=grid)
    with pytest.raises(RuntimeError, match="outside 0..31"):
        ttnn.manual_seed(1, device=device, user_ids=40)
