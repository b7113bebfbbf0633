"""Block allocator and page tables: all-or-nothing allocation, no double frees, padded rows."""

from __future__ import annotations

import pytest

from llm.engine.paged_kv import BlockAllocator, OutOfPagesError, PageTable, PageTableSpec


def test_allocator_is_all_or_nothing() -> None:
    a = BlockAllocator(5)  # pages 1..4 usable, page 0 is padding
    assert a.capacity == 4
    got = a.allocate(3)
    assert sorted(got) == [1, 2, 3] and a.num_free == 1
    with pytest.raises(OutOfPagesError, match="need 2, 1 free of 4"):
        a.allocate(2)
    assert a.num_free == 1  # the failed request took nothing
    a.free(got)
    assert a.num_free == 4


def test_double_free_and_foreign_pages_are_refused() -> None:
    a = BlockAllocator(4)
    pages = a.allocate(2)
    a.free(pages[:1])
    with pytest.raises(ValueError, match="not allocated"):
        a.free(pages)  # pages[0] again: nothing changes
    assert a.num_free == 2
    with pytest.raises(ValueError, match="twice"):
        a.free([pages[1], pages[1]])
    with pytest.raises(ValueError, match="not allocated"):
        a.free([0])  # the padding page is never handed out


def test_page_table_rows_reserve_and_release() -> None:
    pt = PageTable(PageTableSpec(num_blocks=9, block_size=4, max_blocks_per_seq=3), max_batch=2)
    assert pt.reserve(0, 5) == pt.pages(0) and len(pt.pages(0)) == 2
    assert pt.reserve(0, 8) == pt.pages(0)  # still 2 pages: nothing new
    pt.reserve(1, 12)
    assert pt.row(0)[2] == BlockAllocator.PAD_BLOCK and len(pt.row(0)) == 3
    assert not set(pt.pages(0)) & set(pt.pages(1))
    with pytest.raises(OutOfPagesError, match="per-sequence limit of 12"):
        pt.reserve(0, 13)
    assert not pt.can_reserve(4 * 4)  # 3 pages left of 8
    pt.release(0)
    pt.release(1)
    assert pt.allocator.num_free == 8 and pt.table() == [[0, 0, 0], [0, 0, 0]]
    with pytest.raises(IndexError):
        pt.reserve(2, 1)


def test_shared_pages_are_freed_by_their_last_holder() -> None:
    a = BlockAllocator(5)
    pages = a.allocate(2)
    a.share(pages)
    assert [a.refs(p) for p in pages] == [2, 2]
    a.free(pages)
    assert a.num_free == 2  # still held once
    a.free(pages)
    assert a.num_free == 4 and a.refs(pages[0]) == 0
    with pytest.raises(ValueError, match="neither held nor cached"):
        a.share(pages)  # a free page that holds no cached prefix cannot be shared


def test_cached_pages_stay_reusable_until_evicted_least_recently_freed_first() -> None:
    a = BlockAllocator(5)  # 4 usable pages
    p1, p2, p3 = a.allocate(3)
    assert a.register(p1, b"k1") and a.register(p2, b"k2")
    assert not a.register(p3, b"k1")  # another page holds that key: nothing changes
    assert not a.register(p1, b"other")  # already registered
    with pytest.raises(ValueError, match="not held"):
        a.register(4, b"k4")
    a.free([p2])
    a.free([p1, p3])  # p2 was freed before p1: evicted first
    assert (a.num_free, a.num_unused, a.num_evictable, a.num_cached) == (4, 2, 2, 2)
    assert a.lookup([b"k1", b"k2", b"k3"]) == [p1, p2] and a.lookup([b"k2"]) == [p2]
    a.share([p1])  # a hit: p1 is held again, no longer evictable
    assert a.num_free == 3 and a.refs(p1) == 1
    taken = a.allocate(3)  # the 2 unregistered free pages, then the evictable p2
    assert p2 in taken and p1 not in taken
    assert a.lookup([b"k1", b"k2"]) == [p1] and a.num_cached == 1
    with pytest.raises(OutOfPagesError):
        a.allocate(1)  # p1 is held: never evicted
    a.free(taken)
    a.free([p1])
    assert a.num_unused + a.num_evictable == a.capacity == a.num_free
    a.clear_cache()
    assert a.num_cached == 0 and a.num_unused == a.capacity and a.lookup([b"k1"]) == []


def test_page_table_reserve_with_shared_pages_counts_only_new_pages() -> None:
    pt = PageTable(PageTableSpec(num_blocks=6, block_size=4, max_blocks_per_seq=4), max_batch=3)
    a = pt.allocator  # 5 usable pages
    first = pt.reserve(0, 12)
    a.register(first[0], b"a")
    a.register(first[1], b"b")
    pt.release(0)  # last page first: first[1] is evicted before first[0]
    shared = a.lookup([b"a", b"b"])
    assert shared == first[:2] and a.num_free == 5
    assert pt.can_reserve(16, shared)  # 2 new pages; 3 free besides the 2 shared
    assert not pt.can_reserve(4 * 6)
    assert pt.reserve(1, 16, shared)[:2] == shared and a.num_free == 1
    assert pt.can_reserve(12, shared) and not pt.can_reserve(12)  # held pages cost nothing more
    pt.reserve(2, 12, shared)
    assert [a.refs(p) for p in shared] == [2, 2] and a.num_free == 0
    with pytest.raises(ValueError, match="already holds pages"):
        pt.reserve(2, 12, shared)
    pt.release(1)
    pt.release(2)
    assert a.num_free == a.capacity and a.num_cached == 2 and a.lookup([b"a"]) == shared[:1]
