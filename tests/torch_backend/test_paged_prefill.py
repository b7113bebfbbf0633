"""The Triton paged prefill attention (a chunk at any start position) against the eager path's
SDPA over the gathered keys with a causal-offset mask (interpreted on CPU, compiled on a GPU),
unsplit and split over the keys (partials merged by the last split of each tile)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="triton is not installed")
from llm.backends.torch.kernels.paged_prefill import (  # noqa: E402
    paged_prefill_attention,
    rows_per_program,
    splits_per_tile,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BF16_ON_GPU = pytest.mark.skipif(DEVICE == "cpu", reason="Triton's CPU interpreter computes "
                                 "bf16 dots wrongly (numpy has no bfloat16); bf16 runs on the GPU")


def _case(nh: int, n_kv: int, hd: int, page: int, start: int, s: int, dtype: torch.dtype,
          seed: int = 0):
    """Pools with the user's K/V at positions [0, start + s) in scattered pages, NaN everywhere
    else the kernel must not read (page 0, the user's slots past the chunk); q [S, nh, hd]."""
    g = torch.Generator().manual_seed(seed)
    num_blocks, max_pages = 40, 12
    k_pool = torch.full((num_blocks, n_kv, page, hd), float("nan"))
    v_pool = torch.full((num_blocks, n_kv, page, hd), float("nan"))
    total = start + s
    used = -(-total // page)
    row = torch.zeros(max_pages, dtype=torch.int32)
    row[:used] = (torch.randperm(num_blocks - 1, generator=g) + 1)[:used].int()
    keys = torch.randn(total, n_kv, hd, generator=g)
    values = torch.randn(total, n_kv, hd, generator=g)
    for p in range(total):
        k_pool[row[p // page], :, p % page] = keys[p]
        v_pool[row[p // page], :, p % page] = values[p]
    q = torch.randn(s, nh, hd, generator=g)
    return (q.to(DEVICE, dtype), k_pool.to(DEVICE, dtype), v_pool.to(DEVICE, dtype),
            row.to(DEVICE))


def _eager(q, k_pool, v_pool, row, start: int, scale: float) -> torch.Tensor:
    """attention.py's continuation path: gather the user's pages, SDPA with the mask
    [S, start + S] (key j visible to query i iff j <= start + i), GQA -> [S, nh, hd]."""
    s, page = q.shape[0], k_pool.shape[2]
    total = start + s
    pages = row[: -(-total // page)].long()

    def gathered(pool: torch.Tensor) -> torch.Tensor:
        x = pool[pages].permute(1, 0, 2, 3)  # [n_kv, nb, page, hd]
        return x.reshape(x.shape[0], -1, x.shape[-1])[None, :, :total]  # [1, n_kv, total, hd]

    pos = torch.arange(start, total, device=q.device)
    mask = torch.arange(total, device=q.device)[None, :] <= pos[:, None]
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], gathered(k_pool),
                                         gathered(v_pool), attn_mask=mask, enable_gqa=True,
                                         scale=scale)  # [1, nh, S, hd]
    return out[0].transpose(0, 1)


def _run(q, k_pool, v_pool, row, start: int, scale: float, **kw) -> torch.Tensor:
    return paged_prefill_attention(q, k_pool, v_pool, row,
                                   torch.tensor([start], device=DEVICE), scale, **kw)


@pytest.mark.parametrize("nh, n_kv, hd, page", [
    (4, 4, 64, 16),   # MHA (GQA ratio 1)
    (8, 2, 64, 8),    # group 4, pages smaller than a key block
    (6, 2, 128, 16),  # group 3 (rows past 5 tokens x 3 heads idle), head_dim 128
])
@pytest.mark.parametrize("start, s", [(0, 13), (5, 1), (16, 7), (37, 20)])
def test_matches_the_eager_sdpa_path(nh, n_kv, hd, page, start, s) -> None:
    """fp32: start 0 (a first chunk), mid-page and page-aligned starts, partial last pages,
    chunk lengths that are no multiple of the tile; rows of 16 and keys 16 at a time so that
    every case spans several tiles and key blocks."""
    q, kp, vp, row = _case(nh, n_kv, hd, page, start, s, torch.float32)
    scale = hd ** -0.5
    want = _eager(q, kp.nan_to_num(), vp.nan_to_num(), row, start, scale)
    got = _run(q, kp, vp, row, start, scale, rows=max(16, nh // n_kv), block_n=16)
    assert not got.isnan().any()
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


def test_one_launch_serves_every_start_and_other_tilings() -> None:
    """The start is read on the device: the same q at two starts gives each start's attention;
    larger tiles (rows 64, keys 64) give the same within fp32 rounding; a scale not 1/sqrt(hd)."""
    q, kp, vp, row = _case(8, 2, 64, 16, 40, 24, torch.float32, seed=3)
    for start in (0, 17, 40):
        want = _eager(q, kp.nan_to_num(), vp.nan_to_num(), row, start, 0.3)
        for rows, block_n in ((16, 16), (64, 64), (None, 64)):
            got = _run(q, kp, vp, row, start, 0.3, rows=rows, block_n=block_n)
            torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


@BF16_ON_GPU
@pytest.mark.parametrize("start, s", [(0, 64), (1536, 64), (250, 200)])
def test_bf16_close_to_eager(start: int, s: int) -> None:
    """bf16 pools: within bf16 rounding of the eager SDPA over the same bf16 K/V."""
    nh, n_kv, hd, page = 32, 8, 64, 16
    g = torch.Generator().manual_seed(1)
    total, num_blocks = start + s, 128
    row = (torch.randperm(num_blocks - 1, generator=g)[: -(-total // page)] + 1).to(DEVICE)
    kp = torch.randn(num_blocks, n_kv, page, hd, generator=g).to(DEVICE, torch.bfloat16)
    vp = torch.randn(num_blocks, n_kv, page, hd, generator=g).to(DEVICE, torch.bfloat16)
    q = torch.randn(s, nh, hd, generator=g).to(DEVICE, torch.bfloat16)
    want = _eager(q, kp, vp, row, start, hd ** -0.5).float()
    got = _run(q, kp, vp, row, start, hd ** -0.5, n_sm=132).float()
    assert (got - want).abs().max() < 2e-2
    assert (got - want).norm() / want.norm() < 5e-3


@pytest.mark.parametrize("nh, n_kv, hd, page", [(4, 4, 64, 16), (8, 2, 64, 8), (6, 2, 128, 16)])
@pytest.mark.parametrize("start, s", [(0, 13), (13, 8), (37, 20)])
@pytest.mark.parametrize("splits", [1, 2, 3, 16])
def test_split_keys_match_the_eager_sdpa_path(nh, n_kv, hd, page, start, s, splits) -> None:
    """fp32, keys 16 at a time, the key range of each tile split 1 (no split), 2, 3 or 16 ways:
    (0, 13) has one key block, so splits past the first get no keys (neutral partials); at
    (13, 8) the first tile ends at position 16, alone in the second block (rows that see no key
    of a split); 16 splits of a few blocks leave most splits empty."""
    q, kp, vp, row = _case(nh, n_kv, hd, page, start, s, torch.float32)
    scale = hd ** -0.5
    want = _eager(q, kp.nan_to_num(), vp.nan_to_num(), row, start, scale)
    got = _run(q, kp, vp, row, start, scale, rows=max(16, nh // n_kv), block_n=16, splits=splits)
    assert not got.isnan().any()
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


def test_split_runs_are_deterministic_and_leave_the_counters_zero() -> None:
    """Two launches with one persistent counter buffer (as a CUDA graph replays): the kernel
    leaves it zero, and the second launch has the first one's bits; the default split count for
    132 SMs over this page row (12 pages of 16: 12 blocks of 16 keys) splits, and is right."""
    q, kp, vp, row = _case(8, 2, 64, 16, 40, 24, torch.float32, seed=5)
    want = _eager(q, kp.nan_to_num(), vp.nan_to_num(), row, 40, 0.125)
    counters = torch.zeros(12, dtype=torch.int32, device=DEVICE)  # 6 tiles x 2
    runs = [_run(q, kp, vp, row, 40, 0.125, rows=16, block_n=16, splits=3, counters=counters)
            for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    assert not counters.any()
    torch.testing.assert_close(runs[0], want, rtol=2e-5, atol=2e-5)
    rows = rows_per_program(24, 4, 2, 132)
    tiles = -(-24 // (rows // 4))
    assert splits_per_tile(tiles * 2, 12 * 16, 16, 132) == 3
    auto = [_run(q, kp, vp, row, 40, 0.125, block_n=16, n_sm=132) for _ in range(2)]
    assert torch.equal(auto[0], auto[1])
    torch.testing.assert_close(auto[0], want, rtol=2e-5, atol=2e-5)


@pytest.mark.skipif(DEVICE == "cpu", reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("persistent", [False, True])
def test_split_graph_replays_have_the_eager_bits(persistent: bool) -> None:
    """1B shapes in bf16, 64 tokens over a row of 64 pages of 32 (the engine's tiling for this
    GPU: split keys): one captured launch replayed at several starts (twice each: the counters
    are reset in between, by the graph's memset or, persistent, by the kernel) has the bits of
    the eager launch at the same start, whatever order the splits arrived in."""
    nh, n_kv, hd, page, s = 32, 8, 64, 32, 64
    n_sm = torch.cuda.get_device_properties(DEVICE).multi_processor_count
    g = torch.Generator().manual_seed(2)
    kp = torch.randn(80, n_kv, page, hd, generator=g).to(DEVICE, torch.bfloat16)
    vp = torch.randn(80, n_kv, page, hd, generator=g).to(DEVICE, torch.bfloat16)
    row = (torch.randperm(79, generator=g)[:64] + 1).to(DEVICE)
    q = torch.randn(s, nh, hd, generator=g).to(DEVICE, torch.bfloat16)
    start = torch.tensor([0], device=DEVICE)
    counters = torch.zeros(64, dtype=torch.int32, device=DEVICE) if persistent else None
    rows = rows_per_program(s, nh // n_kv, n_kv, n_sm)
    assert splits_per_tile(-(-s // (rows // 4)) * n_kv, 64 * page, 64, n_sm) > 1

    def call() -> torch.Tensor:
        return paged_prefill_attention(q, kp, vp, row, start, 0.125, n_sm=n_sm,
                                       counters=counters)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        call()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call()
    for pos in (1536, 256, 1900, 0):
        start.fill_(pos)
        want = call()
        for _ in range(2):
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(out, want), pos
        ref = _eager(q, kp, vp, row, pos, 0.125).float()
        assert (want.float() - ref).norm() / ref.norm() < 5e-3, pos
    if persistent:
        assert not counters.any()


def test_rows_and_splits_per_program() -> None:
    """1B shapes (32 heads, 8 KV heads) on 132 SMs, a page row of 1,856 keys: long chunks take
    tiles of 128 rows and no split; short chunks tiles of up to 64 rows and their keys split."""
    assert rows_per_program(64, 4, 8, 132) == 64  # 4 tiles of 16 tokens: split the keys
    assert rows_per_program(16, 4, 8, 132) == 64
    assert rows_per_program(2048, 4, 8, 132) == 128
    assert rows_per_program(1, 32, 1, 132) == 32  # a group of 32 heads needs 32 rows
    assert rows_per_program(1, 2, 1, 132) == 16
    assert splits_per_tile(32, 1856, 64, 132) == 7  # 29 key blocks, 4 per split
    assert splits_per_tile(32, 8192, 64, 132) == 16  # at most MAX_SPLITS
    assert splits_per_tile(128, 8192, 64, 132) == 4  # 4 programs per SM
    assert splits_per_tile(512, 8192, 64, 132) == 1  # enough programs already
    assert splits_per_tile(8, 64, 64, 132) == 1  # one key block: nothing to split


def test_refused_shapes() -> None:
    q, kp, vp, row = _case(4, 4, 64, 16, 0, 3, torch.float32)
    with pytest.raises(ValueError, match="rows must be a power of two >= 16"):
        _run(q, kp, vp, row, 0, 1.0, rows=24)
    with pytest.raises(ValueError, match="block_n"):
        _run(q, kp, vp, row, 0, 1.0, block_n=8)
    with pytest.raises(ValueError, match="splits must be >= 1"):
        _run(q, kp, vp, row, 0, 1.0, splits=0)
    with pytest.raises(ValueError, match="counters must be int32"):
        _run(q, kp, vp, row, 0, 1.0, splits=2, counters=torch.zeros(4, device=DEVICE))
    with pytest.raises(ValueError, match=r">= 4 elements"):
        _run(q, kp, vp, row, 0, 1.0, rows=16, splits=2,
             counters=torch.zeros(3, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="multiple of the KV heads"):
        _run(q[:, :3], kp, vp, row, 0, 1.0)
    with pytest.raises(ValueError, match="head_dim >= 16"):
        _run(q[..., :48].contiguous(), kp[..., :48], vp[..., :48], row, 0, 1.0)
