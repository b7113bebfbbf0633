"""CUDA-graph continuation chunks (prefill_graphs.py): replay == the same padded computation run
eagerly, bit for bit; close to the unpadded eager continuation; the fallbacks (a bucket past
max_seq_len, LongRoPE) run eagerly through the backend. GPU only: CUDA graphs."""

from __future__ import annotations

import pytest
import torch
from hf_reference import SMALL_CONFIGS, hf_model, state_dict

from llm.engine.contract.backend import PrefillInput, SequenceSampling
from llm.engine.contract.sampling_params import SamplingParams
from llm.model.config import RuntimeConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


def _backend(name: str, dtype: str, max_seq_len: int = 160):
    from llm.backends.torch.runner import TorchBackend
    from llm.model.checkpoint.common import Checkpoint

    config = SMALL_CONFIGS[name]
    rt = RuntimeConfig(device="cuda", dtype=dtype, max_batch=2, max_seq_len=max_seq_len,
                       block_size=16)
    return TorchBackend(Checkpoint(config, state_dict(hf_model(config)), source=None), rt)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_replayed_continuation_has_the_eager_padded_bits(dtype: str) -> None:
    """After a 96-token first chunk, chunks at several starts and lengths (bucket edges, a
    partial last page): replay == eager padded (logits, every layer's K and V), and close to the
    unpadded eager continuation (gathered keys, SDPA with a mask)."""
    backend = _backend("llama_gqa", dtype)
    pg, cache = backend.prefill_graphs, backend.cache
    assert pg is not None and pg.continuations
    assert sorted(b for b, c in pg.graphs if c) == [16, 32, 64, 128]
    vocab = backend.config.vocab_size
    row = list(range(1, backend.runtime.blocks_per_seq + 1))
    g = torch.Generator().manual_seed(7)
    pg.run(torch.randint(0, vocab, (96,), generator=g).tolist(), row)
    saved = [t.clone() for t in cache.k + cache.v]

    def restore() -> None:
        for t, s in zip(cache.k + cache.v, saved, strict=True):
            t.copy_(s)

    for start, n in ((96, 1), (96, 16), (96, 17), (40, 50), (64, 64), (30, 100)):
        chunk = torch.randint(0, vocab, (n,), generator=g).tolist()
        runs = []
        for replay in (True, False):
            pg.replay = replay
            restore()
            logits = pg.run(chunk, row, start).clone()
            runs.append((logits, [t.clone() for t in cache.k + cache.v]))
        (a, ca), (b, cb) = runs
        assert torch.equal(a, b), (start, n)
        assert all(torch.equal(x, y) for x, y in zip(ca, cb, strict=True)), (start, n)
        restore()
        plain = backend.model.prefill(torch.tensor(chunk, device="cuda"), start,
                                      torch.tensor(row, device="cuda"), cache)
        assert _rel(a, plain) < (2e-2 if dtype == "bfloat16" else 1e-5), (start, n)
    pg.replay = True
    backend.close()


def _step(backend, tokens: list[int], start: int) -> int:
    row = list(range(1, backend.runtime.blocks_per_seq + 1))
    sampling = SequenceSampling(SamplingParams(max_new_tokens=1), seed=0)
    return backend.prefill_step(PrefillInput(0, tokens, start, row, sampling)).tokens[0]


def test_backend_routes_continuations_and_falls_back_eagerly() -> None:
    """Through the backend (fp32), the greedy token of the unpadded eager continuation: from a
    replay, from a chunk whose bucket would pass max_seq_len (run eagerly), and from a LongRoPE
    model's continuation (eager: it has no continuation graphs)."""
    backend = _backend("llama_gqa", "float32", max_seq_len=100)
    pg = backend.prefill_graphs
    prompt = torch.randint(0, backend.config.vocab_size, (100,),
                           generator=torch.Generator().manual_seed(1)).tolist()
    _step(backend, prompt[:64], 0)
    assert pg.bucket(20, 64) == 32 and pg.bucket(30, 70) is None  # 70 + 32 > 100
    row = torch.arange(1, backend.runtime.blocks_per_seq + 1, device="cuda")
    for start, end in ((64, 84), (70, 100)):  # a graph (bucket 32); eager (70 + 32 > 100)
        got = _step(backend, prompt[start:end], start)
        want = backend.model.prefill(torch.tensor(prompt[start:end], device="cuda"), start, row,
                                     backend.cache)
        assert got == int(want.argmax()), start
    backend.close()

    longrope = _backend("phi3_longrope", "float32", max_seq_len=64)
    pg = longrope.prefill_graphs
    assert not pg.continuations and all(not c for _, c in pg.graphs)
    assert pg.bucket(8, 16) is None and pg.bucket(8, 0) == 16
    _step(longrope, prompt[:16], 0)
    got = _step(longrope, prompt[16:24], 16)
    row = torch.arange(1, longrope.runtime.blocks_per_seq + 1, device="cuda")
    want = longrope.model.prefill(torch.tensor(prompt[16:24], device="cuda"), 16, row,
                                  longrope.cache)
    assert got == int(want.argmax())
    longrope.close()
