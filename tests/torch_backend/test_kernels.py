"""Triton kernels against plain torch references (interpreted on CPU, compiled on a GPU)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")
from llm.backends.torch.kernels.paged_decode import (  # noqa: E402
    paged_decode_attention,
    pages_per_split,
    supported,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _reference(q, k_pool, v_pool, page_table, positions, scale):
    """Gather each user's pages in order, mask keys past its position, softmax in float64."""
    b, nh, hd = q.shape
    n_kv, block = k_pool.shape[1], k_pool.shape[2]
    out = torch.empty(b, nh, hd, dtype=torch.float64)
    for u in range(b):
        n = int(positions[u]) + 1
        pages = page_table[u, : -(-n // block)].cpu()
        k = k_pool[pages].double().cpu().permute(1, 0, 2, 3).reshape(n_kv, -1, hd)[:, :n]
        v = v_pool[pages].double().cpu().permute(1, 0, 2, 3).reshape(n_kv, -1, hd)[:, :n]
        k = k.repeat_interleave(nh // n_kv, dim=0)  # [nh, n, hd]
        v = v.repeat_interleave(nh // n_kv, dim=0)
        w = torch.softmax(q[u].double().cpu()[:, None, :] @ k.transpose(1, 2) * scale, dim=-1)
        out[u] = (w @ v)[:, 0]
    return out


@pytest.mark.parametrize("nh, n_kv, hd, block, dtype", [
    (8, 2, 64, 16, torch.float32),   # GQA group 4
    (9, 3, 64, 32, torch.float32),   # group 3 (padded to 16 rows), SmolLM-like
    (4, 4, 16, 16, torch.float32),   # MHA, small head
    pytest.param(8, 2, 64, 16, torch.bfloat16, marks=pytest.mark.skipif(
        DEVICE == "cpu", reason="Triton's CPU interpreter computes bf16 dots wrongly (numpy has "
        "no bfloat16); bf16 runs on the GPU")),
])
@pytest.mark.parametrize("pages_per_program", [1, 3, 64])  # 1, 3: splits, some empty
def test_paged_decode_matches_reference(nh, n_kv, hd, block, dtype, pages_per_program) -> None:
    g = torch.Generator().manual_seed(0)
    num_blocks, max_pages = 48, 8
    k_pool = torch.randn(num_blocks, n_kv, block, hd, generator=g).to(DEVICE, dtype)
    v_pool = torch.randn(num_blocks, n_kv, block, hd, generator=g).to(DEVICE, dtype)
    k_pool[0] = float("nan")  # the padding page: must never be read
    v_pool[0] = float("nan")
    positions = torch.tensor([0, block - 1, block, 5 * block + 3, max_pages * block - 1])
    b = len(positions)
    perm = torch.randperm(num_blocks - 1, generator=g) + 1  # non-contiguous, never page 0
    page_table = torch.zeros(b, max_pages, dtype=torch.int32)
    for u in range(b):
        n = int(positions[u]) // block + 1
        page_table[u, :n] = perm[u * max_pages: u * max_pages + n]
    q = torch.randn(b, nh, hd, generator=g).to(DEVICE, dtype)
    scale = hd ** -0.5
    out = paged_decode_attention(q, k_pool, v_pool, page_table.to(DEVICE), positions.to(DEVICE),
                                 scale, pages_per_program)
    ref = _reference(q, k_pool, v_pool, page_table, positions, scale)
    err = (out.double().cpu() - ref).norm() / ref.norm()
    assert err < (1e-5 if dtype == torch.float32 else 1e-2), err


def test_split_sizing_and_support() -> None:
    assert pages_per_split(batch=1, n_kv=8, max_pages=64, n_sm=132) == 2  # 33 splits wanted
    assert pages_per_split(batch=64, n_kv=8, max_pages=64, n_sm=132) == 64  # enough programs
    assert supported(64, 32) and supported(128, 16)
    assert not supported(96, 32) and not supported(64, 8)


@pytest.mark.parametrize("name", ["odd_heads_headdim", "qwen3_qk_norm", "granite_scaled",
                                  "phi3_longrope", "phi4_mini_partial"])
def test_model_decode_through_the_kernel_equals_the_gather_path(name: str) -> None:
    """Prefill and a decode step through the Triton kernels (interpreted on CPU) vs torch;
    odd_heads_headdim: 9 q heads over 3 KV heads, head_dim 16; qwen3_qk_norm: the q/k head
    norms before the fused RoPE + cache write; granite_scaled: its attention scale in the paged
    kernel, its residual multiplier on the sublayer outputs; phi3_longrope: LongRoPE's tables
    in the fused RoPE, its attention factor in the kernel's scale; phi4_mini_partial: partial
    rotation (reordered q/k rows, zero-frequency pairs) through the fused RoPE."""
    from hf_reference import SMALL_CONFIGS, hf_model, state_dict

    from llm.backends.torch.graphs import buckets_for
    from llm.backends.torch.kv_cache import PagedKVCache
    from llm.backends.torch.model import Transformer
    from llm.model.config import RuntimeConfig

    assert buckets_for(1) == [1] and buckets_for(6) == [1, 2, 4, 6]
    assert buckets_for(128) == [1, 2, 4, 8, 16, 32, 64, 128]
    config = SMALL_CONFIGS[name]
    rt = RuntimeConfig(device=DEVICE, max_batch=2, max_seq_len=64, block_size=16)
    w = state_dict(hf_model(config))
    logits, prefill = [], []
    for kernel in (True, False):
        model = Transformer(config, w, rt, decode_kernel=kernel)
        cache = PagedKVCache(config, rt, DEVICE, model.dtype)
        pages = torch.tensor([[2, 5, 0, 0], [4, 1, 3, 0]], device=DEVICE)
        for u, n in enumerate((20, 37)):
            prefill.append(model.prefill(torch.arange(3, 3 + n, device=DEVICE), 0, pages[u],
                                         cache, all_logits=True))
        positions = torch.tensor([20, 37], device=DEVICE)
        logits.append(model.decode(torch.tensor([7, 9], device=DEVICE), positions, pages, cache,
                                   max_pos=37))
    err = (logits[0] - logits[1]).norm() / logits[1].norm()
    assert err < 1e-5, err
    for fused, plain in zip(prefill[:2], prefill[2:]):  # fused RoPE + cache write in prefill
        assert (fused - plain).norm() / plain.norm() < 1e-5


@pytest.mark.parametrize("with_residual", [True, False])
def test_fused_add_rms_norm(with_residual: bool) -> None:
    from llm.backends.torch.kernels.norm import add_rms_norm
    from llm.backends.torch.norm import RMSNorm

    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 96, generator=g).to(DEVICE)  # hidden not a power of two
    r = torch.randn(5, 96, generator=g).to(DEVICE) if with_residual else None
    w = (1 + 0.1 * torch.randn(96, generator=g)).to(DEVICE)
    out, total = add_rms_norm(x, r, w, 1e-5)
    ref_out, ref_total = RMSNorm(w, 1e-5).add_norm(x, r)
    assert torch.equal(total, ref_total)
    assert torch.allclose(out, ref_out, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("block_t", [None, 2, 4])  # tokens per program; 2: a masked tail
def test_fused_rope_and_cache_write(block_t: int | None) -> None:
    from llm.backends.torch.kernels.rope_kv import rope_and_cache
    from llm.backends.torch.rope import apply_rotary, rot_sin

    g = torch.Generator().manual_seed(0)
    nh, n_kv, hd, n = 6, 2, 16, 3
    qkv = torch.randn(n, (nh + 2 * n_kv) * hd, generator=g).to(DEVICE)
    cos = torch.randn(n, hd, generator=g).to(DEVICE)
    sin = torch.randn(n, hd, generator=g).to(DEVICE)
    blocks, offsets = torch.tensor([3, 1, 3], device=DEVICE), torch.tensor([0, 7, 5], device=DEVICE)
    k_pool = torch.zeros(4, n_kv, 8, hd, device=DEVICE)
    v_pool = torch.zeros(4, n_kv, 8, hd, device=DEVICE)
    q, k = rope_and_cache(qkv, cos, sin, blocks, offsets, k_pool, v_pool, nh, return_k=True,
                          block_t=block_t)
    rq, rk, rv = qkv.split([nh * hd, n_kv * hd, n_kv * hd], dim=-1)
    assert torch.allclose(q, apply_rotary(rq.view(n, nh, hd), cos, rot_sin(sin)), atol=1e-6)
    ref_k = apply_rotary(rk.view(n, n_kv, hd), cos, rot_sin(sin))
    assert torch.allclose(k, ref_k, atol=1e-6)
    for i in range(n):
        assert torch.allclose(k_pool[blocks[i], :, offsets[i]], ref_k[i], atol=1e-6)
        assert torch.equal(v_pool[blocks[i], :, offsets[i]], rv.view(n, n_kv, hd)[i])
    assert int((k_pool != 0).any(-1).sum()) == n * n_kv  # nothing else written


def test_prompt_sized_rope_and_cache_write_blocks_tokens_and_equals_one_per_program() -> None:
    """Prompts (> 128 tokens) rotate 32 tokens per program; the result, q and both pools, is
    bit-identical to one token per program, including the masked last block."""
    from llm.backends.torch.kernels.rope_kv import rope_and_cache, tokens_per_program

    g = torch.Generator().manual_seed(1)
    nh, n_kv, hd, n, bs = 4, 2, 8, 150, 16
    assert tokens_per_program(n) == 32 and tokens_per_program(128) == 1
    qkv = torch.randn(n, (nh + 2 * n_kv) * hd, generator=g).to(DEVICE)
    cos, sin = torch.randn(2, n, hd, generator=g).to(DEVICE)
    pages = torch.randperm(12, generator=g)[: -(-n // bs)].to(DEVICE)
    pos = torch.arange(n, device=DEVICE)
    runs = []
    for block_t in (None, 1):
        pools = torch.zeros(2, 12, n_kv, bs, hd, device=DEVICE)
        q, k = rope_and_cache(qkv, cos, sin, pages[pos // bs], pos % bs, pools[0], pools[1], nh,
                              return_k=True, block_t=block_t)
        runs.append((q, k, pools))
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="power of two"):
        rope_and_cache(qkv, cos, sin, pages[pos // bs], pos % bs, pools[0], pools[1], nh,
                       block_t=3)


@pytest.mark.skipif(DEVICE == "cpu", reason="compiled bf16 on the GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_prompt_sized_rope_and_cache_write_bit_identical_compiled(dtype: torch.dtype) -> None:
    from llm.backends.torch.kernels.rope_kv import rope_and_cache

    nh, n_kv, hd, n, bs = 32, 8, 128, 2049, 32
    qkv = torch.randn(n, (nh + 2 * n_kv) * hd, device=DEVICE).to(dtype)
    cos, sin = torch.randn(2, n, hd, device=DEVICE).to(dtype)
    pages = torch.randperm(80, device=DEVICE)[: -(-n // bs)]
    pos = torch.arange(n, device=DEVICE)
    runs = []
    for block_t in (1, 32):
        pools = torch.zeros(2, 80, n_kv, bs, hd, device=DEVICE, dtype=dtype)
        runs.append((*rope_and_cache(qkv, cos, sin, pages[pos // bs], pos % bs, pools[0],
                                     pools[1], nh, return_k=True, block_t=block_t), pools))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_argmax_equals_torch_argmax(dtype: torch.dtype) -> None:
    """First index among equal maxima, NaN beating +inf, rows of -inf, a partial last block, and
    maxima tied across blocks: the same index as torch.argmax, and the maximum itself."""
    from llm.backends.torch.kernels.argmax import max_argmax

    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 1000, generator=g)
    x[1, 700], x[1, 300] = 9.0, 9.0  # a tie across blocks: the first wins
    x[2] = float("-inf")
    x[3, 10], x[3, 600], x[3, 900] = float("inf"), float("nan"), float("nan")
    x[4, 999] = 50.0  # in the partial last block
    x = x.to(dtype).to(DEVICE)
    value, index = max_argmax(x, block=256)
    ref = torch.argmax(x, dim=-1)
    assert index.dtype == torch.int64 and torch.equal(index, ref), (index, ref)
    want = x.float().gather(1, ref[:, None])[:, 0]
    assert torch.equal(value.isnan(), want.isnan())
    assert torch.equal(value[~want.isnan()], want[~want.isnan()])
    with pytest.raises(ValueError, match="contiguous rows"):
        max_argmax(x.t())
    with pytest.raises(ValueError, match="got torch.float64"):
        max_argmax(x.double())


def test_split_argmax_all_nan_rows_and_nan_in_every_block() -> None:
    from llm.backends.torch.kernels.argmax import max_argmax

    x = torch.randn(3, 5000, device=DEVICE)
    x[0] = float("nan")
    x[1, ::1000] = float("nan")  # one NaN in every block: the first wins
    x[2, 4096:] = float("nan")  # a whole last block
    assert torch.equal(max_argmax(x, block=1024)[1], torch.argmax(x, dim=-1))


def test_lm_head_greedy_by_the_split_argmax() -> None:
    from llm.backends.torch.lm_head import LMHead

    g = torch.Generator().manual_seed(4)
    w = torch.randn(3000, 32, generator=g).to(DEVICE)
    x = torch.randn(3, 32, generator=g).to(DEVICE)
    fused, plain = LMHead(w, fused_argmax=True), LMHead(w)
    logits = fused(x)
    assert torch.equal(fused.argmax(logits), plain.argmax(logits))


def test_fused_silu_mul() -> None:
    from llm.backends.torch.kernels.silu_mul import silu_mul

    gu = torch.randn(3, 2 * 1100, generator=torch.Generator().manual_seed(0)).to(DEVICE)  # 2 blocks
    gate, up = gu.split(1100, dim=-1)
    assert torch.allclose(silu_mul(gu), torch.nn.functional.silu(gate) * up, atol=1e-6)


@pytest.mark.parametrize("name", ["qwen2_bias", "qwen3_qk_norm", "granite_scaled",
                                  "phi4_mini_partial"])
def test_batch_one_decode_through_the_fused_gemvs_equals_the_cublas_path(name: str) -> None:
    """At batch 1 the layers run 4 fused Triton GEMVs (norm prologues, SiLU*up epilogue) instead
    of norm + matmul kernels: same logits (fp32), same cache writes, for a few steps (qwen2:
    q/k/v biases through the GEMV's bias path; qwen3: q/k head norms after the QKV GEMV; granite:
    the residual multiplier on the GEMV outputs).
    """
    from hf_reference import SMALL_CONFIGS, hf_model, state_dict

    from llm.backends.torch.kv_cache import PagedKVCache
    from llm.backends.torch.model import Transformer
    from llm.model.config import RuntimeConfig

    config = SMALL_CONFIGS[name]
    rt = RuntimeConfig(device=DEVICE, max_batch=1, max_seq_len=64, block_size=16)
    w = state_dict(hf_model(config))
    runs = []
    for gemv_max_batch in (1, 0):
        model = Transformer(config, w, rt, decode_kernel=True, gemv_max_batch=gemv_max_batch)
        cache = PagedKVCache(config, rt, DEVICE, model.dtype)
        pages = torch.tensor([[3, 1, 2, 0]], device=DEVICE)
        model.prefill(torch.arange(5, 25, device=DEVICE), 0, pages[0], cache)
        steps = [model.decode(torch.tensor([t], device=DEVICE), torch.tensor([20 + i],
                                                                             device=DEVICE),
                              pages, cache) for i, t in enumerate((7, 11, 13))]
        runs.append((torch.stack(steps), cache.k[1].clone()))
    (a, ka), (b, kb) = runs
    assert (a - b).norm() / b.norm() < 1e-5
    assert (ka - kb).norm() / kb.norm() < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_penalties_equal_the_torch_penalties(dtype: torch.dtype) -> None:
    """Every term (bias, min_tokens mask before and after its position, repetition on positive
    and negative logits from prompt and counts, frequency, presence), padding rows on the
    scratch slot, a partial last block: the torch path of SlotPenalties."""
    from llm.backends.torch.kernels.penalties import fused_penalties
    from llm.backends.torch.penalties import SlotPenalties
    from llm.engine.contract.backend import SequenceSampling
    from llm.engine.contract.sampling_params import SamplingParams

    vocab = 1000
    state = SlotPenalties(4, vocab, torch.device(DEVICE), fused=False)
    params = [SamplingParams(presence_penalty=0.7, frequency_penalty=-0.4, repetition_penalty=1.5,
                             logit_bias={3: 5.0, 999: -100.0}, min_tokens=3),
              SamplingParams(),
              SamplingParams(repetition_penalty=0.5, min_tokens=1, logit_bias={500: 2.5}),
              SamplingParams(frequency_penalty=2.0)]
    g = torch.Generator().manual_seed(5)
    for slot, p in enumerate(params):
        s = SequenceSampling(p, 0, (2, 998))
        state.begin(slot, s)
        prompt = torch.randint(0, vocab, (30,), generator=g).to(DEVICE)
        state.add_prompt(slot, s, prompt.tolist(), 30)
    for step in range(6):  # generated tokens, one repeated
        fed = torch.tensor([7, 7, 100 + step, 2], device=DEVICE)
        state.count(torch.arange(4, device=DEVICE), fed, torch.full((4,), 30 + step,
                                                                     device=DEVICE))
    slots = torch.tensor([0, 1, 2, 3, state.scratch, state.scratch], device=DEVICE)
    sample_pos = torch.tensor([32, 40, 30, 36, 0, 0], device=DEVICE)  # slot 0 still early
    logits = (torch.randn(6, vocab, generator=g) * 4).to(dtype).to(DEVICE)
    want = state.apply(logits, slots, sample_pos)
    got = fused_penalties(logits, slots, sample_pos, state.bias, state.stop, state.counts,
                          state.in_prompt, state.min_pos, state.presence, state.frequency,
                          state.repetition, block=256)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert torch.equal(got.isinf(), want.isinf()) and want[0, [2, 998]].isinf().all()
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-5)
    assert not torch.equal(want[:4], logits[:4].float())  # the terms did something
    assert torch.equal(want[1], logits[1].float())  # a neutral row is untouched
    with pytest.raises(ValueError, match="contiguous rows"):
        fused_penalties(logits.t(), slots, sample_pos, state.bias, state.stop, state.counts,
                        state.in_prompt, state.min_pos, state.presence, state.frequency,
                        state.repetition)


def test_lse_topk_equals_torch() -> None:
    """logsumexp and the K best (values and ids, best first) of rows with a partial last block,
    a block of -inf only, -inf scattered and a row of one finite value: torch's."""
    from llm.backends.torch.kernels.logprobs import lse_topk

    g = torch.Generator().manual_seed(3)
    z = torch.randn(5, 1000, generator=g) * 6
    z[1, 256:512] = float("-inf")  # a whole block
    z[2, ::3] = float("-inf")
    z[3, 1:] = float("-inf")  # one finite value: the rest of its top are -inf
    z = z.to(DEVICE)
    lse, values, ids = lse_topk(z, 20, block=256)
    want_values, want_ids = torch.topk(z, 20, dim=-1)
    torch.testing.assert_close(lse, torch.logsumexp(z, dim=-1), rtol=1e-6, atol=1e-5)
    assert torch.equal(values, want_values)
    finite = want_values.isfinite()
    assert torch.equal(ids[finite], want_ids[finite])
    assert int(ids[3, 0]) == 0 and values[3, 1:].isinf().all()
    with pytest.raises(ValueError, match="contiguous rows"):
        lse_topk(z.t(), 20)


def test_lse_topk_threshold_and_flat_rows() -> None:
    """Rows of many blocks (the K best found through the K-th largest block maximum), values
    rounded to bfloat16 (ties, broken by the lower column), a row whose best sit in one block,
    a flat row and a two-valued row (more candidates than CAP: the exact fallback): torch's."""
    from llm.backends.torch.kernels.logprobs import lse_topk

    g = torch.Generator().manual_seed(5)
    z = torch.randn(7, 9000, generator=g) * 3
    z[1] = z[1].to(torch.bfloat16).float()  # ties among the best
    z[2, 4000:4030] = 50 + torch.arange(30.0)  # the 20 best in one block
    z[3] = 0.0  # flat: every value ties
    z[4] = (torch.rand(9000, generator=g) < 0.5).float()  # two values, many ties at the top
    z[5, :] = float("-inf")
    z[5, 8999] = 1.0
    z[6, 2560:] = float("-inf")  # 10 finite blocks of 36: tau -inf, 200 candidates
    z = z.to(DEVICE)
    lse, values, ids = lse_topk(z, 20, block=256)
    want_values = torch.topk(z, 20, dim=-1).values
    torch.testing.assert_close(lse, torch.logsumexp(z, dim=-1), rtol=1e-6, atol=1e-5)
    assert torch.equal(values, want_values)
    zc = z.cpu()
    for r in (0, 1, 2, 3, 4, 6):  # ids: the values' columns, equal values by the lower column
        order = sorted(range(zc.shape[1]), key=lambda c: (-float(zc[r, c]), c))[:20]
        assert ids[r].tolist() == order, r
    assert int(ids[5, 0]) == 8999 and values[5, 1:].isinf().all()
    with pytest.raises(ValueError, match="k must be"):
        lse_topk(z, 300, block=256)

