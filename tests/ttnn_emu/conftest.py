"""Fixtures for the ttnn emulator tests."""

import pytest
import torch

import llm.ttnn_emu as ttnn


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def device():
    dev = ttnn.open_device(device_id=0, trace_region_size=1 << 20)
    yield dev
    ttnn.close_device(dev)


@pytest.fixture
def mesh2():
    dev = ttnn.open_mesh_device(ttnn.MeshShape(1, 2))
    yield dev
    ttnn.close_mesh_device(dev)
