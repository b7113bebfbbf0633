"""Tensor model and host <-> device transfers (reference 0, 2)."""

import os

import pytest
import torch

import llm.ttnn_emu as ttnn


def test_tile_padding_and_logical_shape(device):
    x = torch.randn(1, 1, 5, 40)
    t = ttnn.from_torch(x, dtype=ttnn.bfloat16, layout=ttnn.TILE_LAYOUT, device=device)
    assert tuple(t.shape) == (1, 1, 5, 40)
    assert tuple(t.padded_shape) == (1, 1, 32, 64)
    back = ttnn.to_torch(t)
    assert back.dtype == torch.bfloat16 and back.shape == x.shape
    assert torch.equal(back, x.bfloat16())
    assert t.padded_shards()[0][0, 0, 5:, :].abs().sum() == 0


def test_shape_compares_with_lists():
    t = ttnn.from_torch(torch.zeros(1, 2, 3))
    assert t.shape == [1, 2, 3] and t.shape == (1, 2, 3) and t.shape != [1, 2]
    assert t.shape[-1] == 3 and t.shape.rank == 3 and repr(t.shape) == "Shape([1, 2, 3])"


def test_row_major_has_no_padding():
    t = ttnn.from_torch(torch.randn(3, 5))
    assert tuple(t.padded_shape) == (3, 5) and t.layout == ttnn.ROW_MAJOR_LAYOUT


def test_defaults_follow_torch_dtype():
    assert ttnn.from_torch(torch.randn(2, 2)).dtype == ttnn.float32
    assert ttnn.from_torch(torch.randn(2, 2).bfloat16()).dtype == ttnn.bfloat16
    assert ttnn.from_torch(torch.randn(2, 2), dtype=ttnn.bfloat8_b).layout == ttnn.TILE_LAYOUT
    assert ttnn.from_torch(None) is None


def test_bf16_rounding_is_rne():
    x = torch.randn(64) * 100
    assert torch.equal(ttnn.to_torch(ttnn.from_torch(x, dtype=ttnn.bfloat16)), x.bfloat16())


def test_block_float_outside_tile_raises():
    with pytest.raises(RuntimeError, match="Layout must be Layout::TILE"):
        ttnn.from_torch(torch.randn(4, 4), dtype=ttnn.bfloat8_b, layout=ttnn.ROW_MAJOR_LAYOUT)
    with pytest.raises(RuntimeError, match="Layout must be Layout::TILE"):
        ttnn.from_torch(torch.randn(4, 4), dtype=ttnn.bfloat4_b, layout=ttnn.ROW_MAJOR_LAYOUT)


def test_integer_dtypes():
    x = torch.tensor([[0, 5, 2**31 + 7]], dtype=torch.int64)
    t = ttnn.from_torch(x, dtype=ttnn.uint32)
    back = ttnn.to_torch(t)
    assert back.dtype == torch.uint32
    assert back.to(torch.int64).tolist() == [[0, 5, 2**31 + 7]]
    i = ttnn.to_torch(ttnn.from_torch(torch.tensor([-3, 4], dtype=torch.int32)))
    assert i.dtype == torch.int32 and i.tolist() == [-3, 4]


def test_pad_value():
    t = ttnn.from_torch(torch.zeros(1, 40), dtype=ttnn.bfloat16, layout=ttnn.TILE_LAYOUT,
                        pad_value=float("-inf"))
    raw = t.padded_shards()[0]
    assert torch.isinf(raw[0, 40:]).all() and torch.isinf(raw[1:, :]).all()


def test_host_records_memory_config_and_device_roundtrip(device):
    mem = ttnn.L1_MEMORY_CONFIG
    h = ttnn.from_torch(torch.randn(32, 32), dtype=ttnn.bfloat16, layout=ttnn.TILE_LAYOUT,
                        memory_config=mem)
    assert h.memory_config() == mem and h.device() is None
    assert h.storage_type() == ttnn.StorageType.HOST
    d = ttnn.to_device(h, device)
    assert d.memory_config() == ttnn.DRAM_MEMORY_CONFIG and d.device() is device
    d2 = h.to(device, ttnn.L1_MEMORY_CONFIG)
    assert d2.memory_config() == ttnn.L1_MEMORY_CONFIG
    back = ttnn.from_device(d2)
    assert back.device() is None and torch.equal(ttnn.to_torch(back), ttnn.to_torch(h))
    assert torch.equal(d2.cpu().to_torch(), ttnn.to_torch(h))


def test_sharded_from_torch_needs_shard_spec(device):
    with pytest.raises(RuntimeError, match="shard_spec"):
        ttnn.from_torch(torch.randn(32, 64), dtype=ttnn.bfloat16, layout=ttnn.TILE_LAYOUT,
                        device=device, memory_config=ttnn.L1_WIDTH_SHARDED_MEMORY_CONFIG)


def test_copy_host_to_device_tensor_in_place(device):
    d = ttnn.from_torch(torch.zeros(1, 32), dtype=ttnn.int32, device=device)
    h = ttnn.from_torch(torch.arange(32).reshape(1, 32), dtype=ttnn.int32)
    ident = id(d.padded_shards()[0])
    ttnn.copy_host_to_device_tensor(h, d)
    assert id(d.padded_shards()[0]) == ident
    assert ttnn.to_torch(d).tolist() == [list(range(32))]
    bad = ttnn.from_torch(torch.zeros(1, 32), dtype=ttnn.float32)
    with pytest.raises(RuntimeError, match="dtype differs"):
        ttnn.copy_host_to_device_tensor(bad, d)
    with pytest.raises(RuntimeError, match="shape differs"):
        ttnn.copy_host_to_device_tensor(ttnn.from_torch(torch.zeros(1, 31), dtype=ttnn.int32), d)


def test_deallocate_then_use_raises(device):
    d = ttnn.from_torch(torch.zeros(32, 32), dtype=ttnn.bfloat16, device=device)
    ttnn.deallocate(d)
    assert not d.is_allocated()
    with pytest.raises(RuntimeError, match="not allocated"):
        ttnn.to_torch(d)


def test_closed_device_rejects_ops(device):
    d = ttnn.from_torch(torch.zeros(32, 32), dtype=ttnn.bfloat16, layout=ttnn.TILE_LAYOUT,
                        device=device)
    ttnn.close_device(device)
    with pytest.raises(RuntimeError, match="closed"):
        ttnn.typecast(d, ttnn.float32)


def test_torch_rank(device):
    t = ttnn.from_torch(torch.randn(1, 1, 3, 4), device=device)
    assert ttnn.to_torch(t, torch_rank=2).shape == (3, 4)


def test_as_tensor_cache(tmp_path, device):
    x = torch.randn(1, 1, 64, 128)
    name = str(tmp_path / "sub" / "w1")
    a = ttnn.as_tensor(x, dtype=ttnn.bfloat8_b, layout=ttnn.TILE_LAYOUT, device=device,
                       memory_config=ttnn.DRAM_MEMORY_CONFIG, cache_file_name=name)
    path = name + "_dtype_BFLOAT8_B_layout_TILE.tensorbin"
    assert os.path.isfile(path)
    # hit: the torch input is ignored, stored values and memory config are used
    b = ttnn.as_tensor(torch.zeros(3), dtype=ttnn.bfloat8_b, layout=ttnn.TILE_LAYOUT,
                       device=device, memory_config=ttnn.L1_MEMORY_CONFIG, cache_file_name=name)
    assert tuple(b.shape) == (1, 1, 64, 128)
    assert b.memory_config() == ttnn.DRAM_MEMORY_CONFIG
    assert torch.equal(ttnn.to_torch(a), ttnn.to_torch(b))
    # a corrupt file is rebuilt
    with open(path, "wb") as f:
        f.write(b"junk")
    c = ttnn.as_tensor(x * 2, dtype=ttnn.bfloat8_b, layout=ttnn.TILE_LAYOUT, device=device,
                       memory_config=ttnn.DRAM_MEMORY_CONFIG, cache_file_name=name)
    assert torch.allclose(ttnn.to_torch(c), ttnn.to_torch(a) * 2)


def test_as_tensor_requires_memory_config_with_device(device):
    with pytest.raises(RuntimeError, match="memory_config"):
        ttnn.as_tensor(torch.zeros(2, 2), device=device)


def test_as_tensor_preprocess_and_no_cache():
    t = ttnn.as_tensor(torch.ones(2, 2), dtype=ttnn.float32, preprocess=lambda x: x * 3)
    assert ttnn.to_torch(t).tolist() == [[3.0, 3.0], [3.0, 3.0]]


def test_as_tensor_mesh_sharded_cache(tmp_path):
    mesh = ttnn.open_mesh_device(ttnn.MeshShape(1, 2))
    x = torch.randn(1, 1, 32, 64)
    name = str(tmp_path / "w")
    kw = dict(dtype=ttnn.bfloat16, layout=ttnn.TILE_LAYOUT, device=mesh,
              memory_config=ttnn.DRAM_MEMORY_CONFIG, cache_file_name=name,
              mesh_mapper=ttnn.ShardTensorToMesh(mesh, dim=3))
    a = ttnn.as_tensor(x, **kw)
    b = ttnn.as_tensor(torch.zeros(1), **kw)
    comp = ttnn.ConcatMeshToTensor(mesh, dim=3)
    assert tuple(b.shape) == (1, 1, 32, 32)
    assert torch.equal(ttnn.to_torch(b, mesh_composer=comp), x.bfloat16().float())
    assert torch.equal(ttnn.to_torch(a, mesh_composer=comp), ttnn.to_torch(b, mesh_composer=comp))


@pytest.mark.parametrize("shape", [(1, 1), (1, 2), (1, 8), (8, 4)])
def test_mesh_mappers_and_composers(shape):
    mesh = ttnn.open_mesh_device(ttnn.MeshShape(*shape))
    n = shape[0] * shape[1]
    assert mesh.get_num_devices() == n and tuple(mesh.shape) == shape
    x = torch.randn(1, 1, 32 * shape[0], 32 * n)
    t = ttnn.from_torch(x, dtype=ttnn.float32, layout=ttnn.TILE_LAYOUT, device=mesh,
                        mesh_mapper=ttnn.ShardTensorToMesh(mesh, dim=3))
    parts = ttnn.get_device_tensors(t)
    assert len(parts) == n
    for i, p in enumerate(parts):
        assert torch.equal(ttnn.to_torch(p), x[..., 32 * i: 32 * (i + 1)])
    back = ttnn.to_torch(t, mesh_composer=ttnn.ConcatMeshToTensor(mesh, dim=3))
    assert torch.equal(back, x)
    rep = ttnn.from_torch(x, dtype=ttnn.float32, device=mesh,
                          mesh_mapper=ttnn.ReplicateTensorToMesh(mesh))
    assert all(torch.equal(ttnn.to_torch(p), x) for p in ttnn.get_device_tensors(rep))
    y = torch.randn(1, 1, 8 * shape[0], 4 * shape[1])
    t2 = ttnn.from_torch(y, dtype=ttnn.float32, device=mesh,
                         mesh_mapper=ttnn.ShardTensor2dMesh(mesh, shape, dims=(2, 3)))
    p = ttnn.get_device_tensors(t2)
    r, c = shape[0] - 1, shape[1] - 1
    last = y[..., 8 * r: 8 * r + 8, 4 * c: 4 * c + 4]
    assert torch.equal(ttnn.to_torch(p[r * shape[1] + c]), last)
    back2 = ttnn.to_torch(t2, mesh_composer=ttnn.ConcatMesh2dToTensor(mesh, shape, dims=(2, 3)))
    assert torch.equal(back2, y)
    t3 = ttnn.from_torch(y, dtype=ttnn.float32, device=mesh,
                         mesh_mapper=ttnn.ShardTensor2dMesh(mesh, shape, dims=(None, 3)))
    p3 = ttnn.get_device_tensors(t3)
    assert torch.equal(ttnn.to_torch(p3[r * shape[1]]), y[..., 0:4])
    combined = ttnn.combine_device_tensors(tensors=p3)
    assert combined.num_shards() == n
    ttnn.close_mesh_device(mesh)


def test_mesh_to_torch_needs_composer(mesh2):
    t = ttnn.from_torch(torch.zeros(2, 2), device=mesh2)
    assert t.num_shards() == 2  # no mapper: replicated
    with pytest.raises(RuntimeError, match="mesh_composer"):
        ttnn.to_torch(t)


def test_shard_mapper_indivisible_raises(mesh2):
    with pytest.raises(RuntimeError, match="Cannot shard"):
        ttnn.from_torch(torch.zeros(1, 3), device=mesh2,
                        mesh_mapper=ttnn.ShardTensorToMesh(mesh2, dim=1))


def test_allocate_and_reallocate(device):
    t = ttnn.allocate_tensor_on_device(ttnn.Shape([1, 1, 32, 64]), ttnn.bfloat16,
                                       ttnn.TILE_LAYOUT, device)
    assert tuple(t.shape) == (1, 1, 32, 64) and t.device() is device
    r = ttnn.reallocate(t, ttnn.L1_MEMORY_CONFIG)
    assert not t.is_allocated() and r.memory_config() == ttnn.L1_MEMORY_CONFIG
