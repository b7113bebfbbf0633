"""Run a test module's function in a child Python without TRITON_INTERPRET (the CPU test run
interprets kernels, and interpreted kernels do not compile): for PTX checks on Hopper targets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def call_uninterpreted(module: str, function: str) -> object:
    """module.function() (a module of this folder, a JSON-able result) in a child process; skips
    where this Triton cannot compile for a CUDA target."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (f"import json, sys; sys.path.insert(0, sys.argv[1]); import {module}; "
            f"print(json.dumps({module}.{function}()))")
    r = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent)], env=env,
                       capture_output=True, text=True, timeout=600)
    if r.returncode and "GPUTarget" in r.stderr and "ImportError" in r.stderr:
        pytest.skip("this Triton cannot compile for a CUDA target here")
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])
