"""The lane arithmetic of bench/q4_0_mma.cu (an exploration: Q4_0 for 1..16 rows of x by mma.sync),
emulated in numpy with the PTX ISA's m16n8k16 fragment layout, equals dequantize-then-matmul:
the code columns each lane feeds to A match the x columns it feeds to B (the kernel itself runs
only on a GPU: `python bench/q4_mma_explore.py`)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench import q4_mma_explore  # noqa: E402


def test_emulated_lanes_give_the_dequantized_matmul(capsys) -> None:
    assert q4_mma_explore.run_emulation() == 0
    out = capsys.readouterr().out
    assert all(f"q4_0_mma_{k}" in out for k in ("m1", "m8", "m16"))
