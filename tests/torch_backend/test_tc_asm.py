"""The tensor-core kernel's inline PTX (kernels/qgemm_tc.py: `_nibble_asm`, `_q5_asm`) run by a
small interpreter of the instructions it uses, so that CI, which has no GPU, checks what the asm
computes: every byte of a packed word on its own, whatever the other bytes hold (a carry or a
shift must not leak into the next byte), exactly the codes less the format's offset.

What this cannot see is how the compiler packs tensor elements into the asm's registers: the
GPU tests do (test_qgemm_splitk.py).
"""

from __future__ import annotations

import random
import re

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")
from llm.backends.torch.kernels.qgemm_tc import _nibble_asm, _q5_asm  # noqa: E402

MASK = 0xFFFFFFFF


def _bf16(bits: int) -> float:
    return float(torch.tensor([bits << 16], dtype=torch.int64).to(torch.int32)
                 .view(torch.float32)[0])


def _to_bf16(value: float) -> int:
    t = torch.tensor([value], dtype=torch.float32).to(torch.bfloat16)
    return int(t.view(torch.int16)[0]) & 0xFFFF


def _prmt(a: int, b: int, sel: int) -> int:
    """prmt.b32 default mode: the bytes of {b, a} picked by each selector nibble."""
    src = [(a >> 8 * i) & 0xFF for i in range(4)] + [(b >> 8 * i) & 0xFF for i in range(4)]
    out = 0
    for i in range(4):
        s = (sel >> 4 * i) & 0xF
        byte = src[s & 7]
        if s & 8:  # sign replicate
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << 8 * i
    return out


def _fma_bf16x2(a: int, b: int, c: int) -> int:
    out = 0
    for half in range(2):
        x, y, z = ((v >> 16 * half) & 0xFFFF for v in (a, b, c))
        out |= _to_bf16(_bf16(x) * _bf16(y) + _bf16(z)) << 16 * half
    return out


def run_ptx(asm: str, inputs: list[int], n_out: int) -> list[int]:
    """Interpret `asm` (one `{ ... }` block) with $n_out.. = inputs; returns $0..$n_out-1."""
    regs: dict[str, int] = {f"${n_out + i}": v & MASK for i, v in enumerate(inputs)}

    def val(tok: str) -> int:
        tok = tok.strip()
        if tok.startswith("0x"):
            return int(tok, 16) & MASK
        return int(tok) if tok.isdigit() else regs[tok]

    for stmt in asm.strip().strip("{}").split(";"):
        stmt = stmt.strip()
        if not stmt or stmt.startswith(".reg"):
            continue
        op, rest = stmt.split(None, 1)
        args = [a.strip() for a in rest.split(",")]
        d, src = args[0], [val(a) for a in args[1:]]
        if op == "mov.b32":
            r = src[0]
        elif op == "and.b32":
            r = src[0] & src[1]
        elif op == "or.b32":
            r = src[0] | src[1]
        elif op == "shr.u32":
            r = src[0] >> src[1]
        elif op == "shl.b32":
            r = (src[0] << src[1]) & MASK
        elif op == "add.u32":
            r = (src[0] + src[1]) & MASK
        elif op == "prmt.b32":
            r = _prmt(*src)
        elif op == "fma.rn.bf16x2":
            r = _fma_bf16x2(*src)
        else:
            raise AssertionError(f"instruction {op!r} not interpreted")
        regs[d] = r
    return [regs[f"${i}"] for i in range(n_out)]


def _halves(words: list[int]) -> list[float]:
    """Two bfloat16 per 32-bit output, low half first: the asm's 4 elements in order."""
    return [_bf16((w >> 16 * h) & 0xFFFF) for w in words for h in range(2)]


def _pack(values: list[int]) -> int:
    return sum(v << 8 * i for i, v in enumerate(values))


@pytest.mark.parametrize("off", [8, 0])
@pytest.mark.parametrize("high", [False, True])
def test_nibbles_of_every_byte(high: bool, off: int) -> None:
    asm = _nibble_asm(high, off)
    assert set(re.findall(r"\$\d", asm)) == {"$0", "$1", "$2"}
    rng = random.Random(1)
    for _ in range(300):
        b = [rng.randrange(256) for _ in range(4)]
        got = _halves(run_ptx(asm, [_pack(b)], 2))
        assert got == [((x >> 4) if high else (x & 15)) - off for x in b], (b, got)


@pytest.mark.parametrize("off", [16, 0])
@pytest.mark.parametrize("high", [False, True])
def test_q5_codes_of_every_byte(high: bool, off: int) -> None:
    """Byte e: the 4-bit codes b_e, its group's qh byte h_e and its column's bit c_e (1 << (column
    % 4)) -> the 5-bit code (nibble | 16 where h_e has the bit: bit c_e for the low nibbles,
    c_e << 4 for the high) less off; any qh byte, so other columns' bits are set or not."""
    asm = _q5_asm(high, off)
    rng = random.Random(2)
    for _ in range(500):
        b = [rng.randrange(256) for _ in range(4)]
        h = [rng.randrange(256) for _ in range(4)]
        c = [1 << rng.randrange(4) for _ in range(4)]
        got = _halves(run_ptx(asm, [_pack(b), _pack(h), _pack(c)], 2))
        want = []
        for be, he, ce in zip(b, h, c, strict=True):
            nib = (be >> 4) if high else (be & 15)
            bit = (ce << 4) if high else ce
            want.append((nib | (16 if he & bit else 0)) - off)
        assert got == want, (b, h, c, got, want)


def test_the_interpreter_knows_prmt_and_fma() -> None:
    """The interpreter's own two non-trivial instructions against hand-worked values."""
    assert _prmt(0x44332211, 0x88776655, 0x4140) == 0x55225511
    assert _prmt(0x000000F0, 0, 0x0008) == 0xF0F0F0FF  # byte 0 sign-replicated, then byte 0
    one, neg = 0x3F803F80, 0xC308C308  # 1.0, -(128 + 8) in both halves
    assert _halves([_fma_bf16x2(0x43054300, one, neg)]) == [-8.0, -3.0]
