"""Real ttnn's log lines stay off stdout, and the real wheel fails on a machine without a
device the way open_mesh (and the fake of test_tt_device.py) expects.

The first two tests run everywhere. The others need the real wheel (ttnn 0.81.1 imports only
in Python 3.12) and skip elsewhere; run them from a Python 3.12 venv holding ttnn and pytest:

    python3.12 -m venv /tmp/ttnn312
    /tmp/ttnn312/bin/pip install ttnn==0.81.1 pytest
    /tmp/ttnn312/bin/python -m pytest --noconftest tests/tt_backend/test_tt_ttnn_logs.py

(`--noconftest`: this file imports no torch, the conftests do; ttnn 0.81.1 imports torch only
when it is installed.)

They start fresh interpreters, because tt-logger reads its environment when ttnn loads.
Measured with ttnn 0.81.1 on a machine without chips: `import ttnn` works; without a mock
descriptor `get_num_devices()` and `open_mesh_device` raise "No chips detected in the cluster";
with wormhole_N150.yaml it counts 1 device and `open_mesh_device` raises "sfpi not found" (the
device toolchain is not installed).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llm.backends.tt.ttnn_import import LOG_ENV, import_real_ttnn, log_destination

ROOT = Path(__file__).resolve().parents[2]
MOCK_ENV = "TT_METAL_MOCK_CLUSTER_DESC_PATH"
MOCK = ROOT.parent / "shared/reference/mock-cluster/wormhole_N150.yaml"
real = pytest.mark.skipif(importlib.util.find_spec("ttnn") is None,
                          reason="real ttnn does not import here (it needs Python 3.12)")


def test_log_destination_never_truncates_a_log_file(tmp_path):
    r, w = os.pipe()
    try:
        assert log_destination(r) == "/dev/stderr"
    finally:
        os.close(r)
        os.close(w)
    with open(tmp_path / "err.log", "w") as f:
        dest = log_destination(f.fileno())
    assert dest != "/dev/stderr" and dest.endswith(f"llm-ttnn-{os.getpid()}.log")


def test_import_sets_the_log_file_before_ttnn_loads(tmp_path, monkeypatch):
    pkg = tmp_path / "ttnn"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(f"import os\nSEEN = os.environ.get({LOG_ENV!r})\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(sys.modules, "ttnn", None)  # whatever was there comes back after
    del sys.modules["ttnn"]
    monkeypatch.delenv(LOG_ENV, raising=False)
    assert import_real_ttnn().SEEN == log_destination()
    del sys.modules["ttnn"]
    monkeypatch.setenv(LOG_ENV, "/x/mine.log")  # the user's choice is kept
    assert import_real_ttnn().SEEN == "/x/mine.log"


def _run(code: str, mock: bool) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in (LOG_ENV, MOCK_ENV)}
    if mock:
        env[MOCK_ENV] = str(MOCK)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)


PROBE = "try:\n    ttnn.get_num_devices()\nexcept RuntimeError:\n    pass\nprint('OK')\n"


@real
def test_real_ttnn_logs_to_stdout_unless_routed():
    bare = _run("import ttnn\n" + PROBE, mock=False)
    assert "Opening user mode device driver" in bare.stdout  # the problem is real
    routed = _run("from llm.backends.tt.ttnn_import import import_real_ttnn\n"
                  "ttnn = import_real_ttnn()\n" + PROBE, mock=False)
    assert routed.stdout == "OK\n", routed.stdout
    assert "Opening user mode device driver" in routed.stderr


@real
def test_real_ttnn_without_a_device():
    """What open_mesh must handle, as the real wheel does it: without chips the device count
    raises; under a mock cluster descriptor it counts 1 (so the count alone would not stop an
    open of a device whose every call is mocked)."""
    code = ("from llm.backends.tt.ttnn_import import import_real_ttnn, short_reason\n"
            "ttnn = import_real_ttnn()\n"
            "try:\n    print('count', ttnn.get_num_devices())\n"
            "except RuntimeError as e:\n    print('reason:', short_reason(e))\n")
    bare = _run(code, mock=False)
    assert bare.stdout.startswith("reason: RuntimeError: TT_FATAL") and bare.stdout.endswith(
        "No chips detected in the cluster\n"), bare.stdout
    assert _run(code, mock=True).stdout == "count 1\n"
