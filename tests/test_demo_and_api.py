"""The demo CLI end to end, and `import llm` staying free of backends."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO = [sys.executable, str(ROOT / "demos" / "generate.py")]


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(DEMO + args, capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_demo_generates_and_reports_speed() -> None:
    r = _run(["--prompt", "The capital of France is", "--max-new-tokens", "8", "--quiet"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("The capital of France is Paris")
    assert "TTFT" in r.stdout and "tok/s/user" in r.stdout and "tok/s total" in r.stdout
    assert "torch backend on cpu (float32" in r.stderr


def test_demo_batch_of_prompts() -> None:
    r = _run(["--prompt", "Once upon a time", "--prompt", "The capital of France is",
              "--max-new-tokens", "4", "--quiet"])
    assert r.returncode == 0, r.stderr
    assert "--- [0] Once upon a time" in r.stdout and "--- [1] The capital of France is" in r.stdout


def test_demo_bad_arguments_are_clear_errors() -> None:
    r = _run(["--temperature", "-1", "--quiet"])
    assert r.returncode == 2 and "error: temperature must be in [0.0, inf]" in r.stderr
    r = _run(["--model", "/nonexistent/model.gguf", "--quiet"])
    assert r.returncode == 2 and "/nonexistent/model.gguf: no such file or directory" in r.stderr
    r = _run(["--help"])
    assert r.returncode == 0 and "--max-new-tokens" in r.stdout and "--chat" in r.stdout


def test_import_llm_imports_no_backend() -> None:
    code = ("import sys, llm; "
            "bad = [m for m in ('torch', 'llm.backends', 'llm.ttnn_emu', 'ttnn', 'triton', "
            "'transformers') if m in sys.modules]; print(bad); "
            "llm.SamplingParams; print('llm.backends.torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:2] == ["[]", "False"]
