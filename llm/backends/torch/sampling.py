"""Device-side token selection for the torch backend.

Token selection runs on the device tensors of the logits (no host round trip): greedy argmax, or
temperature / top-k / top-p sampling by the Gumbel-max trick with a counter-based random number per
(seed, position, vocabulary index). The noise for a request therefore depends only on its own seed
and the position being sampled, never on which other requests share the batch. On CUDA the whole
function is free of host synchronisation and global generator state (so it can live inside a CUDA
graph): whole rows, the draw in a Triton kernel (`draw_kernel`). On the CPU each sampled row draws
over the tokens it can draw only (`_draw_rows`); both equal `draw_whole_rows`, the definition in
torch ops.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass

import torch

from llm.engine.contract.sampling_params import MIN_TEMPERATURE, SamplingParams


@dataclass(frozen=True)
class SamplingTensors:
    """Per-row sampling parameters as device tensors, one row per user in the batch.

    temperature [B] f32 (0 = greedy), top_k [B] i64 (0 = off), top_p [B] f32, seed [B] i64,
    min_p [B] f32 (0 = off). filtered (host-known): some row may use top-k or top-p, so the
    rows are sorted; False skips the sort (the same tokens for rows that use neither).
    col_hash: the vocabulary's `column_hashes`, held by the backend so that the CPU draw hashes
    each token once a step instead of twice (None: hashed in each call; the same noise).
    """

    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    seed: torch.Tensor
    min_p: torch.Tensor
    filtered: bool = True
    col_hash: torch.Tensor | None = None

    @classmethod
    def build(cls, params: list[SamplingParams], seeds: list[int],
              device: torch.device | str, col_hash: torch.Tensor | None = None,
              ) -> SamplingTensors:
        return cls(
            temperature=torch.tensor([p.temperature for p in params], dtype=torch.float32,
                                     device=device),
            top_k=torch.tensor([p.top_k for p in params], dtype=torch.int64, device=device),
            top_p=torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device),
            seed=torch.tensor(seeds, dtype=torch.int64, device=device),
            min_p=torch.tensor([p.min_p for p in params], dtype=torch.float32, device=device),
            filtered=needs_sort(params),
            col_hash=col_hash,
        )

    @property
    def all_greedy(self) -> bool:
        """Host-side check used to pick the fast path (reads a small host copy, not the device)."""
        return bool((self.temperature == 0).all().item())


def needs_sort(params: list[SamplingParams]) -> bool:
    """Whether a batch's token selection needs its rows sorted: some row with a temperature
    uses top-k or top-p (top_p 1.0 keeps every token: no filter). A top_k 1 row counts: it is
    greedy, but the sampler sees its temperature and draws from its one kept token."""
    return any(p.temperature > 0 and (p.top_k > 0 or p.top_p < 1.0) for p in params)


_MASK32 = 0xFFFFFFFF
# The Gumbel noise -log(-log(u)) of u in [2^-33, 1 - 2^-33] lies in (-3.14, 22.87): a token whose
# x is more than this below the row's best x cannot win the draw (the CPU draw skips its noise)
NOISE_SPAN = 27.0
# The largest noise, -log(-log(1 - 2^-33)): no token more than this below an actual score wins
_G_MAX = -math.log(-math.log1p(-(2.0 ** -33)))
# Tokens more than _FAR below the anchor score win only with noise above _FAR, i.e. with hash
# bits above _FAR_BITS (0.7% of them): the rest need no logarithms. _MARGIN absorbs the anchor's
# Python logarithms in both cuts
_MARGIN = 0.01
_FAR = 5.0
_FAR_BITS = math.floor(math.exp(-math.exp(-(_FAR - _MARGIN))) * 4294967296.0 - 0.5)
_FEW = 256  # candidates scored whole without that test (its ops cost more than it saves)
_TRITON = importlib.util.find_spec("triton") is not None


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
    return _uniform_at(_stream_key(seed, position)[:, None], col[None, :])  # [B, V]


def _stream_key(seed: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """The per-row key of the counter noise, from its seed and position (int64 [B]; or Python
    ints, the same bits: `_stream_keys_host`)."""
    lo, hi = seed & _MASK32, (seed >> 32) & _MASK32  # the two 32-bit halves (two's complement)
    mixed = _hash32(lo * 0x9E3779B1 + 0x632BE5AB) ^ _hash32(hi + 0x7F4A7C15)
    return _hash32(mixed ^ _hash32(position + 0x5BD1E995))


def _stream_keys_host(seeds: list[int], positions: list[int]) -> list[int]:
    """`_stream_key` on Python integers (the CPU draw's keys: ~60 one-element tensor ops a step
    otherwise). The same bits: an int64 product that wraps keeps its low 32 bits, all that
    `_hash32` reads, and Python's & and >> act on negative seeds as two's complement."""
    return [_stream_key(seed, pos) for seed, pos in zip(seeds, positions, strict=True)]


def column_hashes(vocab: int, device: torch.device | str) -> torch.Tensor:
    """The per-token half of the counter noise's hash, [vocab] int64: it depends on the token id
    only, so a backend can hash its vocabulary once (SamplingTensors.col_hash)."""
    return _column_hash(torch.arange(vocab, device=device, dtype=torch.int64))


def _column_hash(col: torch.Tensor) -> torch.Tensor:
    return _hash32(col * 0x85EBCA6B + 0xC2B2AE35)


def _uniform_at(key: torch.Tensor, col: torch.Tensor,
                col_hash: torch.Tensor | None = None) -> torch.Tensor:
    """The uniform (0, 1) float64 of each token id `col` under `key` (broadcast together);
    col_hash: `_column_hash(col)` where the caller has it."""
    bits = _hash32(key ^ (_column_hash(col) if col_hash is None else col_hash))
    return _bits_uniform(bits)


def _bits_uniform(bits: torch.Tensor) -> torch.Tensor:
    """32-bit hash values (int64) -> the uniform (0, 1) float64 the noise is made of."""
    return (bits.to(torch.float64) + 0.5) / 4294967296.0


def _filter_sorted(x: torch.Tensor, st: SamplingTensors,
                   log_min_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, V] sorted (descending, ties by the lower id) with min_p, top-k and top-p applied
    (dropped values -inf), and the sort's order [B, V] (token ids)."""
    vocab = x.shape[-1]
    sorted_x, order = torch.sort(x, dim=-1, descending=True, stable=True)  # [B, V]
    ranks = torch.arange(vocab, device=x.device)[None, :]  # [1, V]
    k = torch.where(st.top_k > 0, st.top_k, torch.full_like(st.top_k, vocab))  # [B]
    # min_p against the row's max, sorted_x[:, 0]; the tokens it drops sort last (ranks stay);
    # min_p off keeps every rank (a +inf max would make the floor inf - inf = NaN)
    floor = torch.where(log_min_p > float("-inf"), sorted_x[:, :1] + log_min_p, -torch.inf)
    keep = (ranks < k[:, None]) & (sorted_x >= floor)
    # a row whose max is +inf (logits / temperature overflowed): its limit distribution, the
    # +inf tokens equally likely and the others 0, so that top-p's masses are not NaN
    inf_row = torch.isposinf(sorted_x[:, :1])  # [B, 1]
    limit = torch.where(torch.isposinf(sorted_x), 0.0, -torch.inf)
    probs = torch.softmax(torch.where(inf_row, limit, sorted_x).masked_fill(~keep, -torch.inf),
                          dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs  # probability of strictly better tokens
    # top-p; the best token always survives; top_p 1.0 keeps all (no float rounding of the mass)
    keep &= (mass_before < st.top_p[:, None]) | (st.top_p[:, None] >= 1.0)
    return sorted_x.masked_fill(~keep, float("-inf")), order


def sample(logits: torch.Tensor, st: SamplingTensors, position: torch.Tensor,
           all_greedy: bool | None = None) -> torch.Tensor:
    """Pick one token per row of `logits` [B, V]; returns [B] int64 on the logits' device.

    position [B]: the sequence position of the token being chosen (keys the random stream).
    all_greedy: pass the host-known answer to skip the sampling math entirely (greedy fast path).
    """
    if all_greedy if all_greedy is not None else st.all_greedy:
        return _argmax(logits)
    x = logits.float() / st.temperature.clamp_min(MIN_TEMPERATURE)[:, None]  # [B, V]
    if not (x.is_cuda and _TRITON):  # row by row, only the tokens that can win
        return _draw_rows(logits, x, st, position)
    greedy_tokens = _argmax(logits)
    sampled = draw_kernel(x, st, position)  # a row of NaNs: no candidate, its argmax
    return torch.where((st.temperature > 0) & (sampled < x.shape[-1]), sampled, greedy_tokens)


def _argmax(logits: torch.Tensor) -> torch.Tensor:
    """torch.argmax over the last dim [B]; on CUDA the split Triton argmax (v11: torch.argmax
    takes ~36 us a 128K row), which picks the same first maximum."""
    if (logits.is_cuda and _TRITON and logits.stride(-1) == 1
            and logits.dtype in (torch.float32, torch.bfloat16, torch.float16)):
        from llm.backends.torch.kernels.argmax import max_argmax

        return max_argmax(logits)[1]
    return torch.argmax(logits, dim=-1)


def _kept(x: torch.Tensor, st: SamplingTensors) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The candidates of the draw over the whole rows x [B, V]: sorted with min_p, top-k and
    top-p applied, and the sort's order (st.filtered), or min_p alone in vocabulary order."""
    log_min_p = torch.log(st.min_p)[:, None]  # [B, 1]; log 0 = -inf: min_p off
    if st.filtered:
        return _filter_sorted(x, st, log_min_p)
    # min_p: p_i >= min_p * p_max  <=>  x_i >= x_max + log(min_p)
    return x.masked_fill(x < x.amax(dim=-1, keepdim=True) + log_min_p, float("-inf")), None


def draw_whole_rows(x: torch.Tensor, st: SamplingTensors, position: torch.Tensor) -> torch.Tensor:
    """The draw over whole rows in torch ops (the definition the kernel and `_draw_rows` keep):
    argmax over the kept tokens of x + Gumbel noise [B]."""
    kept, order = _kept(x, st)
    if order is not None:
        kept = torch.full_like(x, float("-inf")).scatter(-1, order, kept)  # vocabulary order
    u = counter_uniform(st.seed, position, x.shape[-1])  # [B, V] f64
    return torch.argmax(kept.double() - torch.log(-torch.log(u)), dim=-1)  # [B]


def draw_kernel(x: torch.Tensor, st: SamplingTensors, position: torch.Tensor) -> torch.Tensor:
    """`draw_whole_rows` with the noise and the argmax in Triton (kernels/gumbel.py: the noise
    made in registers, the sorted row read with its order as token ids, nothing scattered)."""
    from llm.backends.torch.kernels.gumbel import gumbel_argmax

    kept, order = _kept(x, st)
    return gumbel_argmax(kept, st.seed, position, tokens=order)


def _draw_rows(logits: torch.Tensor, x: torch.Tensor, st: SamplingTensors,
               position: torch.Tensor) -> torch.Tensor:
    """`draw_whole_rows` one sampled row at a time (greedy rows: the argmax of logits), with noise
    and a sort only for the tokens that can be drawn: those kept by top-k / top-p (found by
    torch.topk of growing width) and within NOISE_SPAN of the row's best. They are a prefix of
    the row's sorted order, so top-k ranks and top-p masses are the same (the top-p normaliser
    sums the whole kept row). Then exact cuts by the anchor (`_anchor`, the best token's score):
    nothing more than the largest noise below it, and no token more than _FAR below it whose
    hash bits give a noise under _FAR, is scored (the cuts compare float32 values with bounds
    rounded to float32, which keeps their order; _MARGIN absorbs the anchor's Python
    logarithms). For the CPU, where whole rows' noise and sort cost ~1 and ~4 ms a row of 49,152
    tokens."""
    out = torch.empty(len(x), dtype=torch.int64, device=x.device)
    keys = _stream_keys_host(st.seed.tolist(), position.tolist())
    log_min_p = torch.log(st.min_p).tolist()
    for b, (temp, k, top_p) in enumerate(zip(st.temperature.tolist(), st.top_k.tolist(),
                                             st.top_p.tolist(), strict=True)):
        row = x[b]  # [V]
        best = row.max()
        floor = best + log_min_p[b]  # min_p's
        above = len(row) if log_min_p[b] == float("-inf") else int((row >= floor).sum())
        if temp <= 0:  # greedy
            out[b] = torch.argmax(logits[b])
            continue
        if not above or not bool(best.isfinite()):  # a broken row (NaN, +inf, also where
            # logits / temperature overflowed, or every token masked): the argmax of x, as the
            # whole-row draw falls back (noise added to +inf is +inf: its first +inf)
            out[b] = torch.argmax(row)
            continue
        limit = min(k, above) if k > 0 else above  # the tokens min_p and top-k keep
        z = _normaliser(row, best, floor, limit, above) if top_p < 1.0 else None
        sort = limit < above or z is not None  # top-k or top-p cut the row
        cut = torch.maximum(floor, best - NOISE_SPAN)
        table = st.col_hash if st.col_hash is not None and len(st.col_hash) == len(row) else None
        anchor = None  # the best token's score, where it may cut far above min_p's floor
        if not sort and log_min_p[b] < -15.0:
            anchor = _anchor(keys[b], best, int(torch.argmax(row)), table)
            cut = torch.maximum(cut, torch.tensor(anchor - _G_MAX - _MARGIN))
        if sort:  # nothing kept below the limit's / the nucleus's last value
            cut = torch.maximum(cut, _nucleus_floor(row, best, limit, z, top_p))
        whole = not sort and int((row >= cut).sum()) * 4 >= len(row)
        if whole:  # most of the row: masked in place is cheaper than gathered
            ids = torch.arange(len(row), device=row.device)
            vals = row.masked_fill(row < cut, float("-inf"))
        else:
            ids = torch.nonzero(row >= cut)[:, 0]  # [n] ascending
            vals = row[ids]
        if sort:
            vals, order = torch.sort(vals, descending=True, stable=True)  # ties: the lower id
            ids = ids[order]
            keep = torch.arange(len(ids), device=row.device) < limit
            if z is not None:
                probs = (torch.exp(vals - best) / z).masked_fill(~keep, 0.0)
                keep &= torch.cumsum(probs, dim=0) - probs < top_p
            vals = vals.masked_fill(~keep, float("-inf"))
        ch = table if table is None or whole else table[ids]
        bits = _hash32(keys[b] ^ (_column_hash(ids) if ch is None else ch))  # [n]
        if len(ids) > _FEW:  # only tokens near the anchor, or far with large noise, can reach it
            if anchor is None:  # sorted: the best token first
                anchor = _anchor(keys[b], best, int(ids[0] if sort else torch.argmax(row)),
                                 table)
            live = (vals >= anchor - _FAR) | (bits > _FAR_BITS)
            if int(live.sum()) * 2 < len(ids):  # else scoring all costs less
                live = torch.nonzero(live)[:, 0]  # ascending
                ids, vals, bits = ids[live], vals[live], bits[live]
        score = vals.double() - torch.log(-torch.log(_bits_uniform(bits)))  # [n]
        # the lowest id among equal scores: the first maximum where ids ascend (unsorted; max
        # over a dim gives the first, as argmax, and takes ~40 us a 49K float64 row against 70)
        out[b] = ids[score == score.max()].min() if sort else ids[torch.max(score, 0).indices]
    return out


def _anchor(key: int, best: torch.Tensor, top: int, table: torch.Tensor | None) -> float:
    """About the score (x + Gumbel noise) of the row's first best token `top` (value `best`)
    under the row's `key`, in Python floats: within rounding of what the draw computes for it,
    which the margins of its uses absorb. Every filter keeps that token, so nothing scoring far
    below it can be drawn. table: the vocabulary's `column_hashes`, where held."""
    col = int(table[top]) if table is not None else _column_hash(top)
    u = (_hash32(key ^ col) + 0.5) / 4294967296.0
    return float(best) - math.log(-math.log(u))


def _normaliser(row: torch.Tensor, best: torch.Tensor, floor: torch.Tensor, limit: int,
                above: int) -> torch.Tensor:
    """softmax's denominator over the `limit` best tokens of those >= floor (`above` of them):
    sum exp(x - best)."""
    if limit >= above:
        if above == len(row):  # the whole row (no masked copy; the same sum)
            return torch.exp(row - best).sum()
        return torch.exp(row[row >= floor] - best).sum()
    return torch.exp(torch.topk(row, limit).values - best).sum()


def _nucleus_floor(row: torch.Tensor, best: torch.Tensor, limit: int, z: torch.Tensor | None,
                   top_p: float) -> torch.Tensor:
    """A value every kept token reaches: the limit-th best value, or, where the best w < limit
    tokens already hold more than top_p of the mass (z: the normaliser), the w-th best."""
    if z is None:
        return torch.topk(row, limit).values[-1]
    width = min(64, limit)
    while True:
        top = torch.topk(row, width).values
        if width == limit or float(torch.exp(top - best).sum() / z) >= top_p + 1e-4:
            return top[-1]
        width = min(width * 8, limit)
