"""rms_norm, distributed rms_norm and collectives on virtual meshes (reference 4.4, 6)."""

import pytest
import torch
from emu_helpers import bf16, crs, on, width_sharded_l1

import llm.ttnn_emu as ttnn


def ref_rms(x, gamma, eps, residual=None, bias=None):
    """RMSNorm from the reference golden, in fp32 (gamma bf16 -> y rounded to bf16 first)."""
    if residual is not None:
        x = x + residual
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    if gamma is not None:
        y = bf16(y) * gamma
    if bias is not None:
        y = y + bias
    return y


def gamma_rm(device, g, mapper=None):
    """gamma stored [1,1,W/32,32] ROW_MAJOR bf16, as tt_transformers does."""
    return on(device, g.reshape(1, 1, -1, 32), layout=ttnn.ROW_MAJOR_LAYOUT, mapper=mapper)


def test_rms_norm_interleaved(device):
    x, r, g = torch.randn(1, 1, 40, 128), torch.randn(1, 1, 40, 128), torch.randn(128)
    out = ttnn.rms_norm(on(device, x), epsilon=1e-5, weight=gamma_rm(device, g),
                        residual_input_tensor=on(device, r))
    ref = bf16(ref_rms(bf16(x), bf16(g), 1e-5, residual=bf16(r)))
    torch.testing.assert_close(ttnn.to_torch(out).float(), ref, rtol=0.01, atol=0.02)
    assert out.dtype == ttnn.bfloat16 and tuple(out.shape) == (1, 1, 40, 128)
    tile_g = on(device, g.reshape(1, 1, 1, 128))
    out2 = ttnn.rms_norm(on(device, x, ttnn.float32), epsilon=1e-5, weight=tile_g,
                         bias=on(device, torch.ones(1, 1, 1, 128)))
    torch.testing.assert_close(ttnn.to_torch(out2), ref_rms(x, bf16(g), 1e-5) + 1,
                               rtol=1e-2, atol=1e-2)


def test_rms_norm_default_epsilon(device):
    x = torch.zeros(1, 1, 32, 64)
    x[..., 0] = 1e-7
    out = ttnn.rms_norm(on(device, x, ttnn.float32))
    torch.testing.assert_close(ttnn.to_torch(out), ref_rms(x, None, 1e-12))


def test_rms_norm_sharded(device):
    x, g = torch.randn(1, 1, 32, 256), torch.randn(256)
    mem = width_sharded_l1(32, 256, 8)
    pc = ttnn.LayerNormShardedMultiCoreProgramConfig(
        compute_with_storage_grid_size=(8, 1), subblock_w=1, block_h=1, block_w=1, inplace=False)
    out = ttnn.rms_norm(on(device, x, mem=mem), epsilon=1e-6, weight=gamma_rm(device, g),
                        program_config=pc, memory_config=mem)
    assert out.memory_config() == mem
    torch.testing.assert_close(ttnn.to_torch(out).float(),
                               bf16(ref_rms(bf16(x), bf16(g), 1e-6)), rtol=0.01, atol=0.02)
    bad = ttnn.LayerNormShardedMultiCoreProgramConfig(
        compute_with_storage_grid_size=(8, 1), subblock_w=1, block_h=1, block_w=2, inplace=False)
    with pytest.raises(RuntimeError, match="block_h/block_w"):
        ttnn.rms_norm(on(device, x, mem=mem), weight=gamma_rm(device, g), program_config=bad)
    with pytest.raises(RuntimeError, match="sharded the same way"):
        ttnn.rms_norm(on(device, x, mem=mem), memory_config=ttnn.DRAM_MEMORY_CONFIG)
    with pytest.raises(RuntimeError, match="needs a sharded input"):
        ttnn.rms_norm(on(device, x), program_config=pc)


def test_rms_norm_validation(device):
    x = torch.randn(1, 2, 32, 64)
    hs = ttnn.MemoryConfig(ttnn.TensorMemoryLayout.HEIGHT_SHARDED, ttnn.BufferType.L1,
                           ttnn.ShardSpec(crs(0, 0, 1, 0), (32, 64),
                                          ttnn.ShardOrientation.ROW_MAJOR))
    with pytest.raises(RuntimeError, match="height-sharded"):
        ttnn.rms_norm(on(device, x, mem=hs))
    with pytest.raises(RuntimeError, match="last dim 32"):
        ttnn.rms_norm(on(device, x),
                      weight=on(device, torch.ones(1, 1, 1, 64), layout=ttnn.ROW_MAJOR_LAYOUT))
    with pytest.raises(RuntimeError, match="TILE"):
        ttnn.rms_norm(on(device, x, layout=ttnn.ROW_MAJOR_LAYOUT))
    with pytest.raises(RuntimeError, match="dtype"):
        ttnn.rms_norm(on(device, x, ttnn.bfloat4_b))


def test_distributed_rms_norm(mesh2):
    x, g = torch.randn(1, 1, 32, 256), torch.randn(256)
    shard3 = ttnn.ShardTensorToMesh(mesh2, dim=3)
    tx = on(mesh2, x, mapper=shard3)
    stats = ttnn.rms_norm_pre_all_gather(tx)
    assert tuple(stats.shape) == (1, 1, 32, 32) and stats.dtype == ttnn.bfloat16
    local = ttnn.to_torch(ttnn.get_device_tensors(stats)[1]).float()
    torch.testing.assert_close(local[..., 0], bf16(bf16(x)[..., 128:].pow(2).sum(-1)))
    assert (local[..., 1:] == 0).all()
    gathered = ttnn.all_gather(stats, dim=3)
    assert tuple(gathered.shape) == (1, 1, 32, 64)
    tg = gamma_rm(mesh2, g, mapper=ttnn.ShardTensor2dMesh(mesh2, (1, 2), dims=(None, 2)))
    out = ttnn.rms_norm_post_all_gather(tx, gathered, epsilon=1e-5, weight=tg)
    got = ttnn.to_torch(out, mesh_composer=ttnn.ConcatMeshToTensor(mesh2, dim=3)).float()
    ex2 = (bf16(bf16(x)[..., :128].pow(2).sum(-1)) + bf16(bf16(x)[..., 128:].pow(2).sum(-1)))
    ref = bf16(x) * torch.rsqrt(ex2[..., None] / 256 + 1e-5) * bf16(g)
    torch.testing.assert_close(got, bf16(ref), rtol=0.01, atol=0.02)


@pytest.mark.parametrize("shape,axis", [((1, 8), None), ((8, 4), 0), ((8, 4), 1), ((1, 2), 1)])
def test_all_gather(shape, axis):
    mesh = ttnn.open_mesh_device(ttnn.MeshShape(*shape))
    n = shape[0] * shape[1]
    parts = [torch.full((1, 1, 32, 32), float(i)) for i in range(n)]
    t = on(mesh, torch.cat(parts, dim=3), ttnn.float32, mapper=ttnn.ShardTensorToMesh(mesh, 3))
    out = ttnn.get_device_tensors(ttnn.all_gather(t, dim=2, cluster_axis=axis))
    rows, cols = shape
    for d in range(n):
        r, c = divmod(d, cols)
        if axis is None:
            group = list(range(n))
        elif axis == 0:
            group = [rr * cols + c for rr in range(rows)]
        else:
            group = [r * cols + cc for cc in range(cols)]
        assert torch.equal(ttnn.to_torch(out[d]), torch.cat([parts[i] for i in group], dim=2))
    ttnn.close_mesh_device(mesh)


def test_reduce_scatter_and_all_reduce():
    mesh = ttnn.open_mesh_device(ttnn.MeshShape(2, 4))
    xs = [torch.randn(1, 1, 32, 128) for _ in range(8)]
    t = on(mesh, torch.cat(xs, dim=1), ttnn.float32, mapper=ttnn.ShardTensorToMesh(mesh, 1))
    rs = ttnn.get_device_tensors(ttnn.reduce_scatter(t, dim=3, cluster_axis=1))
    for d in range(8):
        r, c = divmod(d, 4)
        total = sum(xs[r * 4 + cc] for cc in range(4))
        torch.testing.assert_close(ttnn.to_torch(rs[d]), total[..., 32 * c: 32 * c + 32])
    ar = ttnn.get_device_tensors(ttnn.all_reduce(t, cluster_axis=0))
    for d in range(8):
        r, c = divmod(d, 4)
        torch.testing.assert_close(ttnn.to_torch(ar[d]), xs[c] + xs[4 + c])
    with pytest.raises(RuntimeError, match="divisible by 256"):
        ttnn.reduce_scatter(t, dim=3)
    with pytest.raises(TypeError):
        ttnn.reduce_scatter(t, dim=3, math_op="sum")
    part = ttnn.get_device_tensors(ttnn.mesh_partition(t, 3, cluster_axis=1))
    assert torch.equal(ttnn.to_torch(part[5]), xs[5][..., 32:64])
    ttnn.close_mesh_device(mesh)


def test_reduce_scatter_bf16_rounds(mesh2):
    x = torch.randn(1, 1, 32, 128)
    t = on(mesh2, x, mapper=ttnn.ReplicateTensorToMesh(mesh2))
    out = ttnn.reduce_scatter(t, dim=3)
    got = ttnn.to_torch(out, mesh_composer=ttnn.ConcatMeshToTensor(mesh2, dim=3)).float()
    assert torch.equal(got, bf16(2 * bf16(x)))
