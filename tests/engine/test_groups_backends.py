"""n > 1 and best_of on every backend's contract (torch on the CPU, tt on the emulator): the
page copy (`Backend.copy_pages`) reproduces a page exactly, a request's n sequences continue
its one prefill as the same request run alone would (greedy: n equal answers), seeded choices
are distinct and reproducible, and best_of returns the n sequences of highest cumulative
logprob.
"""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from fakes import FakeTokenizer
from hf_reference import SMALL_CONFIGS, hf_model, state_dict

from llm.engine.contract.backend import (
    BackendSpec,
    DecodeInput,
    Fork,
    PrefillInput,
    SequenceSampling,
    create_backend,
)
from llm.engine.contract.sampling_params import SamplingParams, choice_seed
from llm.engine.core import EngineCore
from llm.engine.generator import Generator
from llm.engine.scheduler import SchedulerConfig
from llm.model.checkpoint.common import Checkpoint

# name -> (backend, device, dtype, options); torch-cuda: CUDA graphs, Triton kernels, bf16
BACKENDS = {"torch": ("torch", "cpu", "float32", {}),
            "tt": ("tt", "cpu", "float32", {"implementation": "emulator"}),
            "torch-cuda": ("torch", "cuda", "bfloat16", {})}
GREEDY = SequenceSampling(SamplingParams(), 0)


@pytest.fixture(scope="module", params=sorted(BACKENDS))
def backend(request):
    name, device, dtype, options = BACKENDS[request.param]
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    config = dataclasses.replace(SMALL_CONFIGS["llama_gqa"], hidden_size=128, head_dim=32)
    spec = BackendSpec(Checkpoint(config, state_dict(hf_model(config)), source=None),
                       device=device, dtype=dtype, max_batch=4, max_seq_len=128, block_size=32,
                       options=options)
    b = create_backend(name, spec)
    yield b
    b.close()


def _prompt(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 320) for _ in range(n)]


def test_copied_pages_continue_a_prompt_as_the_original(backend) -> None:
    prompt = _prompt(40)  # pages 1 (full) and 2 (8 of 32 positions)
    first = backend.prefill(PrefillInput(0, prompt, 0, [1, 2, 0, 0], GREEDY))
    backend.copy_pages([(2, 5)])
    # slot 1: page 1 shared, page 5 the copy; slot 2: page 6 never written (no copy)
    rows = {0: [1, 2, 0, 0], 1: [1, 5, 0, 0], 2: [1, 6, 0, 0]}
    tokens = {}
    for slot, row in rows.items():
        tok, out = first, []
        for pos in range(40, 48):
            tok = backend.decode(DecodeInput([slot], [tok], [pos], [row], [GREEDY]))[0]
            out.append(tok)
        tokens[slot] = out
    assert tokens[1] == tokens[0]
    assert tokens[2] != tokens[0]  # without the copy the continuation differs


def test_forks_pick_their_first_tokens_from_the_same_logits(backend) -> None:
    prompt = _prompt(20, seed=1)
    one = backend.prefill_step(PrefillInput(0, prompt, 0, [1, 0, 0, 0], GREEDY)).tokens
    out = backend.prefill_step(PrefillInput(0, prompt, 0, [1, 0, 0, 0], GREEDY,
                                            forks=[Fork(1, GREEDY), Fork(2, GREEDY)]))
    assert list(out.tokens) == list(one) * 3
    sampled = [SequenceSampling(SamplingParams(temperature=5.0, logprobs=1),
                                choice_seed(3, i)) for i in range(3)]
    out = backend.prefill_step(PrefillInput(0, prompt, 0, [1, 0, 0, 0], sampled[0],
                                            forks=[Fork(i, s) for i, s in
                                                   enumerate(sampled[1:], 1)]))
    singles = [backend.prefill_step(PrefillInput(0, prompt, 0, [1, 0, 0, 0], s)).tokens[0]
               for s in sampled]
    assert list(out.tokens) == singles  # each fork draws with its own seed
    assert len(set(singles)) > 1  # at temperature 5 three seeds do not all agree
    assert [lp.token for lp in out.logprobs] == list(out.tokens)


def test_n_choices_continue_one_prefill(backend) -> None:
    core = EngineCore(backend, FakeTokenizer(), SchedulerConfig(prefill_chunk=32))
    gen = Generator(core)
    prompt = _prompt(45, seed=2)
    alone = gen.generate([prompt], SamplingParams(max_new_tokens=6, ignore_eos=True))[0]
    group = gen.generate([prompt], SamplingParams(n=3, max_new_tokens=6, ignore_eos=True))[0]
    assert [c.token_ids for c in group.choices] == [alone.token_ids] * 3
    # the forks' penalty rows start as the prompt's
    pen = SamplingParams(repetition_penalty=1.8, max_new_tokens=6, ignore_eos=True)
    alone = gen.generate([prompt], pen)[0]
    group = gen.generate([prompt], dataclasses.replace(pen, n=2))[0]
    assert [c.token_ids for c in group.choices] == [alone.token_ids] * 2
    params = SamplingParams(n=3, temperature=1.5, seed=11, max_new_tokens=6,
                            ignore_eos=True)
    a = gen.generate([prompt], params)[0]
    b = gen.generate([prompt], params)[0]
    assert [c.token_ids for c in a.choices] == [c.token_ids for c in b.choices]
    assert len({tuple(c.token_ids) for c in a.choices}) == 3  # distinct samples
    singles = [gen.generate([prompt], dataclasses.replace(
        params, n=1, seed=choice_seed(11, i)))[0] for i in range(3)]
    assert [c.token_ids[0] for c in a.choices] == [s.token_ids[0] for s in singles]
    every = gen.generate([prompt], dataclasses.replace(params, logprobs=0))[0].choices
    best = gen.generate([prompt], dataclasses.replace(params, n=2, best_of=3))[0]
    ranked = sorted(every, key=lambda o: -o.cumulative_logprob)[:2]
    assert [c.token_ids for c in best.choices] == [o.token_ids for o in ranked]
    assert [c.choice for c in best.choices] == [0, 1] and best.logprobs is None
    a = core.pages.allocator
    assert a.num_free == a.capacity and all(a.refs(p) == 0 for p in range(a.num_blocks))
