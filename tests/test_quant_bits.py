"""Sub-byte packings: each byte and bit sits where `llm.model.quant.bits` documents it (checked
element by element, independently of the vectorised code), and unpacking inverts packing.
"""

from __future__ import annotations

import pytest
import torch

from llm.model.quant.bits import pack1, pack2, pack4, unpack1, unpack2, unpack4

ROWS, COLS = 3, 96  # three 32-groups per row


def codes(bits: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 1 << bits, (ROWS, COLS), generator=g, dtype=torch.uint8)


def test_pack4_layout() -> None:
    c = codes(4, 0)
    p = pack4(c)
    assert p.shape == (ROWS, COLS // 2) and p.dtype == torch.uint8
    for r in range(ROWS):
        for g in range(COLS // 32):
            for i in range(16):
                byte = int(p[r, 16 * g + i])
                assert byte & 0xF == c[r, 32 * g + i]
                assert byte >> 4 == c[r, 32 * g + 16 + i]


def test_pack2_layout() -> None:
    c = codes(2, 1)
    p = pack2(c)
    assert p.shape == (ROWS, COLS // 4)
    for r in range(ROWS):
        for g in range(COLS // 32):
            for i in range(8):
                for s in range(4):
                    assert (int(p[r, 8 * g + i]) >> (2 * s)) & 3 == c[r, 32 * g + 8 * s + i]


def test_pack1_layout_follows_the_words_of_the_4_bit_codes() -> None:
    """Byte j of a group holds the bits of columns 4j..4j+3 (bits 0-3) and 16+4j..16+4j+3 (bits
    4-7): the columns of the group's 32-bit word j of 4-bit codes (pack4)."""
    c = codes(1, 2)
    p = pack1(c)
    assert p.shape == (ROWS, COLS // 8)
    for r in range(ROWS):
        for g in range(COLS // 32):
            for j in range(4):
                byte = int(p[r, 4 * g + j])
                for t in range(4):
                    assert (byte >> t) & 1 == c[r, 32 * g + 4 * j + t]
                    assert (byte >> (4 + t)) & 1 == c[r, 32 * g + 16 + 4 * j + t]


@pytest.mark.parametrize(("bits", "pack", "unpack"), [
    (4, pack4, unpack4), (2, pack2, unpack2), (1, pack1, unpack1),
])
def test_unpack_inverts_pack(bits, pack, unpack) -> None:
    c = codes(bits, 3)
    assert torch.equal(unpack(pack(c)), c)
    assert torch.equal(unpack(pack(c)[:, : pack(c).shape[1] // 3]), c[:, :32])  # a group slice


def test_columns_must_fill_whole_groups() -> None:
    with pytest.raises(ValueError, match="not a multiple of"):
        pack4(torch.zeros(2, 48, dtype=torch.uint8))
