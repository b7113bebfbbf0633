"""kernels/gumbel.py (the sampler's Gumbel-max draw) against the torch ops it replaces, and the
CUDA sampler (which uses it) against the CPU sampler (which does not): the same tokens."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")
from llm.backends.torch.kernels.gumbel import gumbel_argmax  # noqa: E402
from llm.backends.torch.sampling import (  # noqa: E402
    SamplingTensors,
    counter_uniform,
    draw_kernel,
    draw_whole_rows,
    sample,
)
from llm.engine.contract.sampling_params import SamplingParams  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SEEDS = [0, 1, -1, -2**63, 2**63 - 1, 12345678901234, 2**32, 7]
POSITIONS = [0, 5, 100, 7, 2**40, 3, 65535, 1]


def _reference(x: torch.Tensor, seed: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    u = counter_uniform(seed.cpu(), pos.cpu(), x.shape[1])
    return torch.argmax(x.cpu().double() - torch.log(-torch.log(u)), dim=-1)


@pytest.mark.parametrize("vocab, block", [(3000, 512), (4096, 1024), (257, 2048)])
def test_gumbel_argmax_equals_the_torch_ops(vocab, block):
    """Whole rows, rows with dropped (-inf) tokens and a row with one candidate; the values in
    column order and shuffled with their token ids."""
    g = torch.Generator().manual_seed(vocab)
    n = len(SEEDS)
    x = torch.randn(n, vocab, generator=g) * 3
    x[1, ::3] = float("-inf")
    x[2, :] = float("-inf")
    x[2, vocab // 2] = 0.0
    seed, pos = torch.tensor(SEEDS), torch.tensor(POSITIONS)
    want = _reference(x, seed, pos)
    got = gumbel_argmax(x.to(DEVICE), seed.to(DEVICE), pos.to(DEVICE), block=block)
    assert got.cpu().tolist() == want.tolist()
    assert want[2] == vocab // 2
    order = torch.stack([torch.randperm(vocab, generator=g) for _ in range(n)])  # [n, V]
    got = gumbel_argmax(x.gather(1, order).to(DEVICE), seed.to(DEVICE), pos.to(DEVICE),
                        tokens=order.to(DEVICE), block=block)
    assert got.cpu().tolist() == want.tolist()


def test_gumbel_argmax_repeated_tokens():
    """A token listed several times (equal scores across blocks) is still the best one."""
    x = torch.zeros(1, 8)
    tokens = torch.tensor([[5, 3, 5, 3, 9, 9, 3, 5]])
    seed, pos = torch.tensor([4]), torch.tensor([2])
    noise = -torch.log(-torch.log(counter_uniform(seed, pos, 10)))[0]
    want = max([3, 5, 9], key=lambda t: noise[t].item())
    got = gumbel_argmax(x.to(DEVICE), seed.to(DEVICE), pos.to(DEVICE), tokens=tokens.to(DEVICE),
                        block=4)
    assert got.item() == want


def test_gumbel_argmax_refuses_bad_inputs():
    x = torch.zeros(2, 8, device=DEVICE)
    seed = pos = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="fp32"):
        gumbel_argmax(x.double(), seed, pos)
    with pytest.raises(ValueError, match="one entry per row"):
        gumbel_argmax(x, seed[:1], pos)
    with pytest.raises(ValueError, match="tokens must be int64"):
        gumbel_argmax(x, seed, pos, tokens=torch.zeros(2, 8, dtype=torch.int32, device=DEVICE))


MODES = [SamplingParams(temperature=0.8), SamplingParams(temperature=0.7, top_p=0.9),
         SamplingParams(temperature=1.3, top_k=40), SamplingParams(temperature=0.9, min_p=0.05),
         SamplingParams(temperature=1.0, top_k=200, top_p=0.8, min_p=0.01)]


@pytest.mark.parametrize("filtered", [False, True])
def test_the_kernel_draw_equals_the_whole_row_definition(filtered):
    """The sampler's CUDA path (sorted rows and their order into the kernel, or whole rows
    unsorted) gives the torch ops' tokens, here on the interpreter or the GPU; bf16-rounded
    rows (ties) and masked tokens included."""
    g = torch.Generator().manual_seed(5)
    n = 4 * len(MODES)
    logits = torch.randn(n, 2500, generator=g) * 4
    logits[::2] = logits[::2].bfloat16().float()
    logits[1::3, ::5] = float("-inf")
    params = [MODES[i % len(MODES)] if filtered else SamplingParams(temperature=0.5 + i / n,
                                                                    min_p=0.02 * (i % 3))
              for i in range(n)]
    st = SamplingTensors.build(params, list(range(100, 100 + n)), "cpu")
    assert st.filtered == filtered
    x, pos = logits / st.temperature[:, None], torch.arange(n) * 7
    want = draw_whole_rows(x, st, pos)
    st_dev = SamplingTensors.build(params, list(range(100, 100 + n)), DEVICE)
    assert draw_kernel(x.to(DEVICE), st_dev, pos.to(DEVICE)).cpu().tolist() == want.tolist()


@pytest.mark.skipif(DEVICE == "cpu", reason="the CUDA sampler (its Gumbel kernel) on a GPU")
@pytest.mark.parametrize("params", MODES)
def test_cuda_sampler_equals_the_cpu_sampler(params):
    """fp32 logits of 64 rows x 128,256 (Llama 3's vocabulary): every row the same token."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(64, 128256, generator=g) * 4
    seeds = list(range(-32, 32))
    pos = torch.arange(64) * 37
    st_cpu = SamplingTensors.build([params] * 64, seeds, "cpu")
    st_gpu = SamplingTensors.build([params] * 64, seeds, DEVICE)
    want = sample(logits, st_cpu, pos, all_greedy=False)
    got = sample(logits.to(DEVICE), st_gpu, pos.to(DEVICE), all_greedy=False)
    assert got.cpu().tolist() == want.tolist()


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1e-5, top_p=0.9),
    SamplingParams(temperature=1e-5, top_k=40),
    SamplingParams(temperature=1e-5, top_k=40, top_p=0.9, min_p=0.1),
])
def test_logits_over_temperature_that_overflow_draw_their_first_infinity(params):
    """Finite logits whose quotient by the temperature overflows float32 to +inf in several
    places: the kernel's draw and the whole sampler give the first of them, as the whole-row
    definition and the CPU sampler do (tests/test_sampling.py), on the interpreter or the GPU."""
    logits = torch.randn(2, 3000, generator=torch.Generator().manual_seed(9))
    logits[0, 10], logits[0, 20], logits[1, 2999], logits[1, 5] = 4e33, 5e33, 4e33, 4e33
    seeds, pos = [3, 4], torch.tensor([7, 8])
    st = SamplingTensors.build([params] * 2, seeds, "cpu")
    x = logits / st.temperature[:, None]
    assert int(torch.isinf(x).sum()) == 4
    want = draw_whole_rows(x, st, pos)
    assert want.tolist() == [10, 5]
    st_dev = SamplingTensors.build([params] * 2, seeds, DEVICE)
    assert draw_kernel(x.to(DEVICE), st_dev, pos.to(DEVICE)).cpu().tolist() == want.tolist()
    got = sample(logits.to(DEVICE), st_dev, pos.to(DEVICE), all_greedy=False)
    assert got.cpu().tolist() == want.tolist() == sample(logits, st, pos, all_greedy=False).tolist()
