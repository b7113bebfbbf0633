"""Bit-exact comparison of block-float host conversion with real ttnn (reference 0.1).

Runs only where real `ttnn` imports; the host conversion needs no device once
TT_METAL_MOCK_CLUSTER_DESC_PATH points at a cluster descriptor (wormhole_N150.yaml).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llm.ttnn_emu as emu

MOCK = Path(__file__).resolve().parents[3] / "shared/reference/mock-cluster/wormhole_N150.yaml"


@pytest.fixture(scope="module")
def real_ttnn():
    os.environ.setdefault("TT_METAL_MOCK_CLUSTER_DESC_PATH", str(MOCK))
    try:
        import ttnn
    except Exception as e:  # ImportError, or a native-library error from the wheel
        pytest.skip(f"real ttnn does not import here ({type(e).__name__}: {e}); the emulator's "
                    "block-float conversion cannot be compared bit for bit with it")
    return ttnn


def _cases():
    g = torch.Generator().manual_seed(1)
    out = [torch.randn(2, 64, 96, generator=g) * torch.logspace(-4, 4, 96)]
    outlier = torch.full((32, 32), 1e-3)
    outlier[7, 20] = 1000.0
    out += [outlier, torch.tensor([[1.999, 1 + 1 / 128, 1 + 3 / 128, 1000.0]]),
            torch.randn(5, 40, generator=g)]
    return out


@pytest.mark.parametrize("dtype_name", ["bfloat8_b", "bfloat4_b"])
def test_block_float_host_conversion_matches_real_ttnn(real_ttnn, dtype_name):
    for x in _cases():
        real = real_ttnn.to_torch(real_ttnn.from_torch(
            x, dtype=getattr(real_ttnn, dtype_name), layout=real_ttnn.TILE_LAYOUT))
        mine = emu.to_torch(emu.from_torch(x, dtype=getattr(emu, dtype_name),
                                           layout=emu.TILE_LAYOUT))
        assert real.dtype == mine.dtype and real.shape == mine.shape
        assert torch.equal(real.view(torch.int32), mine.view(torch.int32))


def test_import_llm_does_not_import_the_emulator():
    code = "import sys, llm; assert 'llm.ttnn_emu' not in sys.modules, 'emulator imported'"
    subprocess.run([sys.executable, "-c", code], check=True,
                   cwd=Path(__file__).resolve().parents[2])
