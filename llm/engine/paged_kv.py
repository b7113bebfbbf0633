"""Paged KV-cache bookkeeping: a block allocator and per-slot page tables (pure Python,
device-neutral).

The KV cache of every layer is a pool of `num_blocks` pages of `block_size` tokens. A user (batch
slot) owns an ordered list of pages; token position p lives in page `pages[p // block_size]` at
offset `p % block_size`. The page table handed to a backend is `[max_batch, max_blocks_per_seq]` of
page ids, padded with `pad_block` (page 0 is never handed out, so padding never aliases a live
page).
"""

from __future__ import annotations

import math
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

    Allocation is all-or-nothing: a request for more pages than are free raises `OutOfPagesError`
    and changes nothing. Freeing a page twice, or a page that was never handed out, raises
    `ValueError`.
    """

    PAD_BLOCK = 0

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 2:
            raise ValueError(
                f"num_blocks must be >= 2 (page 0 is the padding page), got {num_blocks}")
        self.num_blocks = num_blocks
        # Hand out low ids first: pop() from the end of a descending list.
        self._free = list(range(num_blocks - 1, 0, -1))
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def capacity(self) -> int:
        """Pages that can ever be handed out (the pool minus the padding page)."""
        return self.num_blocks - 1

    def allocate(self, n: int) -> list[int]:
        """Take `n` free pages, or raise `OutOfPagesError` without taking any."""
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of pages ({n})")
        if n > len(self._free):
            raise OutOfPagesError(
                f"KV cache out of pages: need {n}, {len(self._free)} free of {self.capacity}"
            )
        pages = [self._free.pop() for _ in range(n)]
        self._used.update(pages)
        return pages

    def free(self, pages: list[int]) -> None:
        """Return pages to the pool; every page must currently be allocated (checked before any
        change).
        """
        if len(set(pages)) != len(pages):
            raise ValueError(f"page list frees a page twice: {pages}")
        bad = [p for p in pages if p not in self._used]
        if bad:
            raise ValueError(f"pages {bad} are not allocated (double free?)")
        for p in pages:
            self._used.remove(p)
            self._free.append(p)


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

    def can_reserve(self, num_tokens: int) -> bool:
        """Whether `num_tokens` positions fit in the free pages right now."""
        return self.blocks_needed(num_tokens) <= self.allocator.num_free

    def reserve(self, slot: int, num_tokens: int) -> list[int]:
        """Make sure `slot` owns pages for positions [0, num_tokens); allocate what is missing."""
        self._check_slot(slot)
        if num_tokens > self.spec.max_seq_len:
            raise OutOfPagesError(
                f"sequence of {num_tokens} tokens exceeds the per-sequence limit of "
                f"{self.spec.max_seq_len} "
                f"({self.spec.max_blocks_per_seq} pages x {self.spec.block_size})"
            )
        missing = self.blocks_needed(num_tokens) - len(self._pages[slot])
        if missing > 0:
            self._pages[slot].extend(self.allocator.allocate(missing))
        return list(self._pages[slot])

    def release(self, slot: int) -> None:
        """Free every page of `slot`."""
        self._check_slot(slot)
        self.allocator.free(self._pages[slot])
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
