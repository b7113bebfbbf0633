"""Memory configs, shard specs, validation and the per-core L1 budget (reference 0.2)."""

import pytest
import torch

import llm.ttnn_emu as ttnn


def crs(x0, y0, x1, y1):
    return ttnn.CoreRangeSet({ttnn.CoreRange(ttnn.CoreCoord(x0, y0), ttnn.CoreCoord(x1, y1))})


def test_core_types():
    r = ttnn.CoreRange(ttnn.CoreCoord(0, 0), ttnn.CoreCoord(3, 1))
    assert r.num_cores() == 8
    s = ttnn.CoreRangeSet({r, ttnn.CoreRange(ttnn.CoreCoord(0, 2), ttnn.CoreCoord(1, 2))})
    assert s.num_cores() == 10
    assert s.bounding_box() == ttnn.CoreRange(ttnn.CoreCoord(0, 0), ttnn.CoreCoord(3, 2))
    assert ttnn.CoreGrid(x=8, y=4).num_cores == 32
    with pytest.raises(RuntimeError, match="overlap"):
        ttnn.CoreRangeSet({r, ttnn.CoreRange(ttnn.CoreCoord(1, 1), ttnn.CoreCoord(1, 1))})


def test_num_cores_to_corerangeset():
    s = ttnn.num_cores_to_corerangeset(10, ttnn.CoreCoord(8, 8), row_wise=True)
    assert s.num_cores() == 10
    assert s.cores()[:9][-1] == ttnn.CoreCoord(0, 1)
    c = ttnn.num_cores_to_corerangeset(10, ttnn.CoreCoord(8, 8), row_wise=False)
    assert c.num_cores() == 10 and ttnn.CoreCoord(1, 1) in c.cores()


def test_constants():
    assert ttnn.DRAM_MEMORY_CONFIG.buffer_type == ttnn.BufferType.DRAM
    assert not ttnn.DRAM_MEMORY_CONFIG.is_sharded()
    assert ttnn.L1_WIDTH_SHARDED_MEMORY_CONFIG.shard_spec is None
    assert ttnn.L1_HEIGHT_SHARDED_MEMORY_CONFIG.memory_layout == (
        ttnn.TensorMemoryLayout.HEIGHT_SHARDED)


@pytest.mark.parametrize(
    "strategy,grid,shard",
    [
        (ttnn.ShardStrategy.HEIGHT, ttnn.CoreGrid(x=4, y=2), (32, 128)),
        (ttnn.ShardStrategy.WIDTH, ttnn.CoreGrid(x=4, y=1), (256, 32)),
        (ttnn.ShardStrategy.BLOCK, ttnn.CoreGrid(x=2, y=4), (64, 64)),
    ],
)
def test_create_sharded_memory_config(strategy, grid, shard):
    m = ttnn.create_sharded_memory_config((1, 2, 128, 128), grid, strategy)
    assert m.buffer_type == ttnn.BufferType.L1
    assert m.shard_spec.shape == shard
    assert m.shard_spec.orientation == ttnn.ShardOrientation.ROW_MAJOR
    assert m.shard_spec.num_cores() == grid.num_cores


def test_create_sharded_memory_config_errors():
    with pytest.raises(RuntimeError, match="Invalid sharding core_grid"):
        ttnn.create_sharded_memory_config((1, 1, 32, 100), ttnn.CoreGrid(x=3, y=1),
                                          ttnn.ShardStrategy.WIDTH)
    with pytest.raises(RuntimeError, match="Invalid sharding core_grid"):
        ttnn.create_sharded_memory_config((1, 1, 96, 64), ttnn.CoreGrid(x=5, y=1),
                                          ttnn.ShardStrategy.HEIGHT)
    with pytest.raises(RuntimeError, match="use_height_and_width_as_shard_shape"):
        ttnn.create_sharded_memory_config((32, 32), crs(0, 0, 1, 0), ttnn.ShardStrategy.WIDTH)
    m = ttnn.create_sharded_memory_config((32, 64), crs(0, 0, 1, 0), ttnn.ShardStrategy.WIDTH,
                                          use_height_and_width_as_shard_shape=True)
    assert m.shard_spec.shape == (32, 64)


def _width_sharded(width, ncores, shard_w=None, rows=32):
    spec = ttnn.ShardSpec(crs(0, 0, ncores - 1, 0), (rows, shard_w or width // ncores),
                          ttnn.ShardOrientation.ROW_MAJOR)
    return ttnn.MemoryConfig(ttnn.TensorMemoryLayout.WIDTH_SHARDED, ttnn.BufferType.L1, spec)


def test_valid_sharded_placement(device):
    x = torch.randn(1, 1, 32, 256)
    t = ttnn.from_torch(x, dtype=ttnn.bfloat16, layout=ttnn.TILE_LAYOUT, device=device,
                        memory_config=_width_sharded(256, 8))
    assert t.is_sharded() and device.l1_used(ttnn.CoreCoord(0, 0)) == 32 * 32 * 2
    assert torch.equal(ttnn.to_torch(t), x.bfloat16())


@pytest.mark.parametrize(
    "mem,match",
    [
        (_width_sharded(256, 8, shard_w=16), "multiple of the 32x32 tile"),
        (_width_sharded(256, 4, shard_w=32), "more than the 4 cores"),
        (_width_sharded(256, 8, rows=64), "shard height 64 must equal"),
    ],
)
def test_invalid_width_shards(device, mem, match):
    with pytest.raises(RuntimeError, match=match):
        ttnn.from_torch(torch.randn(1, 1, 32, 256), dtype=ttnn.bfloat16, layout=ttnn.TILE_LAYOUT,
                        device=device, memory_config=mem)


def test_invalid_height_and_block_shards(device):
    spec = ttnn.ShardSpec(crs(0, 0, 1, 0), (32, 64), ttnn.ShardOrientation.ROW_MAJOR)
    mem = ttnn.MemoryConfig(ttnn.TensorMemoryLayout.HEIGHT_SHARDED, ttnn.BufferType.L1, spec)
    with pytest.raises(RuntimeError, match="more than the 2 cores"):
        ttnn.from_torch(torch.randn(1, 3, 32, 64), dtype=ttnn.bfloat16,
                        layout=ttnn.TILE_LAYOUT, device=device, memory_config=mem)
    with pytest.raises(RuntimeError, match="shard width 64 must equal"):
        ttnn.from_torch(torch.randn(1, 2, 32, 128), dtype=ttnn.bfloat16,
                        layout=ttnn.TILE_LAYOUT, device=device, memory_config=mem)
    bspec = ttnn.ShardSpec(crs(0, 0, 1, 1), (32, 32), ttnn.ShardOrientation.ROW_MAJOR)
    bmem = ttnn.MemoryConfig(ttnn.TensorMemoryLayout.BLOCK_SHARDED, ttnn.BufferType.L1, bspec)
    ok = ttnn.from_torch(torch.randn(64, 64), dtype=ttnn.bfloat16, layout=ttnn.TILE_LAYOUT,
                         device=device, memory_config=bmem)
    assert ok.is_sharded()
    with pytest.raises(RuntimeError, match="does not cover"):
        ttnn.from_torch(torch.randn(64, 96), dtype=ttnn.bfloat16, layout=ttnn.TILE_LAYOUT,
                        device=device, memory_config=bmem)


def test_l1_budget(device):
    assert device.l1_budget_per_core == ttnn.WORMHOLE_L1_BYTES_PER_CORE
    big = ttnn.create_sharded_memory_config((1, 1, 1024, 1024), ttnn.CoreGrid(x=1, y=1),
                                            ttnn.ShardStrategy.HEIGHT)
    with pytest.raises(RuntimeError, match="Out of L1"):  # 2 MiB of bf16 on one core
        ttnn.from_torch(torch.zeros(1, 1, 1024, 1024), dtype=ttnn.bfloat16,
                        layout=ttnn.TILE_LAYOUT, device=device, memory_config=big)
    ok = ttnn.from_torch(torch.zeros(1, 1, 1024, 1024), dtype=ttnn.bfloat8_b,
                         layout=ttnn.TILE_LAYOUT, device=device, memory_config=big)
    assert device.l1_used() == 1024 * 1088
    ttnn.deallocate(ok)
    assert device.l1_used() == 0
    device.set_l1_budget_per_core(64 * 1024)
    mem = _width_sharded(256, 1, shard_w=256, rows=128)  # 64 KiB + 1 tile on one core
    with pytest.raises(RuntimeError, match="Out of L1"):
        ttnn.from_torch(torch.zeros(1, 1, 160, 256), dtype=ttnn.bfloat16,
                        layout=ttnn.TILE_LAYOUT, device=device,
                        memory_config=_width_sharded(256, 1, shard_w=256, rows=160))
    assert ttnn.from_torch(torch.zeros(1, 1, 128, 256), dtype=ttnn.bfloat16,
                           layout=ttnn.TILE_LAYOUT, device=device, memory_config=mem).is_sharded()


def test_l1_budget_from_open_device_and_gc():
    dev = ttnn.open_device(device_id=0, l1_small_size=4096, worker_l1_size=100_000)
    assert dev.l1_budget_per_core == 100_000 - 4096
    t = ttnn.from_torch(torch.zeros(64, 64 * 64), dtype=ttnn.bfloat16, layout=ttnn.TILE_LAYOUT,
                        device=dev, memory_config=ttnn.L1_MEMORY_CONFIG)
    assert dev.l1_used() == 64 * 64 * 64 * 2 // 64
    del t
    assert dev.l1_used() == 0
    ttnn.close_device(dev)
