"""Arguments ttnn 0.81.1 requires are required here too, positional-only ones are positional-only,
and keywords it does not take are refused (tests/tt_backend/test_tt_ttnn_conformance.py checks
every signature against the recorded real ones; these are the call sites that changed)."""

import pytest
import torch
from emu_helpers import crs, on, width_sharded_l1

import llm.ttnn_emu as ttnn


def test_constructors_need_what_ttnn_needs():
    with pytest.raises(TypeError):
        ttnn.CoreCoord(x=1, y=2)
    with pytest.raises(TypeError):
        ttnn.CoreGrid(8, 8)
    with pytest.raises(TypeError):
        ttnn.ShardSpec(crs(0, 0, 1, 0), (32, 64))
    with pytest.raises(TypeError, match="q_chunk_size"):
        ttnn.SDPAProgramConfig(compute_with_storage_grid_size=(8, 8), k_chunk_size=32)
    with pytest.raises(TypeError, match="transpose_mcast"):
        ttnn.MatmulMultiCoreReuseMultiCastProgramConfig(
            compute_with_storage_grid_size=(8, 8), in0_block_w=1, out_subblock_h=1,
            out_subblock_w=1, per_core_M=1, per_core_N=1)
    with pytest.raises(TypeError):
        ttnn.WormholeComputeKernelConfig(ttnn.MathFidelity.HiFi4)
    with pytest.raises(TypeError):
        ttnn.UnaryWithParam(op_type=ttnn.UnaryOpType.RELU)
    assert ttnn.CoreCoord(1, 2).x == 1 and ttnn.CoreGrid(x=8, y=4).num_cores == 32


def test_ops_refuse_keywords_ttnn_does_not_take(device):
    x = on(device, torch.randn(1, 1, 32, 64), layout=ttnn.ROW_MAJOR_LAYOUT)
    with pytest.raises(NotImplementedError, match="tile"):
        ttnn.tilize(x, tile=object())
    with pytest.raises(TypeError):
        ttnn.tilize(x, math_fidelity=1)
    t = ttnn.tilize(x)
    with pytest.raises(TypeError):
        ttnn.untilize(t, dtype=ttnn.bfloat16)
    s = on(device, torch.randn(1, 1, 32, 64), mem=width_sharded_l1(32, 64, 2))
    with pytest.raises(TypeError):
        ttnn.sharded_to_interleaved(s, ttnn.DRAM_MEMORY_CONFIG, is_l1_aligned=True)
    with pytest.raises(TypeError):
        ttnn.set_fabric_config(ttnn.FabricConfig.FABRIC_1D, topology=None)
