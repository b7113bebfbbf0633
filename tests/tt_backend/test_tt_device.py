"""Opening the tt backend's device: real ttnn only when it is usable, else the emulator with one
line saying why; "ttnn" forces real ttnn (a clear error), "emulator" forces the emulator;
LLM.close() closes the device once.

Real ttnn is replaced by a fake module in `sys.modules` that fails the way ttnn 0.81.1 fails on a
machine without chips (measured with the real wheel: `get_num_devices` raises "No chips detected
in the cluster"; under a mock cluster descriptor it counts 1 and `open_mesh_device` raises
"sfpi not found"). test_tt_ttnn_logs.py runs the real wheel where it imports.
"""

from __future__ import annotations

import importlib.util
import io
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

import llm
import llm.ttnn_emu as emu
from llm.backends.tt.device import MOCK_ENV, open_mesh
from llm.backends.tt.ttnn_import import REASON_CHARS, short_reason

SFPI = ("TT_THROW @ /project/tt_metal/jit_build/build.cpp:291: tt::exception\ninfo:\nsfpi not "
        "found at /x/ttnn/runtime/sfpi or /opt/tenstorrent/sfpi\nbacktrace:\n --- /x/_ttnncpp.so")
NO_CHIPS = ("TT_FATAL @ /project/tt_metal/llrt/tt_cluster.cpp:129: num_chips > 0\ninfo:\nNo chips "
            "detected in the cluster\nbacktrace:\n --- /x/_ttnncpp.so(+0xb233e8)")


class FakeTTNN(types.ModuleType):
    """The few names open_mesh uses; records what was called."""

    def __init__(self, count=1, open_error: str | None = None, count_error: str | None = None):
        super().__init__("ttnn")
        self.count, self.open_error, self.count_error = count, open_error, count_error
        self.calls: list[str] = []
        self.FabricConfig = types.SimpleNamespace(FABRIC_1D="1d")
        self.MeshShape = lambda rows, cols: (rows, cols)

    def get_num_devices(self) -> int:
        self.calls.append("get_num_devices")
        if self.count_error:
            raise RuntimeError(self.count_error)
        return self.count

    def set_fabric_config(self, config) -> None:
        self.calls.append(f"set_fabric_config({config})")

    def open_mesh_device(self, shape, *, l1_small_size, trace_region_size):
        self.calls.append(f"open_mesh_device{shape}")
        if self.open_error:
            raise RuntimeError(self.open_error)
        return ("device", shape)


@pytest.fixture
def fake(monkeypatch):
    def install(**kw) -> FakeTTNN:
        mod = FakeTTNN(**kw)
        monkeypatch.setitem(sys.modules, "ttnn", mod)
        return mod
    monkeypatch.delenv(MOCK_ENV, raising=False)
    return install


@pytest.mark.parametrize("kw,why", [
    (dict(open_error=SFPI), "RuntimeError: TT_THROW @ /project/tt_metal/jit_build/build.cpp:291: "
                            "tt::exception info: sfpi not found"),
    (dict(count_error=NO_CHIPS), "No chips detected in the cluster"),
    (dict(count=1), "ttnn found 1 device(s), 2 needed"),
])
def test_auto_falls_back_with_one_line(fake, kw, why):
    ttnn = fake(**kw)
    shape = (1, 2) if kw == dict(count=1) else (1, 1)
    log = io.StringIO()
    mesh, label = open_mesh(shape, "auto", log=log)
    assert mesh.ttnn is emu and mesh.device.shape == emu.MeshShape(*shape)
    lines = log.getvalue().splitlines()
    assert len(lines) == 1 and why in lines[0] and "backtrace" not in lines[0], lines
    assert lines[0].startswith("llm: tt backend falls back to the llm.ttnn_emu emulator: ")
    assert why in label
    with pytest.raises(RuntimeError, match="real ttnn requested but unusable: .*"
                                           + re.escape(why.split(": ")[-1])):
        open_mesh(shape, "ttnn", log=log)
    assert "get_num_devices" in ttnn.calls


def test_mock_cluster_is_not_a_device(fake, monkeypatch):
    ttnn = fake(count=1)  # opening would succeed: the mock descriptor alone must stop it
    monkeypatch.setenv(MOCK_ENV, "/x/wormhole_N150.yaml")
    log = io.StringIO()
    mesh, _ = open_mesh((1, 1), log=log)
    assert mesh.ttnn is emu and ttnn.calls == []
    assert f"{MOCK_ENV} is set (/x/wormhole_N150.yaml)" in log.getvalue()
    with pytest.raises(RuntimeError, match=f"real ttnn requested.*{MOCK_ENV}"):
        open_mesh((1, 1), "ttnn")


def test_ttnn_not_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "ttnn", None)  # import ttnn raises ModuleNotFoundError
    log = io.StringIO()
    mesh, label = open_mesh((1, 1), "auto", log=log)
    assert mesh.ttnn is emu and "ModuleNotFoundError" in log.getvalue() and "ModuleNot" in label
    with pytest.raises(RuntimeError, match="real ttnn requested but unusable: ModuleNotFoundError"):
        open_mesh((1, 1), "ttnn")


def test_usable_device_opens_real_ttnn(fake):
    ttnn = fake(count=8)
    log = io.StringIO()
    mesh, label = open_mesh((1, 8), "auto", log=log)
    assert mesh.ttnn is ttnn and mesh.device == ("device", (1, 8)) and log.getvalue() == ""
    assert ttnn.calls == ["get_num_devices", "set_fabric_config(1d)", "open_mesh_device(1, 8)"]
    assert label.startswith("ttnn ")


def test_emulator_forced_never_touches_ttnn(fake):
    ttnn = fake(count=8)
    log = io.StringIO()
    mesh, label = open_mesh((1, 1), "emulator", log=log)
    assert mesh.ttnn is emu and ttnn.calls == [] and log.getvalue() == ""
    assert label == "llm.ttnn_emu emulator (forced)"
    with pytest.raises(ValueError, match="auto, ttnn or emulator"):
        open_mesh((1, 1), "real")


def test_short_reason_is_one_bounded_line():
    assert short_reason(RuntimeError(NO_CHIPS)) == (
        "RuntimeError: TT_FATAL @ /project/tt_metal/llrt/tt_cluster.cpp:129: num_chips > 0 "
        "info: No chips detected in the cluster")
    long = short_reason(ValueError("x" * 1000))
    assert len(long) == REASON_CHARS and long.endswith("...")
    assert short_reason(KeyError()) == "KeyError"


def test_llm_close_closes_the_device_once(monkeypatch):
    closed = []
    real_close = emu.close_mesh_device
    monkeypatch.setattr(emu, "close_mesh_device", lambda d: (closed.append(d), real_close(d)))
    model = llm.LLM(backend="tt", max_batch=1, max_seq_len=64, progress=False,
                    backend_options={"implementation": "emulator", "trace": False})
    device = model.backend.mesh.device
    model.close()
    model.close()
    assert closed == [device] and not device._open
    with pytest.raises(RuntimeError, match="closed"):
        model.generate("Hi")


@pytest.mark.parametrize("cmd", [["demos/generate.py", "--max-new-tokens", "1", "--quiet"],
                                 ["-m", "llm.serve", "--port", "0"]])
def test_cli_flag_forces_real_ttnn(cmd):
    """`--tt-device ttnn` where ttnn is unusable: exit 2 with the reason, nothing served."""
    root = Path(__file__).resolve().parents[2]
    if importlib.util.find_spec("ttnn") is not None:
        pytest.skip("ttnn imports here: the forced open may succeed")
    r = subprocess.run([sys.executable, *cmd, "--backend", "tt", "--tt-device", "ttnn"],
                       capture_output=True, text=True, timeout=300, cwd=root)
    assert r.returncode == 2, r.stderr
    assert "error: tt backend: real ttnn requested but unusable: ModuleNotFoundError" in r.stderr
    assert r.stdout == ""
    r = subprocess.run([sys.executable, *cmd, "--backend", "torch", "--tt-device", "emulator"],
                       capture_output=True, text=True, timeout=300, cwd=root)
    assert r.returncode == 2 and "--tt-device" in r.stderr and "tt only" in r.stderr, r.stderr
