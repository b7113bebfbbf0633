"""`demos/generate.py --backend tt` end to end on the default model (emulator), with --stats."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent


def test_demo_tt_backend_with_stats() -> None:
    r = subprocess.run([sys.executable, str(ROOT / "demos" / "generate.py"), "--backend", "tt",
                        "--prompt", "The capital of France is", "--max-new-tokens", "4",
                        "--max-seq-len", "64", "--stats", "--quiet"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("The capital of France is Paris")
    assert "tt backend on llm.ttnn_emu emulator" in r.stderr
    assert "MB DRAM/chip" in r.stdout
    assert "PROJECTED (not measured) N150 step time" in r.stdout
    assert "host->device input writes: 12 over 3 decode steps" in r.stdout
