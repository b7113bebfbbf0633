"""CUDA-graph prefill: a prompt's forward pass as one replay, per padded prompt-length bucket.

Eager prefill launches ~12 kernels a layer from Python; on a slow host that takes longer than the
GPU needs (Llama-3.2-1B shapes, 2048 tokens, on the H200's host: 5.4-10 ms to enqueue ~7 ms of GPU
work; a 128-token prompt is host time only). A prompt that starts a sequence (start_pos 0) and fits
a bucket is padded at its end to the bucket's length and run as one graph replay up to the last real
token's logits; sampling the first token stays outside the graph. Without captured graphs (the
backend's eager mode) the same padded computation runs eagerly, so eager and graph prefill give
the same bits (tested on the GPU); tensor-parallel ranks and longer prompts run unpadded, eagerly.

Padding is safe for the same reasons as decode's: attention is causal, so the real tokens never see
the pad tokens; the pad tokens' K/V lands at positions past the prompt, in the user's own reserved
pages or in page 0 (which the allocator never hands out), and decode writes each position before
any query reads it. Buckets never exceed the cache's max_seq_len, so pad positions stay inside the
RoPE table and the page row.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from llm.backends.torch.kv_cache import PagedKVCache
from llm.backends.torch.model import Transformer

# Powers of two up to 256 (short prompts are host-bound: padding costs little GPU time), then steps
# of 512 (at most +50% tokens of padding where prompts are compute-bound).
PREFILL_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 1536, 2048)


def prefill_buckets(max_seq_len: int) -> list[int]:
    """The padded prompt lengths to capture for a cache of max_seq_len tokens per sequence."""
    return [b for b in PREFILL_BUCKETS if b <= max_seq_len]


def bucket_for(buckets: Sequence[int], n_tokens: int, start_pos: int) -> int | None:
    """The bucket a prompt of n_tokens at start_pos runs in, or None (eager prefill): only prompts
    that start their sequence (a continuation attends over cached keys: another attention path)."""
    if start_pos != 0 or n_tokens < 1 or not buckets or n_tokens > buckets[-1]:
        return None
    return next(b for b in buckets if b >= n_tokens)


class PrefillGraphs:
    """Padded prefill over static input buffers; once `capture`d, one graph per bucket (sharing
    one memory pool) replays it. `replay` False runs the same padded computation eagerly."""

    def __init__(self, model: Transformer, cache: PagedKVCache, max_seq_len: int,
                 max_pages: int) -> None:
        if not model.decode_kernel:
            raise ValueError("CUDA-graph prefill needs the Triton kernels (decode_kernel)")
        if model.mesh.size > 1:
            raise ValueError("CUDA-graph prefill runs on one rank (tensor parallel: eager)")
        self.model, self.cache = model, cache
        self.buckets = prefill_buckets(max_seq_len)
        n = self.buckets[-1] if self.buckets else 1
        dev = model.device
        with torch.inference_mode():
            self.tokens = torch.zeros(n, dtype=torch.int64, device=dev)
            self.page_row = torch.zeros(max_pages, dtype=torch.int64, device=dev)
            self.last = torch.zeros(1, dtype=torch.int64, device=dev)
        self._host_tokens = torch.zeros(n, dtype=torch.int64, pin_memory=True)
        self._host_row = torch.zeros(max_pages, dtype=torch.int64, pin_memory=True)
        self._host_last = torch.zeros(1, dtype=torch.int64, pin_memory=True)
        self._staged = torch.cuda.Event()  # the last staging copies: done before host reuse
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}  # each graph's output [V], in the pool
        self.capture_s = 0.0
        self.replay = True  # use the captured graphs (False: the same computation, eagerly)

    def _forward(self, bucket: int) -> torch.Tensor:
        return self.model.prefill(self.tokens[:bucket], 0, self.page_row, self.cache,
                                  last=self.last)  # [V]

    @torch.inference_mode()
    def capture(self) -> float:
        """Warm up and capture every bucket (largest first); returns the seconds taken. The static
        page row is all page 0 meanwhile, so capture writes no user's pages."""
        t0 = time.perf_counter()
        dev = self.model.device
        stream = torch.cuda.Stream(dev)
        stream.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(stream):  # Triton compiles, cuBLAS and cuDNN pick their kernels
            for b in self.buckets:
                self._forward(b)
        torch.cuda.current_stream(dev).wait_stream(stream)
        pool = torch.cuda.graph_pool_handle()
        for b in reversed(self.buckets):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[b] = self._forward(b)
            self.graphs[b] = graph
        torch.cuda.synchronize(dev)
        self.capture_s = time.perf_counter() - t0
        return self.capture_s

    def bucket(self, n_tokens: int, start_pos: int) -> int | None:
        """See `bucket_for`."""
        return bucket_for(self.buckets, n_tokens, start_pos)

    @torch.inference_mode()
    def run(self, tokens: Sequence[int], page_row: Sequence[int]) -> torch.Tensor:
        """Prefill a prompt that starts its sequence, padded to its bucket -> logits [V] of its
        last token (a replay's are valid until the next replay)."""
        n = len(tokens)
        b = self.bucket(n, 0)
        if b is None:
            raise ValueError(f"a prompt of {n} tokens fits no prefill bucket "
                             f"(largest {self.buckets[-1] if self.buckets else 0})")
        self._stage(b, tokens, page_row)
        if self.replay and b in self.graphs:
            self.graphs[b].replay()
            return self.logits[b]
        return self._forward(b)

    def _stage(self, bucket: int, tokens: Sequence[int], page_row: Sequence[int]) -> None:
        """Copy the prompt (padded with token 0), its page row and its last index to the device."""
        n = len(tokens)
        self._staged.synchronize()  # the pinned rows may still feed the previous copies
        host = self._host_tokens
        host[:bucket] = 0
        host[:n] = torch.tensor(tokens, dtype=torch.int64)
        self._host_row[:] = 0
        self._host_row[:len(page_row)] = torch.tensor(list(page_row), dtype=torch.int64)
        self._host_last[0] = n - 1
        self.tokens[:bucket].copy_(host[:bucket], non_blocking=True)
        self.page_row.copy_(self._host_row, non_blocking=True)
        self.last.copy_(self._host_last, non_blocking=True)
        self._staged.record()
