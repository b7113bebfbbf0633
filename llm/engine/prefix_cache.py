"""Automatic prefix caching: which KV pages of a prompt another request already computed.

A full page of prompt positions is keyed by a hash chain: key(page i) = sha256(key(page i - 1) +
the page's token ids), rooted in everything else its K/V depend on besides those tokens and the
model: the page size and the prefill chunk size (see below). Equal keys thus mean equal tokens at
equal positions after an equal prefix. A request's `SamplingParams.cache_salt` (vLLM's) is folded
into the root too: requests with different salts (or one salted, one not) never share a page, so
a client cannot learn from timing which prompts another tenant sent; without a salt the keys are
those of the plain root.

Bit-identity with a cold run is the rule: a request served from the cache must produce exactly
the tokens (and logprobs) it would have produced without it. Hence:

- The K/V of a prompt position depend on the shape of the prefill call that computed them (matmul
  row counts change the order of float accumulation), and the scheduler prefills a prompt in
  chunks of `prefill_chunk` tokens starting at multiples of it. So only pages lying inside *full*
  chunks are registered (a prompt's last, shorter chunk computes its positions in a smaller
  call), and a hit is cut down to a multiple of the chunk (and of the page) so that the chunks
  computed after it are those of a cold run: same starts, same lengths, same inputs.
- Pages holding K/V written by decode steps (generated tokens) are never registered: a decode
  step computes them in another call shape than prefill would.
- The last prompt token is always computed (its logits choose the first token), so a hit ends
  before it.
- Requests asking for prompt logprobs need the logits of every prompt position: they neither
  use nor fill the cache (their prefill also runs another call than the plain one).
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Sequence

from llm.engine.paged_kv import PageTable
from llm.engine.sequence import Sequence as Request


class PrefixCachePolicy:
    """The page keys of prompts and the part of a prompt the cache may serve, for one page size
    and one prefill chunk size (the cache lives in the BlockAllocator)."""

    def __init__(self, block_size: int, prefill_chunk: int) -> None:
        self.block_size = block_size
        self.prefill_chunk = prefill_chunk
        # hits are whole chunks made of whole pages
        self.granule = math.lcm(block_size, prefill_chunk)
        self._about = (f"llm prefix cache v1: block_size={block_size} "
                       f"prefill_chunk={prefill_chunk}").encode()
        self._root = hashlib.sha256(self._about).digest()

    def root(self, salt: str | None = None) -> bytes:
        """The key the chain of a prompt starts from: the plain root, or with a cache salt, the
        hash of the plain root's description and the salt (a hash of text, where a page key
        hashes a SHA-256 digest and token ids: no salted root is another chain's page key)."""
        if salt is None:
            return self._root
        return hashlib.sha256(self._about + b" cache_salt=" + salt.encode()).digest()

    def page_keys(self, tokens: Sequence[int], packed: bytes | None = None,
                  salt: str | None = None) -> list[bytes]:
        """The keys of every full page of `tokens` (a prompt), in order. packed: the same tokens
        as native int64s (`struct.pack`), where the caller has them already. salt: the request's
        cache salt (None: none)."""
        full = len(tokens) // self.block_size * self.block_size
        if packed is None:
            packed = struct.pack(f"{full}q", *tokens[:full])
        keys, key, step = [], self.root(salt), 8 * self.block_size
        sha256 = hashlib.sha256
        for end in range(step, 8 * full + 1, step):
            key = sha256(key + packed[end - step:end]).digest()
            keys.append(key)
        return keys

    def usable_pages(self, prompt_len: int, cached_pages: int) -> int:
        """Of `cached_pages` leading pages found in the cache for a prompt of `prompt_len`
        tokens, how many a request may use: whole chunks, ending before the last prompt token."""
        tokens = min(cached_pages * self.block_size, prompt_len - 1)
        return tokens // self.granule * self.granule // self.block_size

    def registrable_pages(self, prefilled: int, chunk_len: int) -> int:
        """Leading pages of a prompt that may be registered once a prefill chunk of `chunk_len`
        tokens ended at position `prefilled`: after a full chunk, those inside the chunks
        computed so far; after the last, shorter chunk of a prompt, none more (0)."""
        if chunk_len != self.prefill_chunk:
            return 0
        return prefilled // self.block_size


class PrefixCache:
    """The prefix cache of one scheduler over its page table: which cached pages a request starts
    with, and registering the pages its prefill chunks complete."""

    def __init__(self, pages: PageTable, prefill_chunk: int) -> None:
        self.pages = pages
        self.policy = PrefixCachePolicy(pages.spec.block_size, prefill_chunk)

    def lookup(self, seq: Request) -> list[int]:
        """The cached pages `seq` may start with (none for a request wanting prompt
        logprobs; only pages of its own cache salt)."""
        if seq.out.prompt_logprobs is not None:
            return []
        if seq.page_keys is None:
            seq.page_keys = self.policy.page_keys(seq.out.prompt_token_ids, seq.packed_prompt,
                                                  seq.params.cache_salt)
            seq.packed_prompt = None  # read only for the keys
        found = self.pages.allocator.lookup(seq.page_keys)
        return found[:self.policy.usable_pages(seq.prompt_len, len(found))]

    def register(self, seq: Request, chunk_len: int) -> None:
        """Register the pages the prefill chunk of `chunk_len` tokens just run completed, where
        they may be cached."""
        if seq.page_keys is None:
            return
        upto = self.policy.registrable_pages(seq.prefilled, chunk_len)
        if upto <= seq.registered:
            return
        pages = self.pages.pages(seq.slot)
        for i in range(seq.registered, upto):
            self.pages.allocator.register(pages[i], seq.page_keys[i])
        seq.registered = upto
