"""The serving benchmarks run end to end on a random-weight model (the CPU smoke of what the GPU
runs use): `bench/serving_timeline.py --smoke` serves the model with its id tokenizer through the
real server, stamps every phase and prints the table; a change to the tokenizer interface that
the id tokenizer does not follow fails here, not on the GPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_serving_timeline_smoke_runs() -> None:
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "serving_timeline.py"), "--smoke", "--cache", "on",
         "--num-requests", "3", "--prefix-tokens", "64", "--suffix-tokens", "8"],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    table = run.stdout.split("prefix cache on:", 1)[-1]
    for phase in ("handler", "submit", "admit", "prefill", "deliver", "client"):
        assert f"  {phase} " in table, run.stdout
