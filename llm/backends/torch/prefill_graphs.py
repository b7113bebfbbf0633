"""CUDA-graph prefill: a prompt chunk's forward pass as one replay, per padded length bucket.

Eager prefill launches ~12 kernels a layer from Python; on a slow host that takes longer than the
GPU needs (Llama-3.2-1B shapes, 2048 tokens, on the H200's host: 5.4-10 ms to enqueue ~7 ms of GPU
work; a 128-token prompt is host time only). A chunk that fits a bucket is padded at its end to the
bucket's length and run as one graph replay up to the last real token's logits; sampling the first
token stays outside the graph. Two sets of graphs share one memory pool:
- first chunks (start_pos 0): causal SDPA over the chunk's own keys, as eager prefill;
- continuation chunks (start_pos > 0: a prefix-cache hit's tail, a long prompt's later chunks, a
  chat's next turn): the start position is a graph input on the device; RoPE, the K/V write
  and the Triton paged prefill attention (kernels/paged_prefill.py) read it there, so one graph
  per bucket serves every start. LongRoPE models (tables chosen on the host by the end position)
  run continuation chunks eagerly.
Without captured graphs (the backend's eager mode) the same padded computation runs eagerly, so
eager and graph prefill give the same bits (tested on the GPU); tensor-parallel ranks, longer
chunks and chunks whose bucket would pass max_seq_len run unpadded, eagerly.

Padding is safe for the same reasons as decode's: attention is causal, so the real tokens never see
the pad tokens; the pad tokens' K/V lands at positions past the chunk's real tokens, in the user's
own reserved pages (not yet registered in the prefix cache: only pages before the chunk's end
are, and shared prefix pages lie before its start) or in page 0 (the page row past the user's
pages; the allocator never hands it out), and every position is written again by its real token
(a later chunk, or decode) before any query reads it. A bucket runs only where start_pos + bucket
<= max_seq_len, so pad positions stay inside the RoPE table and the page row.
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


def bucket_for(buckets: Sequence[int], n_tokens: int, start_pos: int, max_seq_len: int,
               continuations: bool = True) -> int | None:
    """The bucket a chunk of n_tokens at start_pos runs in, or None (eager prefill): the smallest
    that holds it, if its pad positions stay below max_seq_len. continuations False: only chunks
    that start their sequence (LongRoPE)."""
    if n_tokens < 1 or start_pos < 0 or (start_pos > 0 and not continuations):
        return None
    b = next((b for b in buckets if b >= n_tokens), None)
    return b if b is not None and start_pos + b <= max_seq_len else None


class PrefillGraphs:
    """Padded prefill over static input buffers; once `capture`d, one graph per bucket and kind
    (first / continuation chunk, one memory pool) replays it. `replay` False runs the same padded
    computation eagerly."""

    def __init__(self, model: Transformer, cache: PagedKVCache, max_seq_len: int,
                 max_pages: int) -> None:
        if not model.decode_kernel:
            raise ValueError("CUDA-graph prefill needs the Triton kernels (decode_kernel)")
        if model.mesh.size > 1:
            raise ValueError("CUDA-graph prefill runs on one rank (tensor parallel: eager)")
        self.model, self.cache = model, cache
        self.max_seq_len = max_seq_len
        self.buckets = prefill_buckets(max_seq_len)
        self.continuations = not model.rope.by_end  # LongRoPE: continuation chunks eager
        n = self.buckets[-1] if self.buckets else 1
        dev = model.device
        # the graphs' inputs, one int64 buffer (one copy stages them): the chunk's tokens [n],
        # its page row [max_pages], the last real token's index [1] and the start position [1]
        self._row_at = n
        size = n + max_pages + 2
        with torch.inference_mode():
            self._inputs = torch.zeros(size, dtype=torch.int64, device=dev)
            self.tokens, self.page_row, self.last, self.start = self._inputs.split(
                [n, max_pages, 1, 1])
        self._host = torch.zeros(size, dtype=torch.int64, pin_memory=True)
        self._host_np = self._host.numpy()  # the same pinned memory, filled without torch ops
        self._staged = torch.cuda.Event()  # the last staging copies: done before host reuse
        # keyed by (bucket, continuation); each graph's output logits [V] live in the pool
        self.graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}
        self.logits: dict[tuple[int, bool], torch.Tensor] = {}
        self.capture_s = 0.0
        self.replay = True  # use the captured graphs (False: the same computation, eagerly)

    def _kinds(self) -> list[tuple[int, bool]]:
        """Every (bucket, continuation) to capture, largest buckets first."""
        kinds = [False, True] if self.continuations else [False]
        return [(b, c) for c in kinds for b in reversed(self.buckets)]

    def _forward(self, bucket: int, continuation: bool) -> torch.Tensor:
        start = self.start if continuation else 0  # a continuation's start: on the device
        return self.model.prefill(self.tokens[:bucket], start, self.page_row, self.cache,
                                  last=self.last)  # [V]

    @torch.inference_mode()
    def capture(self) -> float:
        """Warm up and capture every bucket of both kinds; returns the seconds taken. The static
        page row is all page 0 and the start 0 meanwhile, so capture writes no user's pages."""
        t0 = time.perf_counter()
        dev = self.model.device
        stream = torch.cuda.Stream(dev)
        stream.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(stream):  # Triton compiles, cuBLAS and cuDNN pick their kernels
            for kind in self._kinds():
                self._forward(*kind)
        torch.cuda.current_stream(dev).wait_stream(stream)
        pool = torch.cuda.graph_pool_handle()
        for kind in self._kinds():
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[kind] = self._forward(*kind)
            self.graphs[kind] = graph
        torch.cuda.synchronize(dev)
        self.capture_s = time.perf_counter() - t0
        return self.capture_s

    def bucket(self, n_tokens: int, start_pos: int) -> int | None:
        """See `bucket_for`."""
        return bucket_for(self.buckets, n_tokens, start_pos, self.max_seq_len, self.continuations)

    @torch.inference_mode()
    def run(self, tokens: Sequence[int], page_row: Sequence[int],
            start_pos: int = 0) -> torch.Tensor:
        """Prefill a chunk at start_pos, padded to its bucket -> logits [V] of its last token (a
        replay's are valid until the next replay)."""
        n = len(tokens)
        b = self.bucket(n, start_pos)
        if b is None:
            raise ValueError(f"a chunk of {n} tokens at position {start_pos} fits no prefill "
                             f"bucket (largest {self.buckets[-1] if self.buckets else 0}, "
                             f"max_seq_len {self.max_seq_len})")
        kind = (b, start_pos > 0)
        self._stage(b, tokens, page_row, start_pos)
        if self.replay and kind in self.graphs:
            self.graphs[kind].replay()
            return self.logits[kind]
        return self._forward(*kind)

    def _stage(self, bucket: int, tokens: Sequence[int], page_row: Sequence[int],
               start_pos: int) -> None:
        """Copy the chunk (padded with token 0), its page row (padded with page 0), its last
        index and its start position to the device, in one copy of the pinned host buffer (the
        tokens past the bucket are stale and read by no graph of this bucket)."""
        n, at = len(tokens), self._row_at
        if len(page_row) > self.page_row.numel():
            raise ValueError(f"a page row of {len(page_row)} pages is longer than the graphs' "
                             f"{self.page_row.numel()} (max_pages)")
        self._staged.synchronize()  # the pinned buffer may still feed the previous copy
        host = self._host_np
        host[:n] = tokens
        host[n:bucket] = 0
        host[at:at + len(page_row)] = page_row
        host[at + len(page_row):-2] = 0
        host[-2], host[-1] = n - 1, start_pos
        self._inputs.copy_(self._host, non_blocking=True)
        self._staged.record()
