"""CUDA-graph decode: the torch backend's "trace".

One graph per (padded batch bucket, sampling mode, selection path) is captured once (modes:
greedy, sampled, sampled with top-k / top-p, which sorts); a decode step
is one replay (embedding, all layers with the Triton kernels, final norm, LM head and token
selection) over static device buffers. Rows past the live batch are padding: they feed token 0 at
position 0 through page 0, which the page allocator never hands out, so they cannot touch a user's
cache, and they use the scratch row of the penalty state. The selection path is host-known: the
plain sampler when no request of the batch uses penalties or logprobs (the speed of a batch that
does not is unchanged), else the full path (penalties.py, logprobs.py), whose logprobs are copied
to the host with the tokens.

Pipelining (the host reads tokens one step behind): after step t is replayed, its tokens are copied
to pinned memory and step t+1 is launched at once with its inputs produced on the device (the
sampled tokens, positions + 1); the host waits only for the copy of step t. If the next call asks
for exactly that step, it is already running and nothing is copied to the device. Otherwise (a user
left or joined) the step is recomputed from the host's inputs: a continuing user's K/V writes are
the same values at the same slots, and a departed user's extra write lands in its own pages before
any later prefill can reuse them (same stream), never past the pages reserved for its budget.

A batch with structured output cannot run ahead: its next masks exist only after the host has read
this step's tokens. Its steps replay masked graphs (captured on first use, per bucket and mode):
the token masks' bits are staged into a static buffer with the other inputs, expanded and applied
to the logits inside the graph before the selection, and no step is launched ahead.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from llm.backends.torch.kv_cache import PagedKVCache
from llm.backends.torch.logprobs import select, to_host, top_k_width
from llm.backends.torch.model import Transformer
from llm.backends.torch.penalties import SlotPenalties
from llm.backends.torch.sampling import SamplingTensors, needs_sort
from llm.backends.torch.token_masks import unpack_words
from llm.engine.contract.backend import SequenceSampling
from llm.engine.contract.outputs import StepOutput
from llm.engine.contract.sampling_params import SamplingParams
from llm.engine.contract.structured import TokenMasks

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
# (greedy, filtered, full): filtered = some sampled row uses top-k / top-p (the rows are sorted)
_MODES = ((True, False, False), (False, False, False), (False, True, False),
          (True, False, True), (False, False, True), (False, True, True))


def buckets_for(max_batch: int) -> list[int]:
    """Padded batch sizes to capture: the standard buckets below max_batch, then max_batch."""
    return [b for b in BUCKETS if b < max_batch] + [max_batch]


@dataclass(frozen=True)
class _Launched:
    """The step launched ahead: the batch it assumes, which the next call must match exactly."""

    slots: tuple[int, ...]
    tokens: tuple[int, ...]
    positions: tuple[int, ...]
    page_table: tuple[tuple[int, ...], ...]
    sampling: tuple[tuple[SamplingParams, int], ...]


class DecodeGraphs:
    """Captured decode steps over static input buffers (one per batch bucket, sampling mode and
    selection path); `penalties` is the backend's per-slot penalty state."""

    def __init__(self, model: Transformer, cache: PagedKVCache, max_batch: int,
                 max_pages: int, penalties: SlotPenalties) -> None:
        if not model.decode_kernel:
            raise ValueError("CUDA-graph decode needs the Triton paged-decode attention")
        self.model, self.cache, self.penalties = model, cache, penalties
        k = top_k_width(model.config.vocab_size)
        self.buckets = buckets_for(max_batch)
        dev = model.device
        n = self.buckets[-1]
        with torch.inference_mode():
            self.tokens = torch.zeros(n, dtype=torch.int64, device=dev)
            self.positions = torch.zeros(n, dtype=torch.int64, device=dev)
            self.page_table = torch.zeros(n, max_pages, dtype=torch.int64, device=dev)
            self.temperature = torch.zeros(n, dtype=torch.float32, device=dev)
            self.top_k = torch.zeros(n, dtype=torch.int64, device=dev)
            self.top_p = torch.ones(n, dtype=torch.float32, device=dev)
            self.min_p = torch.zeros(n, dtype=torch.float32, device=dev)
            self.seed = torch.zeros(n, dtype=torch.int64, device=dev)
            self.slots = torch.full((n,), penalties.scratch, dtype=torch.int64, device=dev)
            self.out = torch.zeros(n, dtype=torch.int64, device=dev)
            self.logprob = torch.zeros(n, dtype=torch.float32, device=dev)
            self.top_values = torch.zeros(n, k, dtype=torch.float32, device=dev)
            self.top_ids = torch.zeros(n, k, dtype=torch.int64, device=dev)
        # Host staging: one pinned row per input, copied to the device asynchronously.
        self._host = torch.zeros(5, n, dtype=torch.int64, pin_memory=True)
        self._host_f = torch.zeros(3, n, dtype=torch.float32, pin_memory=True)
        self._host_pt = torch.zeros(n, max_pages, dtype=torch.int64, pin_memory=True)
        self._out_host = torch.zeros(n, dtype=torch.int64, pin_memory=True)
        self._lp_host = torch.zeros(n, dtype=torch.float32, pin_memory=True)
        self._top_values_host = torch.zeros(n, k, dtype=torch.float32, pin_memory=True)
        self._top_ids_host = torch.zeros(n, k, dtype=torch.int64, pin_memory=True)
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple[int, bool, bool, bool], torch.cuda.CUDAGraph] = {}
        self.capture_s = 0.0
        self.pipeline = True  # launch the next step before returning this one's tokens
        self._ahead: _Launched | None = None
        self._ahead_full = False  # the step launched ahead took the penalty path (it counted)
        self._copied = torch.cuda.Event()
        self._masked: dict[tuple[int, bool, bool, bool], torch.cuda.CUDAGraph] = {}
        self._mask_words: torch.Tensor | None = None  # [max bucket, W] int32, on first use
        self._mask_host: torch.Tensor | None = None
        self.stats = {"steps": 0, "ahead_hits": 0, "masked_steps": 0}

    def _step(self, b: int, greedy: bool, filtered: bool, full: bool,
              masked: bool = False) -> None:
        st = SamplingTensors(self.temperature[:b], self.top_k[:b], self.top_p[:b], self.seed[:b],
                             self.min_p[:b], filtered)
        logits = self.model.decode(self.tokens[:b], self.positions[:b], self.page_table[:b],
                                   self.cache)  # [b, V]
        if masked:  # as token_masks.apply_token_masks: the disallowed tokens' logits at -inf
            keep = unpack_words(self._mask_words[:b])  # [b, 32 W]
            logits = torch.where(keep[:, :logits.shape[1]], logits, float("-inf"))
        if not full:
            self.out[:b] = self.model.sample(logits, st, self.positions[:b] + 1,
                                             all_greedy=greedy)
            return
        slots = self.slots[:b]
        self.penalties.count(slots, self.tokens[:b], self.positions[:b])  # the fed tokens, once
        sel = select(self.model.gather_logits(logits), st, self.positions[:b] + 1, greedy,
                     self.penalties, slots)
        self.out[:b] = sel.tokens
        self.logprob[:b] = sel.logprob
        self.top_values[:b] = sel.top_values
        self.top_ids[:b] = sel.top_ids

    @torch.inference_mode()
    def capture(self) -> float:
        """Capture every bucket (largest first, sharing one memory pool); returns seconds taken."""
        t0 = time.perf_counter()
        stream = torch.cuda.Stream(self.model.device)
        stream.wait_stream(torch.cuda.current_stream(self.model.device))
        with torch.cuda.stream(stream):  # warm-up: Triton compiles, cuBLAS picks its kernels
            for b in self.buckets:
                for key in _MODES:
                    self._step(b, *key)
        torch.cuda.current_stream(self.model.device).wait_stream(stream)
        for b in reversed(self.buckets):
            for mode in _MODES:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool):
                    self._step(b, *mode)
                self.graphs[(b, *mode)] = graph
        self.penalties.counts.zero_()  # the warm-up counted padding tokens
        self.penalties.counted.zero_()
        torch.cuda.synchronize(self.model.device)
        self.capture_s = time.perf_counter() - t0
        return self.capture_s

    def reset(self) -> None:
        """Forget the step launched ahead (its result will not be used)."""
        self._ahead = None

    @torch.inference_mode()
    def run(self, slots: Sequence[int], tokens: Sequence[int], positions: Sequence[int],
            page_table: Sequence[Sequence[int]], sampling: Sequence[SequenceSampling],
            full: bool, allowed: TokenMasks | None = None) -> StepOutput:
        """One decode step for B <= max_batch users: each user's next token, and the logprobs of
        those who asked. full: the penalty / logprobs path (host-known, see penalties.full_path).
        allowed: structured output's token masks (a masked graph; nothing launched ahead).
        """
        b = len(tokens)
        bucket = next(x for x in self.buckets if x >= b)
        params = [s.params for s in sampling]
        seeds = [s.seed for s in sampling]
        greedy = all(p.greedy for p in params)
        key = (bucket, greedy, not greedy and needs_sort(params), full)
        graph = self.graphs[key] if allowed is None else self._masked_graph(key)
        want = _Launched(tuple(slots), tuple(tokens), tuple(positions),
                         tuple(tuple(r) for r in page_table), tuple(zip(params, seeds)))
        self.stats["steps"] += 1
        if allowed is None and want == self._ahead:
            self.stats["ahead_hits"] += 1  # already running on the device
        else:
            if self._ahead is not None and self._ahead_full:  # its counts are not this step's
                self._uncount(self._ahead)
            self._stage(b, bucket, slots, tokens, positions, page_table, params, seeds)
            if allowed is not None:
                self._stage_masks(bucket, allowed)
                self.stats["masked_steps"] += 1
            graph.replay()
        stream = torch.cuda.current_stream(self.model.device)
        self._out_host[:b].copy_(self.out[:b], non_blocking=True)
        wanted = [p.logprobs for p in params]
        logprobs = full and any(k is not None for k in wanted)
        if logprobs:  # queued before the step launched ahead overwrites them
            self._lp_host[:b].copy_(self.logprob[:b], non_blocking=True)
            self._top_values_host[:b].copy_(self.top_values[:b], non_blocking=True)
            self._top_ids_host[:b].copy_(self.top_ids[:b], non_blocking=True)
        self._copied.record(stream)
        ahead = self.pipeline and allowed is None  # a masked step's successor needs new masks
        if ahead:  # launch the next step now, fed on the device, while the host reads
            self.tokens[:b].copy_(self.out[:b])
            self.positions[:b] += 1
            graph.replay()
        self._copied.synchronize()
        result = self._out_host[:b].tolist()
        out = StepOutput(result)
        if logprobs:
            out = StepOutput(result, to_host(result, self._lp_host[:b], self._top_values_host[:b],
                                             self._top_ids_host[:b], wanted))
        if not ahead:
            self._ahead = None
            return out
        self._ahead = _Launched(want.slots, tuple(result), tuple(p + 1 for p in positions),
                                want.page_table, want.sampling)
        self._ahead_full = full
        return out

    def _masked_graph(self, key: tuple[int, bool, bool, bool]) -> torch.cuda.CUDAGraph:
        """The masked graph of (bucket, greedy, filtered, full), captured on first use (the
        kernels were compiled and warmed by `capture`; the mask buffers are allocated then,
        outside the graphs' pool)."""
        graph = self._masked.get(key)
        if graph is not None:
            return graph
        if self._mask_words is None:
            n, words = self.buckets[-1], -(-self.model.lm_head.vocab_size // 32)
            self._mask_words = torch.full((n, words), -1, dtype=torch.int32,
                                          device=self.model.device)
            self._mask_host = torch.full((n, words), -1, dtype=torch.int32, pin_memory=True)
        graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(graph, pool=self.pool):
            self._step(*key, masked=True)
        self._masked[key] = graph
        return graph

    def _stage_masks(self, bucket: int, allowed: TokenMasks) -> None:
        """Copy the masks' bits (rows not listed: every token allowed) to the static buffer; waits
        for the masks to be computed."""
        bits = allowed.result_for(self.model.lm_head.vocab_size)  # [R, W] 32-bit words
        host = self._mask_host
        words = host.shape[1]
        host[:bucket] = -1
        host[list(allowed.rows)] = torch.from_numpy(
            np.ascontiguousarray(bits[:, :words]).view(np.int32))
        self._mask_words[:bucket].copy_(host[:bucket], non_blocking=True)

    def _uncount(self, ahead: _Launched) -> None:
        """Undo the penalty counts of the step launched ahead (its fed tokens at its positions;
        stream-ordered after it). Slots are not reassigned in between: a prefill `reset`s first."""
        dev = self.model.device
        self.penalties.uncount(torch.tensor(ahead.slots, device=dev),
                               torch.tensor(ahead.tokens, device=dev),
                               torch.tensor(ahead.positions, device=dev))

    def _stage(self, b: int, bucket: int, slots: Sequence[int], tokens: Sequence[int],
               positions: Sequence[int], page_table: Sequence[Sequence[int]],
               params: Sequence[SamplingParams], seeds: Sequence[int]) -> None:
        """Copy one step's inputs (padded to the bucket) to the static device buffers."""
        host, host_f, pt = self._host, self._host_f, self._host_pt
        host[:, :bucket] = 0
        host[0, :b] = torch.tensor(tokens)
        host[1, :b] = torch.tensor(positions)
        host[2, :b] = torch.tensor([p.top_k for p in params])
        host[3, :b] = torch.tensor(seeds)
        host[4, :bucket] = self.penalties.scratch
        host[4, :b] = torch.tensor(list(slots))
        host_f[0, :bucket] = 0.0
        host_f[1, :bucket] = 1.0
        host_f[2, :bucket] = 0.0
        host_f[0, :b] = torch.tensor([p.temperature for p in params])
        host_f[1, :b] = torch.tensor([p.top_p for p in params])
        host_f[2, :b] = torch.tensor([p.min_p for p in params])
        pt[:bucket] = 0
        pt[:b, : len(page_table[0])] = torch.tensor([list(r) for r in page_table])
        for dst, src in ((self.tokens, host[0]), (self.positions, host[1]),
                         (self.top_k, host[2]), (self.seed, host[3]), (self.slots, host[4]),
                         (self.temperature, host_f[0]), (self.top_p, host_f[1]),
                         (self.min_p, host_f[2])):
            dst[:bucket].copy_(src[:bucket], non_blocking=True)
        self.page_table[:bucket].copy_(pt[:bucket], non_blocking=True)
