"""Paged KV-cache bookkeeping: a block allocator and per-slot page tables (pure Python,
device-neutral).

The KV cache of every layer is a pool of `num_blocks` pages of `block_size` tokens. A user (batch
slot) owns an ordered list of pages; token position p lives in page `pages[p // block_size]` at
offset `p % block_size`. The page table handed to a backend is `[max_batch, max_blocks_per_seq]` of
page ids, padded with `pad_block` (page 0 is never handed out, so padding never aliases a live
page). Pages are reference-counted so that users can share the pages of a common prompt prefix
(the prefix cache, llm.engine.prefix_cache).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass


class OutOfPagesError(RuntimeError):
    """The pool has fewer free pages than a request needs."""


@dataclass(frozen=True)
class PageTableSpec:
    """Geometry of the paged cache: pages in the pool, tokens per page, pages per sequence."""

    num_blocks: int
    block_size: int
    max_blocks_per_seq: int

    @property
    def max_seq_len(self) -> int:
        return self.max_blocks_per_seq * self.block_size


class BlockAllocator:
    """Hands out page ids from a fixed pool; page 0 is reserved as the padding page.

    Pages are reference-counted: `allocate` hands out pages held once, `share` adds a holder,
    `free` drops one. A page may also be registered under a key (`register`: the prefix cache,
    see llm.engine.prefix_cache); when its last holder frees it, a registered page is kept,
    still reusable through `lookup` + `share`, until an allocation needs it: such pages are
    evicted least recently freed first. `num_free` counts both the never-registered free pages and
    those evictable cached ones.

    Allocation is all-or-nothing: a request for more pages than are free raises `OutOfPagesError`
    and changes nothing. Freeing a page no one holds, or one page twice in one call, raises
    `ValueError` (checked before any change).
    """

    PAD_BLOCK = 0

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 2:
            raise ValueError(
                f"num_blocks must be >= 2 (page 0 is the padding page), got {num_blocks}")
        self.num_blocks = num_blocks
        # Hand out low ids first: pop() from the end of a descending list.
        self._free = list(range(num_blocks - 1, 0, -1))
        self._refs: dict[int, int] = {}  # held page -> holders
        self._key_of: dict[int, bytes] = {}  # registered page -> its key
        self._page_of: dict[bytes, int] = {}  # key -> registered page
        self._evictable: OrderedDict[int, None] = OrderedDict()  # registered, unheld; LRU first

    @property
    def num_free(self) -> int:
        """Pages an allocation can take: never-registered free ones plus evictable cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def num_unused(self) -> int:
        """Free pages that hold no cached prefix."""
        return len(self._free)

    @property
    def num_cached(self) -> int:
        """Registered pages (held or evictable)."""
        return len(self._key_of)

    @property
    def num_evictable(self) -> int:
        """Registered pages no one holds (reusable until an allocation takes them)."""
        return len(self._evictable)

    @property
    def capacity(self) -> int:
        """Pages that can ever be handed out (the pool minus the padding page)."""
        return self.num_blocks - 1

    def refs(self, page: int) -> int:
        """Holders of `page` (0: free or evictable)."""
        return self._refs.get(page, 0)

    def num_unheld(self, pages: Sequence[int]) -> int:
        """How many of `pages` have no holder (free or evictable), each occurrence counted."""
        return len(pages) - sum(map(self._refs.__contains__, pages))

    def allocate(self, n: int) -> list[int]:
        """Take `n` free pages (unregistered ones first, then the least recently freed cached
        ones, whose keys are dropped), or raise `OutOfPagesError` without taking any."""
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of pages ({n})")
        if n > self.num_free:
            raise OutOfPagesError(
                f"KV cache out of pages: need {n}, {self.num_free} free of {self.capacity}"
            )
        pages = []
        for _ in range(n):
            if self._free:
                page = self._free.pop()
            else:
                page, _ = self._evictable.popitem(last=False)
                del self._page_of[self._key_of.pop(page)]
            self._refs[page] = 1
            pages.append(page)
        return pages

    def share(self, pages: list[int]) -> None:
        """Add one holder to each page; each must be held or registered (checked first)."""
        bad = [p for p in pages if p not in self._refs and p not in self._key_of]
        if bad:
            raise ValueError(f"pages {bad} are neither held nor cached: nothing to share")
        for p in pages:
            self._evictable.pop(p, None)
            self._refs[p] = self._refs.get(p, 0) + 1

    def free(self, pages: list[int]) -> None:
        """Drop one holder of each page (each must be held; checked before any change). A page
        left without holders returns to the pool, a registered one as the most recently freed
        evictable page."""
        if len(set(pages)) != len(pages):
            raise ValueError(f"page list frees a page twice: {pages}")
        bad = [p for p in pages if p not in self._refs]
        if bad:
            raise ValueError(f"pages {bad} are not allocated (double free?)")
        for p in pages:
            self._refs[p] -= 1
            if self._refs[p]:
                continue
            del self._refs[p]
            if p in self._key_of:
                self._evictable[p] = None
            else:
                self._free.append(p)

    def register(self, page: int, key: bytes) -> bool:
        """Cache held `page` under `key`; False (nothing changes) if the page is registered
        already or another page holds that key."""
        if page not in self._refs:
            raise ValueError(f"page {page} is not held: only a held page can be registered")
        if page in self._key_of or key in self._page_of:
            return False
        self._key_of[page] = key
        self._page_of[key] = page
        return True

    def lookup(self, keys: list[bytes]) -> list[int]:
        """The cached pages of the longest prefix of `keys` that is cached (no holder added)."""
        pages = []
        for key in keys:
            page = self._page_of.get(key)
            if page is None:
                break
            pages.append(page)
        return pages

    def clear_cache(self) -> None:
        """Forget every evictable cached page (they become plain free pages); held registered
        pages stay registered."""
        for page in self._evictable:
            del self._page_of[self._key_of.pop(page)]
            self._free.append(page)
        self._evictable.clear()


class PageTable:
    """Per-slot page lists over one `BlockAllocator`, rendered as a padded `[max_batch, max_blocks]`
    table.
    """

    def __init__(self, spec: PageTableSpec, max_batch: int) -> None:
        self.spec = spec
        self.max_batch = max_batch
        self.allocator = BlockAllocator(spec.num_blocks)
        self._pages: list[list[int]] = [[] for _ in range(max_batch)]

    def blocks_needed(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.spec.block_size)

    def can_reserve(self, num_tokens: int, shared: Sequence[int] = (), extra: int = 0) -> bool:
        """Whether `num_tokens` positions (and `extra` more pages) fit right now, the first pages
        being the cached pages `shared` (they cost no new page, but an evictable one is no longer
        free once shared)."""
        alloc = self.allocator
        missing = self.blocks_needed(num_tokens) - len(shared) + extra
        return missing <= alloc.num_free - alloc.num_unheld(shared)

    def reserve(self, slot: int, num_tokens: int, shared: Sequence[int] = ()) -> list[int]:
        """Make sure `slot` owns pages for positions [0, num_tokens); allocate what is missing.
        shared: cached pages (`BlockAllocator.lookup`) the empty slot starts with, held once more
        (positions [0, len(shared) * block_size) are then already computed)."""
        self._check_slot(slot)
        if num_tokens > self.spec.max_seq_len:
            raise OutOfPagesError(
                f"sequence of {num_tokens} tokens exceeds the per-sequence limit of "
                f"{self.spec.max_seq_len} "
                f"({self.spec.max_blocks_per_seq} pages x {self.spec.block_size})"
            )
        if shared:
            if self._pages[slot]:
                raise ValueError(f"slot {slot} already holds pages: shared pages start a slot")
            if not self.can_reserve(num_tokens, shared):
                raise OutOfPagesError(
                    f"KV cache out of pages: {self.blocks_needed(num_tokens) - len(shared)} new "
                    f"pages needed besides {len(shared)} cached, "
                    f"{self.allocator.num_free} free of {self.allocator.capacity}")
            self.allocator.share(list(shared))
            self._pages[slot] = list(shared)
        missing = self.blocks_needed(num_tokens) - len(self._pages[slot])
        if missing > 0:
            self._pages[slot].extend(self.allocator.allocate(missing))
        return list(self._pages[slot])

    def release(self, slot: int) -> None:
        """Drop the slot's hold on each of its pages, last page first (so that of a cached
        prefix, the deepest pages are evicted first)."""
        self._check_slot(slot)
        self.allocator.free(self._pages[slot][::-1])
        self._pages[slot] = []

    def pages(self, slot: int) -> list[int]:
        self._check_slot(slot)
        return list(self._pages[slot])

    def row(self, slot: int) -> list[int]:
        """The padded page-table row of one slot (length max_blocks_per_seq)."""
        pages = self.pages(slot)
        return pages + [BlockAllocator.PAD_BLOCK] * (self.spec.max_blocks_per_seq - len(pages))

    def table(self, slots: list[int] | None = None) -> list[list[int]]:
        """Padded rows for `slots` (default: every slot)."""
        return [self.row(s) for s in (range(self.max_batch) if slots is None else slots)]

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.max_batch:
            raise IndexError(f"slot {slot} out of range [0, {self.max_batch})")
