"""Structured output on the torch backend with a small random model and a trained byte-level BPE
tokenizer (its model vocabulary 5 ids wider than the tokenizer's, as padded embeddings are): the
constrained users' outputs match their grammars beside unconstrained users (penalties, logprobs,
sampling) in one batch, on the CPU and on CUDA, where the CUDA-graph decode (pipelined, a step
launched ahead) gives exactly the tokens of eager decode while constrained users come and go; and
the backend alone under masks that come and go, graphs against eager (no llguidance needed)."""

from __future__ import annotations

import dataclasses
import re
from concurrent.futures import Future

import numpy as np
import pytest
import torch
from hf_reference import SMALL_CONFIGS, hf_model, state_dict
from test_tokenizer import _tokenizer_json_dir

from llm.backends.torch.runner import TorchBackend
from llm.backends.torch.token_masks import apply_token_masks
from llm.engine.contract.backend import DecodeInput, PrefillInput, SequenceSampling
from llm.engine.contract.sampling_params import SamplingParams
from llm.engine.contract.structured import StructuredOutput, TokenMasks
from llm.engine.generator import Generator
from llm.engine.paged_kv import PageTable, PageTableSpec
from llm.model.checkpoint.common import Checkpoint
from llm.model.config import RuntimeConfig
from llm.model.tokenizer.tokenizer import Tokenizer

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="CUDA is not available on this machine"))]
WORD = r"[a-z]{3,8}"


@pytest.fixture(scope="module")
def parts(tmp_path_factory) -> tuple[Tokenizer, Checkpoint]:
    root = tmp_path_factory.mktemp("tok")
    tok = Tokenizer.from_path(_tokenizer_json_dir(root, {"eos_token": "</s>"}))
    config = dataclasses.replace(SMALL_CONFIGS["llama_gqa"], vocab_size=tok.vocab_size + 5,
                                 eos_token_ids=tok.eos_ids)
    return tok, Checkpoint(config, state_dict(hf_model(config)), source=None)


def _requests(tok: Tokenizer) -> tuple[list[list[int]], list[SamplingParams]]:
    prompt = tok.encode("the quick brown fox", add_special_tokens=False)
    params = [
        SamplingParams(max_new_tokens=20, structured=StructuredOutput("regex", WORD)),
        SamplingParams(max_new_tokens=24, logprobs=2, presence_penalty=0.5),
        SamplingParams(max_new_tokens=20, temperature=1.0, seed=3,
                       structured=StructuredOutput("choice", choices=("yes", "no"))),
        SamplingParams(max_new_tokens=24, temperature=0.8, seed=5),
        SamplingParams(max_new_tokens=10, temperature=0.9, seed=6, logprobs=1,
                       structured=StructuredOutput("grammar", 'root ::= "(" [a-z]+ ")"')),
    ]
    return [prompt, prompt[:2], prompt[1:], prompt[:3], prompt], params


def _check(outs) -> None:
    assert re.fullmatch(WORD, outs[0].text), outs[0].text
    assert outs[2].text in ("yes", "no"), outs[2].text
    assert outs[4].finish_reason == "length" or re.fullmatch(r"\([a-z]+\)", outs[4].text)


@pytest.mark.parametrize("device", DEVICES)
def test_constrained_and_free_users_in_one_batch(parts, device: str) -> None:
    pytest.importorskip("llguidance")
    tok, checkpoint = parts
    prompts, params = _requests(tok)
    rt = RuntimeConfig(device=device, max_batch=8, max_seq_len=96, block_size=16)
    outs = Generator(TorchBackend(checkpoint, rt, cuda_graphs=False), tok).generate(prompts,
                                                                                     params)
    _check(outs)
    if device == "cuda":  # the same with CUDA graphs: constrained batches replay masked graphs
        # (the masks applied inside; no step launched ahead)
        backend = TorchBackend(checkpoint, rt)
        graphed = Generator(backend, tok).generate(prompts, params)
        assert [o.token_ids for o in graphed] == [o.token_ids for o in outs]
        assert [o.logprobs for o in graphed] == [o.logprobs for o in outs]
        assert backend.graphs.stats["steps"] > 0  # the free users' last steps ran in graphs
        assert backend.graphs.stats["masked_steps"] > 0


@pytest.mark.parametrize("host_unpack", [True, False])
def test_apply_token_masks_matches_a_per_token_reference(host_unpack: bool) -> None:
    """Both expansions (numpy on the host, shifts on the device) against a loop over tokens; the
    unmasked rows come back bit for bit, the vocabulary need not be a multiple of 32."""
    vocab, rng = 100, np.random.default_rng(0)
    bits = rng.integers(-2**31, 2**31, size=(2, 4), dtype=np.int64).astype(np.int32)
    done: Future = Future()
    done.set_result(bits)
    logits = torch.randn(4, vocab)
    out = apply_token_masks(logits, TokenMasks((3, 1), done), host_unpack)
    want = logits.clone()
    for row, b in zip((3, 1), bits.view(np.uint32)):
        for t in range(vocab):
            if not (int(b[t // 32]) >> (t % 32)) & 1:
                want[row, t] = float("-inf")
    assert torch.equal(out, want) and torch.equal(out[[0, 2]], logits[[0, 2]])


def _masks(rows: tuple[int, ...], allowed: list[set[int]], vocab: int) -> TokenMasks:
    bits = np.zeros((len(rows), (vocab + 31) // 32), dtype=np.uint32)
    for row, tokens in zip(bits, allowed):
        for t in tokens:
            row[t // 32] |= np.uint32(1 << (t % 32))
    done: Future = Future()
    done.set_result(bits.view(np.int32))
    return TokenMasks(rows, done)


def _masked_decode(backend: TorchBackend) -> list[tuple[int, object]]:
    """Three users (penalties + logprobs, sampled, greedy) decoded 16 steps; on steps 3-8 the
    middle user is masked to a few tokens, so the batch switches between graphs and eager."""
    rt, vocab = backend.runtime, backend.config.vocab_size
    pages = PageTable(PageTableSpec(rt.total_blocks, rt.block_size, rt.blocks_per_seq),
                      rt.max_batch)
    sampling = [SequenceSampling(SamplingParams(logprobs=2, presence_penalty=0.5), 0, (2,)),
                SequenceSampling(SamplingParams(temperature=0.9, seed=4), 4),
                SequenceSampling(SamplingParams(), 0)]
    prompts = [[5, 6, 7, 8], list(range(10, 40)), [3, 4]]
    last, steps = [], []
    for slot, (p, s) in enumerate(zip(prompts, sampling)):
        pages.reserve(slot, len(p) + 20)
        last.append(backend.prefill(PrefillInput(slot, p, 0, pages.row(slot), s)))
    lens = [len(p) for p in prompts]
    for step in range(16):
        allowed = None
        if 3 <= step <= 8:
            allowed = _masks((1,), [{t for t in range(vocab) if t % 7 == step % 7}], vocab)
        out = backend.decode_step(DecodeInput([0, 1, 2], last, [n + step for n in lens],
                                              pages.table([0, 1, 2]), sampling, allowed))
        if allowed is not None:
            assert out.tokens[1] % 7 == step % 7
        last = list(out.tokens)
        steps.append((last, out.logprobs))
    return steps


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available on this machine")
def test_token_masks_under_cuda_graphs_equal_eager() -> None:
    """Masked steps replay masked graphs (the step launched ahead is dropped, none is launched
    after them), the unmasked steps return to the pipelined graphs: every token and logprob
    equals eager decode's."""
    config = SMALL_CONFIGS["llama_gqa"]
    w = state_dict(hf_model(config))
    rt = RuntimeConfig(device="cuda", dtype="float32", max_batch=4, max_seq_len=96, block_size=16)
    graphs = TorchBackend(Checkpoint(config, w, source=None), rt)
    eager = TorchBackend(Checkpoint(config, w, source=None), rt, cuda_graphs=False)
    assert _masked_decode(graphs) == _masked_decode(eager)
    assert graphs.graphs.stats["ahead_hits"] > 0
    assert graphs.graphs.stats["masked_steps"] > 0
