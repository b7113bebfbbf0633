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
    # ties with tails below the shifted-out bits, -0.0, subnormals, inf / nan next to huge values
    out += [torch.tensor([[2.5, 1.2031251192, 1.25 + 2**-23, 1 + 3 / 64 + 2**-20, -1e-5, -0.0]]),
            torch.tensor([[3e-39, -1e-39, 1.2e-38, 1.5 * 2**-126]]),
            torch.tensor([[1.0, float("inf"), 2.0**127, 2.0**124, float("nan"), -float("inf")]]),
            (torch.randn(4, 32, 64, generator=g) * 7).bfloat16()]
    for scale in (1e-38, 1e-4, 1.0, 1e4, 1e37):
        out.append(torch.randn(2, 32, 64, generator=g) * scale)
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


@pytest.mark.parametrize("dtype_name", ["uint32", "int32", "uint16"])
def test_integer_host_conversion_matches_real_ttnn(real_ttnn, dtype_name):
    # TILE pads to whole tiles, so every value takes ttnn's SIMD path (ROW_MAJOR's last
    # numel % 8 values take a scalar path with other out-of-range results; not modelled)
    ints = torch.tensor([[3, -1, -2, 2**31, -2**31 - 1, 2**32 + 5, -2**40 - 7, 65536, 70000]])
    floats = [1.5, -2.5, -0.5, 3e9, 5e9, 1e10, -1e10, 2.0**31, 65535.7, 70000.0, -1.0,
              float("inf"), float("-inf"), float("nan")]
    cases = [ints, ints.to(torch.int32), torch.tensor([floats]),
             torch.tensor([floats]).bfloat16(), torch.tensor([floats], dtype=torch.float64)]
    for x in cases:
        real = real_ttnn.to_torch(real_ttnn.from_torch(
            x, dtype=getattr(real_ttnn, dtype_name), layout=real_ttnn.TILE_LAYOUT))
        mine = emu.to_torch(emu.from_torch(x, dtype=getattr(emu, dtype_name),
                                           layout=emu.TILE_LAYOUT))
        assert real.dtype == mine.dtype and torch.equal(real, mine), (x.dtype, real, mine)


def test_import_llm_does_not_import_the_emulator():
    code = "import sys, llm; assert 'llm.ttnn_emu' not in sys.modules, 'emulator imported'"
    subprocess.run([sys.executable, "-c", code], check=True,
                   cwd=Path(__file__).resolve().parents[2])
