"""Which ttnn the tt backend runs on: real ttnn on a usable device, else `llm.ttnn_emu`.

`open_mesh(shape, implementation)` with implementation
- "auto": real ttnn when it imports, no mock cluster is configured, it counts enough devices and
  `open_mesh_device` succeeds; otherwise the emulator, with one line on stderr saying why;
- "ttnn": real ttnn or a RuntimeError carrying the same reason;
- "emulator": the emulator, without trying real ttnn.

Real ttnn is imported through `ttnn_import.import_real_ttnn`, which keeps its log off stdout.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any, TextIO

from llm.backends.tt.mesh import Mesh
from llm.backends.tt.ttnn_import import import_real_ttnn, short_reason

IMPLEMENTATIONS = ("auto", "ttnn", "emulator")
TRACE_REGION_SIZE = 64 << 20
L1_SMALL_SIZE = 32768
MOCK_ENV = "TT_METAL_MOCK_CLUSTER_DESC_PATH"


class NoUsableDevice(RuntimeError):
    """Real ttnn imported but cannot serve the requested mesh (mock cluster, too few chips)."""


def open_mesh(shape: tuple[int, int], implementation: str = "auto", *,
              log: TextIO | None = None) -> tuple[Mesh, str]:
    """Open the (rows, cols) mesh on real ttnn or the emulator (see the module docstring);
    returns the mesh and a label saying which, and why the emulator where it is one."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be auto, ttnn or emulator, got {implementation!r}")
    reason = "forced"
    if implementation != "emulator":
        try:
            return _open_real(shape)
        except Exception as e:  # no wheel, mock cluster, no chips, no device toolchain, ...
            reason = short_reason(e)
            if implementation == "ttnn":
                raise RuntimeError(f"tt backend: real ttnn requested but unusable: {reason}") from e
            print(f"llm: tt backend falls back to the llm.ttnn_emu emulator: {reason}",
                  file=log if log is not None else sys.stderr, flush=True)
    emu = importlib.import_module("llm.ttnn_emu")
    rows, cols = shape
    device = emu.open_mesh_device(emu.MeshShape(rows, cols), l1_small_size=L1_SMALL_SIZE,
                                  trace_region_size=TRACE_REGION_SIZE)
    return Mesh(emu, device, rows, cols), f"llm.ttnn_emu emulator ({reason})"


def _open_real(shape: tuple[int, int]) -> tuple[Mesh, str]:
    rows, cols = shape
    ttnn = import_real_ttnn()
    mock = os.environ.get(MOCK_ENV)
    if mock:
        raise NoUsableDevice(f"{MOCK_ENV} is set ({mock}): real ttnn would mock every device "
                             "call")
    count = _device_count(ttnn)
    if count < rows * cols:
        raise NoUsableDevice(f"ttnn found {count} device(s), {rows * cols} needed")
    if rows * cols > 1:
        ttnn.set_fabric_config(ttnn.FabricConfig.FABRIC_1D)
    device = ttnn.open_mesh_device(ttnn.MeshShape(rows, cols), l1_small_size=L1_SMALL_SIZE,
                                   trace_region_size=TRACE_REGION_SIZE)
    return Mesh(ttnn, device, rows, cols), f"ttnn {_version()}"


def _device_count(ttnn: Any) -> int:
    """Tenstorrent devices real ttnn sees (`ttnn.get_num_devices`, present in 0.81.1; it raises
    "No chips detected in the cluster" on a machine without chips)."""
    return int(ttnn.get_num_devices())


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("ttnn")
    except PackageNotFoundError:
        return "(version unknown)"
