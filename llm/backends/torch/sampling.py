"""Device-side token selection for the torch backend.

Token selection runs on the device tensors of the logits (no host round trip): greedy argmax, or
temperature / top-k / top-p sampling by the Gumbel-max trick with a counter-based random number per
(seed, position, vocabulary index). The noise for a request therefore depends only on its own seed
and the position being sampled, never on which other requests share the batch, and the whole
function is free of host synchronisation and global generator state (so it can live inside a CUDA
graph).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llm.engine.contract.sampling_params import SamplingParams


@dataclass(frozen=True)
class SamplingTensors:
    """Per-row sampling parameters as device tensors, one row per user in the batch.

    temperature [B] f32 (0 = greedy), top_k [B] i64 (0 = off), top_p [B] f32, seed [B] i64,
    min_p [B] f32 (0 = off).
    """

    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    seed: torch.Tensor
    min_p: torch.Tensor

    @classmethod
    def build(cls, params: list[SamplingParams], seeds: list[int],
              device: torch.device | str) -> SamplingTensors:
        return cls(
            temperature=torch.tensor([p.temperature for p in params], dtype=torch.float32,
                                     device=device),
            top_k=torch.tensor([p.top_k for p in params], dtype=torch.int64, device=device),
            top_p=torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device),
            seed=torch.tensor(seeds, dtype=torch.int64, device=device),
            min_p=torch.tensor([p.min_p for p in params], dtype=torch.float32, device=device),
        )

    @property
    def all_greedy(self) -> bool:
        """Host-side check used to pick the fast path (reads a small host copy, not the device)."""
        return bool((self.temperature == 0).all().item())


_MASK32 = 0xFFFFFFFF


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer (lowbias32) on int64 tensors; every product stays below 2**63."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _MASK32
    return x ^ (x >> 15)


def counter_uniform(seed: torch.Tensor, position: torch.Tensor, vocab: int) -> torch.Tensor:
    """Uniform (0, 1) noise [B, vocab] that depends only on (seed[b], position[b], column).

    seed, position: [B] int64 (any int64 seed: both halves are mixed in, so seeds that share
    their low 32 bits, e.g. 0 and -2**63, draw different noise).
    """
    col = torch.arange(vocab, device=seed.device, dtype=torch.int64)  # [V]
    lo, hi = seed & _MASK32, (seed >> 32) & _MASK32  # the two 32-bit halves (two's complement)
    mixed = _hash32(lo * 0x9E3779B1 + 0x632BE5AB) ^ _hash32(hi + 0x7F4A7C15)
    key = _hash32(mixed ^ _hash32(position + 0x5BD1E995))  # [B]
    bits = _hash32(key[:, None] ^ _hash32(col[None, :] * 0x85EBCA6B + 0xC2B2AE35))  # [B, V]
    return (bits.to(torch.float64) + 0.5) / 4294967296.0


def sample(logits: torch.Tensor, st: SamplingTensors, position: torch.Tensor,
           all_greedy: bool | None = None) -> torch.Tensor:
    """Pick one token per row of `logits` [B, V]; returns [B] int64 on the logits' device.

    position [B]: the sequence position of the token being chosen (keys the random stream).
    all_greedy: pass the host-known answer to skip the sampling math entirely (greedy fast path).
    """
    greedy_tokens = torch.argmax(logits, dim=-1)  # [B]
    if all_greedy if all_greedy is not None else st.all_greedy:
        return greedy_tokens
    vocab = logits.shape[-1]
    x = logits.float() / st.temperature.clamp_min(1e-6)[:, None]  # [B, V]
    # min_p: p_i >= min_p * p_max  <=>  x_i >= x_max + log(min_p) (log(0) = -inf: none dropped)
    floor = x.amax(dim=-1) + torch.log(st.min_p)  # [B]
    x = x.masked_fill(x < floor[:, None], float("-inf"))
    sorted_x, order = torch.sort(x, dim=-1, descending=True)  # [B, V]
    ranks = torch.arange(vocab, device=x.device)[None, :]  # [1, V]
    k = torch.where(st.top_k > 0, st.top_k, torch.full_like(st.top_k, vocab))  # [B]
    keep = ranks < k[:, None]  # [B, V] top-k
    probs = torch.softmax(sorted_x.masked_fill(~keep, float("-inf")), dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs  # probability of strictly better tokens
    keep &= mass_before < st.top_p[:, None]  # top-p; the best token always survives
    filtered = torch.full_like(x, float("-inf")).scatter(-1, order, sorted_x.masked_fill(~keep,
                                                                                       float("-inf")))
    u = counter_uniform(st.seed, position, vocab)  # [B, V] f64
    gumbel = -torch.log(-torch.log(u))
    sampled = torch.argmax(filtered.double() + gumbel, dim=-1)  # [B]
    return torch.where(st.temperature > 0, sampled, greedy_tokens)
