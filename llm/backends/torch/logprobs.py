"""Log probabilities on the device, from the logits the sampler picks from.

`select` is the selection path of a batch in which some request uses penalties or logprobs: the
penalties (penalties.py), then the sampler (sampling.py) and the log probabilities of the
processed logits divided by the temperature (1 for greedy rows): the chosen token's and the
MAX_LOGPROBS best, always that many (a fixed shape, so the step fits in a CUDA graph); each
request keeps as many as it asked for on the host (`to_host`).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from llm.backends.torch.penalties import SlotPenalties
from llm.backends.torch.sampling import SamplingTensors, sample
from llm.engine.contract.outputs import TokenLogprobs
from llm.engine.contract.sampling_params import MAX_LOGPROBS

_TRITON = importlib.util.find_spec("triton") is not None


@dataclass(frozen=True)
class Selected:
    """One step's choices. tokens [B] i64; logprob [B] f32 (the chosen token's); top_values
    [B, K] f32 and top_ids [B, K] i64: the K best, best first."""

    tokens: torch.Tensor
    logprob: torch.Tensor
    top_values: torch.Tensor
    top_ids: torch.Tensor


def top_k_width(vocab: int) -> int:
    """K: how many alternatives the device computes per row."""
    return min(MAX_LOGPROBS, vocab)


def logprobs_of(x: torch.Tensor, temperature: torch.Tensor,
                tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log_softmax(x / T) of processed logits x [B, V] (T = 1 where temperature is 0): the
    logprob of `tokens` [B], and the K best values and ids [B, K]."""
    t = torch.where(temperature > 0, temperature, torch.ones_like(temperature))  # [B]
    z = x.float() / t[:, None]  # [B, V]
    k = top_k_width(x.shape[-1])
    if z.is_cuda and _TRITON:  # two Triton passes instead of torch's logsumexp and topk
        from llm.backends.torch.kernels.logprobs import lse_topk

        lse, values, ids = lse_topk(z.contiguous(), k)  # [B], [B, K], [B, K]
    else:
        lse = torch.logsumexp(z, dim=-1)  # [B]; log_softmax(z) = z - lse, never materialized
        values, ids = torch.topk(z, k, dim=-1)  # [B, K]
    return z.gather(1, tokens[:, None])[:, 0] - lse, values - lse[:, None], ids


def select(logits: torch.Tensor, st: SamplingTensors, sample_pos: torch.Tensor,
           all_greedy: bool, penalties: SlotPenalties, slots: torch.Tensor) -> Selected:
    """Penalties, then the token and its logprobs, for the whole-vocabulary logits [B, V]; rows
    `slots` [B] of `penalties` (counted already for this step's fed tokens)."""
    x = penalties.apply(logits, slots, sample_pos)  # [B, V] f32
    tokens = sample(x, st, sample_pos, all_greedy=all_greedy)  # [B]
    logprob, values, ids = logprobs_of(x, st.temperature, tokens)
    return Selected(tokens, logprob, values, ids)


def to_host(tokens: Sequence[int], logprob: torch.Tensor, values: torch.Tensor,
            ids: torch.Tensor, wanted: Sequence[int | None]) -> list[TokenLogprobs | None]:
    """CPU tensors of a step -> one TokenLogprobs per row that asked (`wanted`: its k or None)."""
    lp, vals, top = logprob.tolist(), values.tolist(), ids.tolist()
    return [None if k is None else
            TokenLogprobs(tok, lp[i], tuple(zip(top[i][:k], vals[i][:k])))
            for i, (tok, k) in enumerate(zip(tokens, wanted))]


def prompt_logprobs(logits: torch.Tensor, temperature: float, targets: Sequence[int],
                    k: int) -> list[TokenLogprobs]:
    """Logprobs of the prompt's `targets` [T] from the model's logits [>= T, V] at the positions
    before them: log_softmax(logits / temperature) (1 for greedy), the k best of each, and each
    target's rank (tokens with a logprob >= its own)."""
    x = logits[: len(targets)].float() / (temperature if temperature > 0 else 1.0)  # [T, V]
    lp = torch.log_softmax(x, dim=-1)  # [T, V]
    ids = torch.tensor(list(targets), dtype=torch.int64, device=lp.device)
    chosen = lp.gather(1, ids[:, None])[:, 0]  # [T]
    rank = (lp >= chosen[:, None]).sum(dim=-1)  # [T]
    values, top = torch.topk(lp, k, dim=-1)  # [T, k]
    return [TokenLogprobs(t, c, tuple(zip(i, v)), r)
            for t, c, i, v, r in zip(targets, chosen.tolist(), top.tolist(), values.tolist(),
                                     rank.tolist())]
