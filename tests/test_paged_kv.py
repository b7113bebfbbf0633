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
