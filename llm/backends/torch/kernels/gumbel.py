"""The Gumbel-max draw of `sampling.sample` in two Triton passes, its noise made in registers.

`sample` picks argmax(x_t + g_t) over the kept tokens t, g_t = -log(-log(u_t)) in float64,
u_t the counter-based uniform of (seed, position, t) (`sampling.counter_uniform`). In torch ops
that is ~30 elementwise kernels over [B, V] int64 / float64 tensors (the hash alone is ~25),
most of a sampled decode step's selection time. Here the first pass hashes each token's counter
in registers and keeps each BLOCK's best (value, token); the second picks each row's best of
those. Same integer hash, same float64 formula, same tie rule (the lowest token among equal
maxima, as torch.argmax over the vocabulary): the same token as the torch ops, up to the last
bit of float64 `log` where the two libraries differ, which only matters between two candidates
equal to ~1e-16.

The values may come in any order with their token ids beside them (`tokens`): the sampler passes
the sorted, filtered row and the sort's order, so nothing is scattered back.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llm.backends.torch.kernels.pdl import launch_options, use_pdl, wait_then_release

_BIG = tl.constexpr(2**62)  # above every token id: the neutral of "the lowest token among the best"


@triton.jit
def _hash32(x):
    """`sampling._hash32` (lowbias32) on int64 values: the same bits."""
    m32 = tl.full(x.shape, 0xFFFFFFFF, tl.int64)
    x = x & m32
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & m32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & m32
    return x ^ (x >> 15)


@triton.jit
def _row_key(seed_ptr, pos_ptr, row):
    """The row's stream key from its seed and position (`sampling.counter_uniform`)."""
    seed = tl.load(seed_ptr + row + tl.arange(0, 1))  # [1] int64
    pos = tl.load(pos_ptr + row + tl.arange(0, 1))
    m32 = tl.full(seed.shape, 0xFFFFFFFF, tl.int64)
    lo = seed & m32
    hi = (seed >> 32) & m32
    mixed = _hash32(lo * tl.full(seed.shape, 0x9E3779B1, tl.int64) + 0x632BE5AB) ^ _hash32(
        hi + 0x7F4A7C15)
    return _hash32(mixed ^ _hash32(pos + 0x5BD1E995))


@triton.jit
def _partial_kernel(x_ptr, tok_ptr, seed_ptr, pos_ptr, val_ptr, best_ptr, n_cols, stride_x,
                    stride_t, HAS_TOKENS: tl.constexpr, N_CHUNKS: tl.constexpr,
                    BLOCK: tl.constexpr, USE_GDC: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    cols = chunk * BLOCK + tl.arange(0, BLOCK)
    inside = cols < n_cols
    wait_then_release(USE_GDC)
    key = _row_key(seed_ptr, pos_ptr, row)  # [1]
    x = tl.load(x_ptr + row * stride_x + cols, mask=inside, other=float("-inf"))
    if HAS_TOKENS:
        tok = tl.load(tok_ptr + row * stride_t + cols, mask=inside, other=0)
    else:
        tok = cols.to(tl.int64)
    mul = tl.full(tok.shape, 0x85EBCA6B, tl.int64)
    add = tl.full(tok.shape, 0xC2B2AE35, tl.int64)
    bits = _hash32(key ^ _hash32(tok * mul + add))  # [BLOCK] int64
    u = (bits.to(tl.float64) + 0.5) / 4294967296.0
    score = x.to(tl.float64) - tl.log(-tl.log(u))  # x + Gumbel noise
    score = tl.where(x == float("-inf"), float("-inf"), score)  # dropped tokens stay out
    best = tl.max(score, axis=0)
    first = tl.min(tl.where((score == best) & inside, tok, _BIG), axis=0)
    tl.store(val_ptr + row * N_CHUNKS + chunk, best)
    tl.store(best_ptr + row * N_CHUNKS + chunk, first)


@triton.jit
def _final_kernel(val_ptr, best_ptr, out_ptr, N_CHUNKS: tl.constexpr, CHUNKS_PAD: tl.constexpr,
                  USE_GDC: tl.constexpr):
    row = tl.program_id(0)
    c = tl.arange(0, CHUNKS_PAD)
    wait_then_release(USE_GDC)
    v = tl.load(val_ptr + row * N_CHUNKS + c, mask=c < N_CHUNKS, other=float("-inf"))
    tok = tl.load(best_ptr + row * N_CHUNKS + c, mask=c < N_CHUNKS, other=_BIG)
    best = tl.max(v, axis=0)
    tl.store(out_ptr + row, tl.min(tl.where(v == best, tok, _BIG), axis=0))


def gumbel_argmax(x: torch.Tensor, seed: torch.Tensor, position: torch.Tensor,
                  tokens: torch.Tensor | None = None, block: int = 2048,
                  pdl: bool | None = None) -> torch.Tensor:
    """The token of each row with the largest x + Gumbel noise (see the module): x [B, N] fp32
    (-inf: not a candidate), tokens [B, N] int64 the token of each value (None: column j is
    token j), seed and position [B] int64 -> [B] int64 (a row of -inf gives its first token;
    one of NaN, which no score equals, 2**62)."""
    if x.dtype != torch.float32 or x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"gumbel_argmax takes [B, N] fp32 values with contiguous rows, got "
                         f"{x.dtype} {tuple(x.shape)} strides {x.stride()}")
    if tokens is not None and (tokens.shape != x.shape or tokens.dtype != torch.int64
                               or tokens.stride(1) != 1):
        raise ValueError(f"gumbel_argmax: tokens must be int64 {tuple(x.shape)} with contiguous "
                         f"rows, got {tokens.dtype} {tuple(tokens.shape)}")
    if seed.shape != (x.shape[0],) or position.shape != (x.shape[0],):
        raise ValueError(f"gumbel_argmax: seed and position need one entry per row "
                         f"({x.shape[0]}), got {tuple(seed.shape)} and {tuple(position.shape)}")
    gdc = use_pdl(x, pdl)
    n, v = x.shape
    chunks = triton.cdiv(v, block)
    part_v = torch.empty(n, chunks, dtype=torch.float64, device=x.device)
    part_t = torch.empty(n, chunks, dtype=torch.int64, device=x.device)
    seed, position = seed.to(torch.int64).contiguous(), position.to(torch.int64).contiguous()
    _partial_kernel[(n, chunks)](
        x, x if tokens is None else tokens, seed, position, part_v, part_t, v, x.stride(0),
        0 if tokens is None else tokens.stride(0), HAS_TOKENS=tokens is not None,
        N_CHUNKS=chunks, BLOCK=block, USE_GDC=gdc, **launch_options(gdc))
    out = torch.empty(n, dtype=torch.int64, device=x.device)
    _final_kernel[(n,)](part_v, part_t, out, N_CHUNKS=chunks,
                        CHUNKS_PAD=triton.next_power_of_2(chunks), USE_GDC=gdc,
                        **launch_options(gdc))
    return out
