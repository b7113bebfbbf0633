"""The paged decode attention with its split merge fused into the one launch (counters) against
the two-kernel path (partial kernel, then combine kernel): the same bits.

On the CPU these run in Triton's interpreter, whose programs run one after another: the counting,
the last program's merge and the counters' reset are exercised, the GPU memory ordering between
programs (release / acquire on the counter) is not. On a GPU (the same file) it is, and the
CUDA-graph test replays the fused launch.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")
from llm.backends.torch.kernels.paged_decode import (  # noqa: E402
    decode_counters,
    paged_decode_attention,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CPU_BF16 = pytest.mark.skipif(DEVICE == "cpu", reason="Triton's CPU interpreter computes bf16 "
                              "dots wrongly (numpy has no bfloat16); bf16 runs on the GPU")


def _case(b: int, nh: int, n_kv: int, hd: int, block: int, max_pages: int, layout: str,
          dtype: torch.dtype, seed: int = 0):
    """q [b, nh, hd], K/V pools, page_table [b, max_pages] int32 and positions [b] for `layout`:
    contiguous (each user's pages in a run), scattered (a random permutation), shared (every user
    reads the first user's pages: a shared prefix). Page 0 is NaN padding, never read."""
    g = torch.Generator().manual_seed(seed)
    num_blocks = b * max_pages + 1
    k_pool = torch.randn(num_blocks, n_kv, block, hd, generator=g)
    v_pool = torch.randn(num_blocks, n_kv, block, hd, generator=g)
    k_pool[0] = v_pool[0] = float("nan")
    last = max_pages * block - 1
    positions = torch.tensor([(0, last, block - 1, block, 3 * block + 5)[u % 5] for u in range(b)])
    positions = positions.clamp(max=last)
    if layout == "scattered":
        order = torch.randperm(num_blocks - 1, generator=g) + 1
    else:
        order = torch.arange(1, num_blocks)
    page_table = torch.zeros(b, max_pages, dtype=torch.int32)
    for u in range(b):
        n = int(positions[u]) // block + 1
        row = 0 if layout == "shared" else u
        page_table[u, :n] = order[row * max_pages: row * max_pages + n]
    q = torch.randn(b, nh, hd, generator=g)
    return (q.to(DEVICE, dtype), k_pool.to(DEVICE, dtype), v_pool.to(DEVICE, dtype),
            page_table.to(DEVICE), positions.to(DEVICE))


def _both(case, pages_per_program: int, counters: torch.Tensor):
    """The two-kernel output, then the fused one."""
    q, k_pool, v_pool, page_table, positions = case
    scale = q.shape[-1] ** -0.5
    two = paged_decode_attention(q, k_pool, v_pool, page_table, positions, scale,
                                 pages_per_program)
    fused = paged_decode_attention(q, k_pool, v_pool, page_table, positions, scale,
                                   pages_per_program, counters=counters)
    return two, fused


@pytest.mark.parametrize("nh, n_kv", [(4, 4), (9, 3), (8, 2), (16, 2)])  # groups 1, 3, 4, 8
@pytest.mark.parametrize("b, max_pages, pages_per_program", [
    (1, 8, 8),    # one split: the programs write the output, no partial states
    (1, 8, 1),    # eight splits, one page each (empty ones for the short users)
    (3, 8, 3),    # three splits of three pages
    (5, 6, 4),    # two splits, the second short
    (2, 20, 1),   # twenty splits: a split count that is not a power of two
])
def test_fused_equals_two_kernels(nh, n_kv, b, max_pages, pages_per_program) -> None:
    layout = ("contiguous", "scattered", "shared")[(b + nh) % 3]
    case = _case(b, nh, n_kv, 16, 16, max_pages, layout, torch.float32)
    counters = decode_counters(b + 2, n_kv, DEVICE)  # more users' room than this batch
    two, fused = _both(case, pages_per_program, counters)
    assert not two.isnan().any()
    assert torch.equal(fused, two)
    assert not counters.any()  # every (user, KV head) counter back to zero


@pytest.mark.parametrize("layout", ["contiguous", "scattered", "shared"])
def test_page_layouts_and_repeated_calls(layout: str) -> None:
    """Each layout at three splits; the same counters used twice in a row (as a layer after
    another, or a graph replay): the same bits both times, the counters zero after each."""
    case = _case(4, 8, 2, 32, 16, 6, layout, torch.float32, seed=1)
    counters = decode_counters(4, 2, DEVICE)
    two, first = _both(case, 2, counters)
    assert not counters.any()
    second = paged_decode_attention(*case, 32 ** -0.5, 2, counters=counters)
    assert not counters.any()
    assert torch.equal(first, two) and torch.equal(second, first)


@CPU_BF16
@pytest.mark.parametrize("pages_per_program", [1, 3, 8])
def test_fused_equals_two_kernels_bf16(pages_per_program: int) -> None:
    case = _case(5, 32, 8, 64, 32, 8, "scattered", torch.bfloat16)
    counters = decode_counters(5, 8, DEVICE)
    two, fused = _both(case, pages_per_program, counters)
    assert torch.equal(fused, two)
    assert not counters.any()


def test_counters_are_checked() -> None:
    case = _case(3, 8, 2, 16, 16, 4, "contiguous", torch.float32)
    for bad in (decode_counters(2, 2, DEVICE),  # room for 2 users of 3
                torch.zeros(6, dtype=torch.int64, device=DEVICE)):
        with pytest.raises(ValueError, match="counters must be int32"):
            paged_decode_attention(*case, 0.25, 1, counters=bad)


@pytest.mark.skipif(DEVICE == "cpu", reason="CUDA graphs need a GPU")
def test_fused_in_a_cuda_graph_replays_to_the_same_bits() -> None:
    """The fused launch captured once and replayed several times (new queries each time): each
    replay equals the two-kernel path eagerly, and the counters are zero after each."""
    q, k_pool, v_pool, page_table, positions = _case(3, 32, 8, 64, 32, 8, "scattered",
                                                     torch.bfloat16)
    counters = decode_counters(3, 8, DEVICE)
    scale = 64 ** -0.5
    paged_decode_attention(q, k_pool, v_pool, page_table, positions, scale, 1,
                           counters=counters)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = paged_decode_attention(q, k_pool, v_pool, page_table, positions, scale, 1,
                                     counters=counters)
    g = torch.Generator(device=DEVICE).manual_seed(7)
    for _ in range(3):
        q.copy_(torch.randn(q.shape, generator=g, device=DEVICE))
        graph.replay()
        torch.cuda.synchronize()
        assert not counters.any()
        ref = paged_decode_attention(q, k_pool, v_pool, page_table, positions, scale, 1)
        assert torch.equal(out, ref)


@pytest.mark.skipif(DEVICE == "cpu", reason="the ordering between programs needs a GPU")
def test_fused_under_load_on_the_gpu() -> None:
    """Many programs racing for the counters (32 users x 8 KV heads x 33 splits, every user's
    pages live), 200 launches back to back: every output equals the two-kernel path's; a store
    not yet visible to the merging program would show as a wrong row in some launch."""
    q, k_pool, v_pool, page_table, _ = _case(32, 32, 8, 128, 32, 33, "scattered", torch.bfloat16)
    positions = torch.full((32,), 33 * 32 - 1, device=DEVICE)
    for u in range(32):
        page_table[u] = torch.arange(1 + 33 * u, 1 + 33 * (u + 1), device=DEVICE)
    counters = decode_counters(32, 8, DEVICE)
    ref = paged_decode_attention(q, k_pool, v_pool, page_table, positions, 128 ** -0.5, 1)
    outs = [paged_decode_attention(q, k_pool, v_pool, page_table, positions, 128 ** -0.5, 1,
                                   counters=counters) for _ in range(200)]
    torch.cuda.synchronize()
    assert all(torch.equal(o, ref) for o in outs)
    assert not counters.any()


def test_model_decode_fused_equals_two_kernels() -> None:
    """A whole decode step of a small GQA model through the Triton kernels with the fused merge
    and with the two-kernel path: the same logits, bit for bit."""
    from hf_reference import SMALL_CONFIGS, hf_model, state_dict

    from llm.backends.torch.kv_cache import PagedKVCache
    from llm.backends.torch.model import Transformer
    from llm.model.config import RuntimeConfig

    config = SMALL_CONFIGS["llama_gqa"]
    rt = RuntimeConfig(device=DEVICE, max_batch=2, max_seq_len=64, block_size=16)
    model = Transformer(config, state_dict(hf_model(config)), rt, decode_kernel=True)
    assert model.fused_attention and model.attn_counters is not None
    model.n_sm = 8  # as on a GPU of 8 SMs: 2 users x 2 KV heads x 4 splits of one page
    cache = PagedKVCache(config, rt, DEVICE, model.dtype)
    pages = torch.tensor([[2, 5, 0, 0], [4, 1, 3, 0]], device=DEVICE)
    for u, n in enumerate((20, 37)):
        model.prefill(torch.arange(3, 3 + n, device=DEVICE), 0, pages[u], cache)
    tokens, positions = torch.tensor([7, 9], device=DEVICE), torch.tensor([20, 37], device=DEVICE)
    logits = []
    for fused in (True, False):
        model.fused_attention = fused
        logits.append(model.decode(tokens, positions, pages, cache))
    assert torch.equal(logits[0], logits[1])
    assert not model.attn_counters.any()
