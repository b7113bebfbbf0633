"""Padded prefill (CUDA-graph prompt buckets): bucket choice, padding equivalence, replay bits."""

from __future__ import annotations

import pytest
import torch
from hf_reference import SMALL_CONFIGS, hf_model, state_dict

from llm.backends.torch.attention import PrefillMeta
from llm.backends.torch.kv_cache import PagedKVCache
from llm.backends.torch.model import Transformer
from llm.backends.torch.prefill_graphs import PrefillGraphs, bucket_for, prefill_buckets
from llm.model.config import RuntimeConfig

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"  # on the CPU the Triton kernels run in its interpreter


def test_buckets_fit_the_cache_and_the_chunk_stays_below_max_seq_len() -> None:
    assert prefill_buckets(4096) == [16, 32, 64, 128, 256, 512, 1024, 1536, 2048]
    assert prefill_buckets(300) == [16, 32, 64, 128, 256]  # pads never pass max_seq_len
    assert prefill_buckets(8) == []
    b = prefill_buckets(4096)
    assert [bucket_for(b, n, 0, 4096) for n in (1, 16, 17, 256, 257, 1025, 2048)] == \
        [16, 16, 32, 256, 512, 1536, 2048]
    assert bucket_for(b, 2049, 0, 4096) is None  # longer prompts: eager, unpadded
    assert bucket_for(b, 0, 0, 4096) is None
    assert bucket_for([], 5, 0, 4096) is None
    # continuation chunks: the same buckets, while the pads stay below max_seq_len
    assert bucket_for(b, 64, 1536, 4096) == 64 and bucket_for(b, 10, 5, 4096) == 16
    assert bucket_for(b, 50, 4032, 4096) == 64  # pads up to position 4095
    assert bucket_for(b, 50, 4040, 4096) is None  # pads would reach 4103: eager
    assert bucket_for(b, 10, 5, 4096, continuations=False) is None  # LongRoPE: eager
    assert bucket_for(b, 10, 0, 4096, continuations=False) == 16


class _Done:
    """A CUDA event stand-in: every copy is complete."""

    def synchronize(self) -> None:
        pass

    def record(self) -> None:
        pass


def test_staging_fills_one_buffer_and_refuses_a_long_page_row() -> None:
    """`_stage` on the CPU (a plain buffer for the pinned one): the chunk padded with token 0 up
    to its bucket, the page row padded with page 0, the last index and the start, in one copy;
    a page row longer than the graphs' is refused, not cut short."""
    g = object.__new__(PrefillGraphs)  # the staging alone: no model, no CUDA graphs
    n, pages = 32, 5
    g._row_at, g._staged = n, _Done()
    g._inputs = torch.full((n + pages + 2,), -1, dtype=torch.int64)
    g.tokens, g.page_row, g.last, g.start = g._inputs.split([n, pages, 1, 1])
    g._host = torch.full((n + pages + 2,), -7, dtype=torch.int64)
    g._host_np = g._host.numpy()
    g._stage(16, [3, 1, 4, 1, 5], (9, 2), 40)
    assert g.tokens[:16].tolist() == [3, 1, 4, 1, 5] + [0] * 11
    assert g.page_row.tolist() == [9, 2, 0, 0, 0]
    assert (int(g.last), int(g.start)) == (4, 40)
    g._stage(16, [8] * 16, [1, 2, 3, 4, 5], 0)  # a full bucket and a full row
    assert g.tokens[:16].tolist() == [8] * 16 and g.page_row.tolist() == [1, 2, 3, 4, 5]
    assert (int(g.last), int(g.start)) == (15, 0)
    with pytest.raises(ValueError, match="page row of 6 pages is longer than the graphs' 5"):
        g._stage(16, [1], list(range(6)), 0)


@pytest.mark.parametrize("decode_kernel", [False, True])  # torch RoPE / the fused Triton kernel
def test_padded_prompt_gives_the_unpadded_logits_and_cache(decode_kernel: bool) -> None:
    """A prompt padded at its end with junk tokens, read at its last real token: the same logits
    and the same K/V at the prompt's positions; the pads' K/V lands in the user's later slots and
    in page 0 past its pages, nowhere else."""
    config = SMALL_CONFIGS["llama_gqa"]
    rt = RuntimeConfig(device=DEVICE, max_batch=2, max_seq_len=64, block_size=8)
    model = Transformer(config, state_dict(hf_model(config)), rt, decode_kernel=decode_kernel)
    tol = 1e-4 if CUDA else 1e-5  # GEMMs of 13 and 32 rows may take other kernels on a GPU
    n, bucket = 13, 32
    tokens = torch.randint(0, config.vocab_size, (bucket,),
                           generator=torch.Generator().manual_seed(2)).to(DEVICE)
    row = torch.zeros(rt.blocks_per_seq, dtype=torch.int64)
    row[:3] = torch.tensor([5, 2, 7])  # pages for 24 positions: pads 24..31 fall in page 0
    row = row.to(DEVICE)
    caches = [PagedKVCache(config, rt, DEVICE, model.dtype) for _ in range(2)]
    want = model.prefill(tokens[:n], 0, row, caches[0])
    got = model.prefill(tokens, 0, row, caches[1], last=torch.tensor([n - 1], device=DEVICE))
    assert torch.allclose(got, want, rtol=tol, atol=tol)
    for layer in range(config.num_layers):
        for a, b in ((caches[0].k[layer], caches[1].k[layer]),
                     (caches[0].v[layer], caches[1].v[layer])):
            for pos in range(n):
                page, off = int(row[pos // 8]), pos % 8
                assert torch.allclose(b[page, :, off], a[page, :, off], atol=tol)
            touched = {int(p) for p in torch.nonzero(b.abs().sum((1, 2, 3)))[:, 0]}
            assert touched == {5, 2, 7, 0}


@pytest.mark.parametrize("prefix, n", [(19, 13), (16, 16), (8, 1)])
def test_padded_continuation_with_a_device_start_gives_the_eager_logits_and_cache(
        prefix: int, n: int) -> None:
    """A chunk at a device-side start (the paged Triton attention, as a continuation graph runs
    it), padded at its end: every real row's logits and K/V equal the eager continuation's
    (gathered keys, SDPA with a mask) within fp32 rounding; the pads' K/V lands in the user's
    later slots and in page 0 past its pages, nowhere else."""
    config = SMALL_CONFIGS["llama_gqa"]
    rt = RuntimeConfig(device=DEVICE, max_batch=2, max_seq_len=64, block_size=8)
    model = Transformer(config, state_dict(hf_model(config)), rt, decode_kernel=True)
    tol = 1e-4 if CUDA else 1e-5
    bucket = 16
    tokens = torch.randint(0, config.vocab_size, (prefix + bucket,),
                           generator=torch.Generator().manual_seed(3)).to(DEVICE)
    row = torch.zeros(rt.blocks_per_seq, dtype=torch.int64)
    row[:4] = torch.tensor([5, 2, 7, 3])  # pages for 32 positions: later pads fall in page 0
    row = row.to(DEVICE)
    caches = [PagedKVCache(config, rt, DEVICE, model.dtype) for _ in range(2)]
    for cache in caches:
        model.prefill(tokens[:prefix], 0, row, cache)
    chunk = tokens[prefix:prefix + n]
    want = model.prefill(chunk, prefix, row, caches[0], all_logits=True)  # [n, V]
    padded = tokens[prefix:]  # [bucket] the chunk and junk after it
    start = torch.tensor([prefix], device=DEVICE)
    got = model.prefill(padded, start, row, caches[1], all_logits=True)  # [bucket, V]
    torch.testing.assert_close(got[:n], want, rtol=tol, atol=tol)
    last = model.prefill(padded, start, row, caches[1], last=torch.tensor([n - 1], device=DEVICE))
    torch.testing.assert_close(last, want[-1], rtol=tol, atol=tol)
    for layer in range(config.num_layers):
        for a, b in ((caches[0].k[layer], caches[1].k[layer]),
                     (caches[0].v[layer], caches[1].v[layer])):
            for pos in range(prefix + n):
                page, off = int(row[pos // 8]), pos % 8
                torch.testing.assert_close(b[page, :, off], a[page, :, off], atol=tol, rtol=tol)
            touched = {int(p) for p in torch.nonzero(b.abs().sum((1, 2, 3)))[:, 0]}
            # the pages of positions [0, prefix + bucket): page 0 where pads pass position 31
            assert touched == {int(row[p // 8]) for p in range(prefix + bucket)}


def test_longrope_refuses_a_device_start() -> None:
    """LongRoPE chooses its tables on the host by the chunk's end: no device-side start (its
    continuation chunks run eagerly, `bucket_for(continuations=False)`)."""
    config = SMALL_CONFIGS["phi3_longrope"]
    rt = RuntimeConfig(device=DEVICE, max_batch=1, max_seq_len=64, block_size=16)
    model = Transformer(config, state_dict(hf_model(config)), rt, decode_kernel=True)
    assert model.rope.by_end and not Transformer(
        SMALL_CONFIGS["llama_gqa"], state_dict(hf_model(SMALL_CONFIGS["llama_gqa"])), rt,
        decode_kernel=True).rope.by_end
    cache = PagedKVCache(config, rt, DEVICE, model.dtype)
    row = torch.arange(1, rt.blocks_per_seq + 1, device=DEVICE)
    with pytest.raises(ValueError, match="LongRoPE"):
        model.prefill(torch.zeros(4, dtype=torch.int64, device=DEVICE),
                      torch.tensor([20], device=DEVICE), row, cache)
    with pytest.raises(ValueError, match="LongRoPE"):
        PrefillMeta.paged(model.rope, torch.tensor([0]), 4, row, 16, 1, 2)


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_replayed_prefill_has_the_eager_padded_bits(dtype: str) -> None:
    """Graph replay == the same padded prefill run eagerly (logits and cache, bit for bit), and
    close to the unpadded prefill; prompts at and across bucket edges, one per bucket in turn."""
    from llm.backends.torch.runner import TorchBackend
    from llm.model.checkpoint.common import Checkpoint

    config = SMALL_CONFIGS["llama_gqa"]
    rt = RuntimeConfig(device="cuda", dtype=dtype, max_batch=2, max_seq_len=160, block_size=16)
    backend = TorchBackend(Checkpoint(config, state_dict(hf_model(config)), source=None), rt)
    pg = backend.prefill_graphs
    assert pg is not None and sorted(pg.graphs) == [(b, c) for b in (16, 32, 64, 128)
                                                    for c in (False, True)]
    row = list(range(1, rt.blocks_per_seq + 1))
    g = torch.Generator().manual_seed(5)
    for n in (1, 16, 17, 100, 128):
        prompt = torch.randint(0, config.vocab_size, (n,), generator=g).tolist()
        runs = []
        for replay in (True, False):
            pg.replay = replay
            backend.cache.k[0].zero_()
            logits = pg.run(prompt, row).clone()
            runs.append((logits, backend.cache.k[0].clone()))
        (a, ka), (b, kb) = runs
        assert torch.equal(a, b) and torch.equal(ka, kb), n
        plain = backend.model.prefill(torch.tensor(prompt, device="cuda"), 0,
                                      torch.tensor(row, device="cuda"), backend.cache)
        tol = 1e-2 if dtype == "bfloat16" else 1e-5
        assert ((a.float() - plain.float()).norm() / plain.float().norm()) < tol
    pg.replay = True


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
def test_a_replayed_chunk_says_launched_before_its_token_is_read() -> None:
    """On the graph path prefill_step calls `launched` once, after the replay is enqueued and
    before the host reads the token: a chunk made slow by a kernel queued ahead of it is still
    running when `launched` is called."""
    from llm.backends.torch.runner import TorchBackend
    from llm.engine.contract.backend import PrefillInput, SequenceSampling
    from llm.engine.contract.sampling_params import SamplingParams
    from llm.model.checkpoint.common import Checkpoint

    config = SMALL_CONFIGS["llama_gqa"]
    rt = RuntimeConfig(device="cuda", dtype="bfloat16", max_batch=2, max_seq_len=160,
                       block_size=16)
    backend = TorchBackend(Checkpoint(config, state_dict(hf_model(config)), source=None), rt)
    row = list(range(1, rt.blocks_per_seq + 1))
    s = SequenceSampling(SamplingParams(), 0)
    busy = []

    def launched() -> None:
        busy.append(not torch.cuda.current_stream().query())

    torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time queued ahead of the chunk
    out = backend.prefill_step(PrefillInput(0, list(range(3, 40)), 0, row, s), launched)
    assert busy == [True] and len(out.tokens) == 1
    backend.close()
