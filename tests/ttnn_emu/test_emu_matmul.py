"""matmul / linear and the program-config validations (reference 4.2)."""

import pytest
import torch
from emu_helpers import bf16, dram_sharded_weight_config, on, width_sharded_l1

import llm.ttnn_emu as ttnn


def test_matmul_bf16_by_bf8(device):
    a, w = torch.randn(1, 1, 64, 96), torch.randn(1, 1, 96, 128)
    ta, tw = on(device, a), on(device, w, ttnn.bfloat8_b)
    out = ttnn.matmul(ta, tw)
    wq = ttnn.to_torch(tw)  # the stored bf8 weight values
    ref = bf16(bf16(a) @ wq)
    assert out.dtype == ttnn.bfloat16 and out.memory_config() == ttnn.DRAM_MEMORY_CONFIG
    torch.testing.assert_close(ttnn.to_torch(out).float(), ref, rtol=0, atol=0)


def test_linear_bias_activation_dtype(device):
    a, w, b = torch.randn(1, 1, 32, 64), torch.randn(1, 1, 64, 32), torch.randn(1, 1, 1, 32)
    out = ttnn.linear(on(device, a), on(device, w), bias=on(device, b), activation="silu",
                      dtype=ttnn.float32)
    ref = torch.nn.functional.silu(bf16(a) @ bf16(w) + bf16(b))
    assert out.dtype == ttnn.float32
    torch.testing.assert_close(ttnn.to_torch(out), ref, rtol=1e-5, atol=1e-5)


def test_unpadded_shapes_and_batch_broadcast(device):
    a, w = torch.randn(2, 3, 5, 40), torch.randn(1, 1, 40, 7)
    out = ttnn.matmul(on(device, a), on(device, w), dtype=ttnn.float32)
    assert tuple(out.shape) == (2, 3, 5, 7)
    torch.testing.assert_close(ttnn.to_torch(out), bf16(a) @ bf16(w), rtol=1e-5, atol=1e-5)
    wb = torch.randn(2, 3, 40, 7)
    out2 = ttnn.matmul(on(device, a), on(device, wb), dtype=ttnn.float32)
    torch.testing.assert_close(ttnn.to_torch(out2), bf16(a) @ bf16(wb), rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="batched b"):
        ttnn.matmul(on(device, a), on(device, torch.randn(3, 2, 40, 7)))


def test_transpose_b(device):
    a, w = torch.randn(1, 1, 32, 64), torch.randn(1, 1, 32, 64)
    out = ttnn.matmul(on(device, a), on(device, w), transpose_b=True, dtype=ttnn.float32)
    torch.testing.assert_close(ttnn.to_torch(out), bf16(a) @ bf16(w).transpose(-1, -2),
                               rtol=1e-5, atol=1e-5)


def test_basic_validation(device):
    a = on(device, torch.randn(1, 1, 32, 64))
    with pytest.raises(RuntimeError, match="K mismatch"):
        ttnn.matmul(a, on(device, torch.randn(1, 1, 32, 32)))
    with pytest.raises(RuntimeError, match="TILE"):
        ttnn.matmul(a, on(device, torch.randn(1, 1, 64, 32), layout=ttnn.ROW_MAJOR_LAYOUT))
    with pytest.raises(RuntimeError, match="on device"):
        ttnn.matmul(a, ttnn.from_torch(torch.randn(1, 1, 64, 32), layout=ttnn.TILE_LAYOUT))
    with pytest.raises(RuntimeError, match="dtype"):
        ttnn.matmul(a, on(device, torch.ones(1, 1, 64, 32), ttnn.uint32))


def _dram_sharded_case(device, m=32, k=256, n=384, ncores=8):
    a = torch.randn(1, 1, m, k)
    w = torch.randn(1, 1, k, n)
    ta = on(device, a, mem=width_sharded_l1(32 * -(-m // 32), k, ncores))
    tw = on(device, w, ttnn.bfloat8_b, mem=dram_sharded_weight_config(k, n))
    pc = ttnn.MatmulMultiCoreReuseMultiCastDRAMShardedProgramConfig(
        in0_block_w=1, per_core_M=1, per_core_N=-(-n // (32 * ncores)))
    return a, w, ta, tw, pc


def test_dram_sharded_matmul(device):
    a, w, ta, tw, pc = _dram_sharded_case(device)
    out = ttnn.linear(ta, tw, program_config=pc, memory_config=ttnn.L1_WIDTH_SHARDED_MEMORY_CONFIG)
    mem = out.memory_config()
    assert mem.memory_layout == ttnn.TensorMemoryLayout.WIDTH_SHARDED
    assert mem.buffer_type == ttnn.BufferType.L1 and mem.shard_spec.shape == (32, 64)
    assert mem.shard_spec.num_cores() == 8
    ref = bf16(bf16(a) @ ttnn.to_torch(tw))
    torch.testing.assert_close(ttnn.to_torch(out).float(), ref, rtol=0, atol=0)


def test_dram_sharded_constraints(device):
    a, w, ta, tw, pc = _dram_sharded_case(device)
    l1ws = ttnn.L1_WIDTH_SHARDED_MEMORY_CONFIG
    with pytest.raises(RuntimeError, match="output must be sharded like a"):
        ttnn.linear(ta, tw, program_config=pc)
    with pytest.raises(RuntimeError, match="input a L1 WIDTH_SHARDED"):
        ttnn.linear(on(device, a), tw, program_config=pc, memory_config=l1ws)
    with pytest.raises(RuntimeError, match="b WIDTH_SHARDED in DRAM"):
        ttnn.linear(ta, on(device, w), program_config=pc, memory_config=l1ws)
    with pytest.raises(RuntimeError, match="b INTERLEAVED"):
        ttnn.linear(ta, tw, memory_config=l1ws)
    bad_k = ttnn.MatmulMultiCoreReuseMultiCastDRAMShardedProgramConfig(
        in0_block_w=3, per_core_M=1, per_core_N=2)
    with pytest.raises(RuntimeError, match="divisible by in0_block_w"):
        ttnn.linear(ta, tw, program_config=bad_k, memory_config=l1ws)
    bad_n = ttnn.MatmulMultiCoreReuseMultiCastDRAMShardedProgramConfig(
        in0_block_w=1, per_core_M=1, per_core_N=1)
    with pytest.raises(RuntimeError, match="does not cover N"):
        ttnn.linear(ta, tw, program_config=bad_n, memory_config=l1ws)
    _, _, ta2, tw2, pc2 = _dram_sharded_case(device, m=64)
    pc2 = ttnn.MatmulMultiCoreReuseMultiCastDRAMShardedProgramConfig(
        in0_block_w=1, per_core_M=2, per_core_N=2)
    with pytest.raises(RuntimeError, match="M == per_core_M == 1 tile"):
        ttnn.linear(ta2, tw2, program_config=pc2, memory_config=l1ws)


def _mc2d(**kw):
    base = dict(compute_with_storage_grid_size=(2, 2), in0_block_w=1, out_subblock_h=1,
                out_subblock_w=1, per_core_M=1, per_core_N=2, transpose_mcast=False,
                fused_activation=None, fuse_batch=True)
    base.update(kw)
    return ttnn.MatmulMultiCoreReuseMultiCastProgramConfig(**base)


def test_2d_mcast_config(device):
    a, w = torch.randn(1, 1, 64, 64), torch.randn(1, 1, 64, 128)
    ta, tw = on(device, a), on(device, w)
    out = ttnn.matmul(ta, tw, program_config=_mc2d(
        fused_activation=ttnn.UnaryWithParam(ttnn.UnaryOpType.RELU)), activation="silu",
        dtype=ttnn.float32)
    # program_config.fused_activation wins over activation
    torch.testing.assert_close(ttnn.to_torch(out), torch.relu(bf16(a) @ bf16(w)),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="do not cover"):
        ttnn.matmul(ta, tw, program_config=_mc2d(per_core_N=1))
    with pytest.raises(RuntimeError, match="DST capacity"):
        ttnn.matmul(ta, tw, program_config=_mc2d(per_core_M=3, per_core_N=3, out_subblock_h=3,
                                                 out_subblock_w=3))
    fp32acc = ttnn.WormholeComputeKernelConfig(math_fidelity=ttnn.MathFidelity.HiFi4,
                                               fp32_dest_acc_en=True)
    with pytest.raises(RuntimeError, match="<= 4"):
        ttnn.matmul(ta, tw, program_config=_mc2d(per_core_M=1, per_core_N=6, out_subblock_w=6),
                    compute_kernel_config=fp32acc)
    with pytest.raises(RuntimeError, match="divisible by out_subblock_w"):
        ttnn.matmul(ta, tw, program_config=_mc2d(out_subblock_w=3, per_core_N=2))
    with pytest.raises(RuntimeError, match="divisible by in0_block_w"):
        ttnn.matmul(ta, tw, program_config=_mc2d(in0_block_w=3))
    with pytest.raises(RuntimeError, match="exceeds the device grid"):
        ttnn.matmul(ta, tw, program_config=_mc2d(compute_with_storage_grid_size=(9, 1)))


def test_1d_config(device):
    a, w = torch.randn(1, 1, 32, 128), torch.randn(1, 1, 128, 256)
    ta = on(device, a, mem=width_sharded_l1(32, 128, 4))
    pc = ttnn.MatmulMultiCoreReuseMultiCast1DProgramConfig(
        compute_with_storage_grid_size=(4, 1), in0_block_w=1, out_subblock_h=1,
        out_subblock_w=2, per_core_M=1, per_core_N=2, fuse_batch=True, mcast_in0=True)
    out = ttnn.matmul(ta, on(device, w), program_config=pc,
                      memory_config=ttnn.L1_WIDTH_SHARDED_MEMORY_CONFIG)
    assert out.memory_config().shard_spec.shape == (32, 64)
    torch.testing.assert_close(ttnn.to_torch(out).float(), bf16(bf16(a) @ bf16(w)), rtol=0,
                               atol=0)
    hs = ttnn.create_sharded_memory_config((1, 1, 32, 128), ttnn.CoreGrid(x=1, y=1),
                                           ttnn.ShardStrategy.HEIGHT)
    with pytest.raises(RuntimeError, match="WIDTH_SHARDED ROW_MAJOR"):
        ttnn.matmul(on(device, a, mem=hs), on(device, w), program_config=pc)


def test_matmul_accounting(device):
    ta, tw = on(device, torch.randn(1, 1, 32, 64)), on(device, torch.randn(1, 1, 64, 96),
                                                       ttnn.bfloat8_b)
    device.op_log.reset()
    ttnn.matmul(ta, tw)
    rec = device.op_log.recent[-1]
    assert rec.flops == 2 * 32 * 64 * 96
    assert rec.dram_bytes == 2 * 2048 + 6 * 1088 + 3 * 2048


def test_2d_mcast_without_fuse_batch_covers_one_batch(device):
    # fuse_batch=False loops over a's batch: per_core_M must cover one batch's rows only
    # (prefill reshapes long sequences to [1, S/chunk, chunk, K] and sizes the config for chunk)
    a, w = torch.randn(1, 4, 64, 64), torch.randn(1, 1, 64, 128)
    ta, tw = on(device, a), on(device, w)
    out = ttnn.matmul(ta, tw, program_config=_mc2d(fuse_batch=False))
    torch.testing.assert_close(ttnn.to_torch(out).float(), bf16(bf16(a) @ bf16(w)),
                               rtol=1e-2, atol=1e-2)
    with pytest.raises(RuntimeError, match="do not cover"):
        ttnn.matmul(ta, tw, program_config=_mc2d(fuse_batch=True))
