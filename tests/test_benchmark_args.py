"""The benchmark demos refuse what they cannot measure with argparse's error naming the flag,
before loading anything (they crashed deep inside, or printed NaN rows and exited 0)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from demos import benchmark, benchmark_serving  # noqa: E402


@pytest.mark.parametrize("argv, says", [
    (["--batches", "0"], "--batches must be >= 1"),
    (["--batches", "x"], "--batches must be a comma list of integers"),
    (["--prompt-lens", "0"], "--prompt-lens must be >= 1"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--configs", "foo"], "--configs: unknown foo"),
    (["--engines", "llm,foo"], "--engines: unknown foo"),
    (["--gemv-max-batch", "-3"], "--gemv-max-batch must be >= 0"),
    (["--weights", "int8"], "--weights int8 quantizes a floating-point checkpoint"),
    (["--weights", "int4_mix", "--configs", "1b,default"], "the default model is a GGUF"),
])
def test_benchmark_refuses_by_flag(argv, says, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        benchmark.main(argv)
    assert e.value.code == 2 and says in capsys.readouterr().err


@pytest.mark.parametrize("argv, says", [
    (["--concurrency", "0"], "--concurrency values must be >= 1"),
    (["--rates", "-1"], "--rates values must be > 0"),
    (["--max-tokens", "0"], "--max-tokens must be >= 1"),
    (["--num-requests", "0"], "--num-requests must be >= 1"),
    (["--concurrency", "--rates"], "nothing to measure"),
    (["--url", "http://127.0.0.1:9/v1"], "cannot reach the server"),
])
def test_benchmark_serving_refuses_by_flag(argv, says, capsys, monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", ["benchmark_serving.py", *argv])
    with pytest.raises(SystemExit) as e:
        benchmark_serving.main()
    assert e.value.code == 2 and says in capsys.readouterr().err
