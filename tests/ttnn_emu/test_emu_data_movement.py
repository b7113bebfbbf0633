"""Layout / memory / shape ops against torch (reference 3)."""

import pytest
import torch

import llm.ttnn_emu as ttnn


def dev_tensor(device, x, dtype=ttnn.bfloat16, layout=ttnn.TILE_LAYOUT, mem=None):
    return ttnn.from_torch(x, dtype=dtype, layout=layout, device=device,
                           memory_config=mem or ttnn.DRAM_MEMORY_CONFIG)


def test_to_layout_roundtrip_host_and_device(device):
    x = torch.randn(1, 1, 5, 40)
    h = ttnn.from_torch(x, dtype=ttnn.bfloat16)
    t = ttnn.to_layout(h, ttnn.TILE_LAYOUT)
    assert tuple(t.padded_shape) == (1, 1, 32, 64) and t.device() is None
    r = ttnn.to_layout(dev_tensor(device, x), ttnn.ROW_MAJOR_LAYOUT)
    assert tuple(r.padded_shape) == (1, 1, 5, 40) and torch.equal(ttnn.to_torch(r), x.bfloat16())
    with pytest.raises(RuntimeError, match="Layout must be Layout::TILE"):
        ttnn.to_layout(dev_tensor(device, x, ttnn.bfloat8_b), ttnn.ROW_MAJOR_LAYOUT)


def test_tilize_untilize(device):
    x = torch.randn(1, 1, 32, 64)
    rm = dev_tensor(device, x, layout=ttnn.ROW_MAJOR_LAYOUT)
    t = ttnn.tilize(rm)
    assert t.layout == ttnn.TILE_LAYOUT
    u = ttnn.untilize(t)
    assert u.layout == ttnn.ROW_MAJOR_LAYOUT and torch.equal(ttnn.to_torch(u), x.bfloat16())
    with pytest.raises(RuntimeError, match="must be TILE"):
        ttnn.untilize(rm)
    with pytest.raises(RuntimeError, match="block-float"):
        ttnn.untilize(dev_tensor(device, x, ttnn.bfloat8_b))


def test_sharding_roundtrip(device):
    x = torch.randn(1, 1, 32, 256)
    t = dev_tensor(device, x)
    mem = ttnn.create_sharded_memory_config((1, 1, 32, 256), ttnn.CoreGrid(x=8, y=1),
                                            ttnn.ShardStrategy.WIDTH)
    s = ttnn.interleaved_to_sharded(t, mem)
    assert s.memory_config() == mem
    s2 = ttnn.interleaved_to_sharded(t, ttnn.CoreGrid(x=4, y=1), (32, 64),
                                     ttnn.TensorMemoryLayout.WIDTH_SHARDED,
                                     ttnn.ShardOrientation.ROW_MAJOR)
    assert s2.memory_config().shard_spec.shape == (32, 64)
    with pytest.raises(RuntimeError, match="must be interleaved"):
        ttnn.interleaved_to_sharded(s, mem)
    i = ttnn.sharded_to_interleaved(s, ttnn.L1_MEMORY_CONFIG, ttnn.float32)
    assert i.dtype == ttnn.float32 and i.memory_config() == ttnn.L1_MEMORY_CONFIG
    assert torch.equal(ttnn.to_torch(i), x.bfloat16().float())
    with pytest.raises(RuntimeError, match="must be sharded"):
        ttnn.sharded_to_interleaved(i)
    m = ttnn.to_memory_config(i, mem, dtype=ttnn.bfloat8_b)
    assert m.dtype == ttnn.bfloat8_b and m.is_sharded()
    with pytest.raises(RuntimeError, match="shard_spec"):
        ttnn.to_memory_config(i, ttnn.L1_WIDTH_SHARDED_MEMORY_CONFIG)


def test_reshape_logical_and_padded(device):
    x = torch.randn(1, 1, 5, 40)
    t = dev_tensor(device, x)
    r = ttnn.reshape(t, (1, 5, 1, 40))
    assert tuple(r.padded_shape) == (1, 5, 32, 64)
    assert torch.equal(ttnn.to_torch(r), x.bfloat16().reshape(1, 5, 1, 40))
    h = ttnn.reshape(ttnn.from_torch(x, dtype=ttnn.bfloat16, layout=ttnn.TILE_LAYOUT), (5, -1))
    assert tuple(h.shape) == (5, 40)
    y = torch.randn(1, 1, 32, 64)
    d = ttnn.reshape(dev_tensor(device, y[:, :, :8]), (1, 1, 8, 64), (1, 1, 32, 64))
    assert tuple(d.shape) == (1, 1, 8, 64) and tuple(d.padded_shape) == (1, 1, 32, 64)
    with pytest.raises(RuntimeError, match="volume"):
        ttnn.reshape(t, (1, 1, 5, 41))
    with pytest.raises(RuntimeError, match="multiple of 32"):
        ttnn.reshape(t, (1, 1, 5, 40), (1, 1, 33, 64))


def test_reshape_window_of_a_padded_tile(device):
    # decode keeps B real users inside a 32-row tile: reshape(x, (1,1,B,W), (1,1,32,W)) on a
    # tensor with 32 logical rows narrows the logical shape, the padded volume unchanged
    y = torch.randn(1, 1, 32, 64)
    d = ttnn.reshape(dev_tensor(device, y), (1, 1, 3, 64), (1, 1, 32, 64))
    assert tuple(d.shape) == (1, 1, 3, 64) and tuple(d.padded_shape) == (1, 1, 32, 64)
    assert torch.equal(ttnn.to_torch(d), y.bfloat16()[:, :, :3])
    with pytest.raises(RuntimeError, match="padded volume"):
        ttnn.reshape(dev_tensor(device, y), (1, 1, 3, 64), (1, 1, 64, 64))
    with pytest.raises(RuntimeError, match="exceeds padded"):
        ttnn.reshape(dev_tensor(device, y), (1, 1, 3, 96), (1, 1, 32, 64))


def test_unsqueeze_to_4d():
    t = ttnn.from_torch(torch.arange(6, dtype=torch.int32).reshape(1, 6), dtype=ttnn.uint32)
    u = ttnn.unsqueeze_to_4D(t)
    assert tuple(u.shape) == (1, 1, 1, 6)


def test_slice(device):
    x = torch.randn(1, 2, 64, 96)
    t = dev_tensor(device, x)
    s = ttnn.slice(t, (0, 1, 3, 0), (1, 2, 40, 96))
    assert torch.equal(ttnn.to_torch(s), x.bfloat16()[:, 1:2, 3:40, :])
    s2 = t[:, :, :32, 64:]
    assert torch.equal(ttnn.to_torch(s2), x.bfloat16()[:, :, :32, 64:])
    st = ttnn.slice(t, (0, 0, 0, 0), (1, 2, 64, 96), (1, 1, 2, 3))
    assert torch.equal(ttnn.to_torch(st), x.bfloat16()[:, :, ::2, ::3])
    with pytest.raises(RuntimeError, match="strided"):
        ttnn.slice(dev_tensor(device, x, ttnn.bfloat8_b), (0, 0, 0, 0), (1, 2, 64, 96),
                   (1, 1, 2, 1))
    with pytest.raises(RuntimeError, match="on device"):
        ttnn.slice(ttnn.from_torch(x), (0, 0, 0, 0), (1, 1, 1, 1))
    with pytest.raises(RuntimeError, match="bad range"):
        ttnn.slice(t, (0, 0, 0, 0), (1, 2, 65, 96))


def test_concat(device):
    a, b = torch.randn(1, 1, 32, 64), torch.randn(1, 1, 32, 32)
    c = ttnn.concat([dev_tensor(device, a), dev_tensor(device, b)], dim=-1)
    assert torch.equal(ttnn.to_torch(c), torch.cat([a, b], -1).bfloat16())
    with pytest.raises(RuntimeError, match="same dtype"):
        ttnn.concat([dev_tensor(device, a), dev_tensor(device, b, ttnn.float32)], dim=3)
    with pytest.raises(RuntimeError, match="on device"):
        ttnn.concat([ttnn.from_torch(a), ttnn.from_torch(b)], dim=3)


def test_typecast_rules(device):
    x = torch.tensor([[-2.7, -0.5, 0.5, 3.9, 1e10]])
    t = dev_tensor(device, x, ttnn.float32)
    u = ttnn.typecast(t, ttnn.uint32)
    assert ttnn.to_torch(u).to(torch.int64).tolist() == [[0, 0, 0, 3, 2**32 - 1]]
    i = ttnn.typecast(t, ttnn.float32, ttnn.int32)
    assert ttnn.to_torch(i).tolist()[0][:4] == [-2, 0, 0, 3]
    with pytest.raises(RuntimeError, match="input dtype"):
        ttnn.typecast(t, ttnn.bfloat16, ttnn.float32)
    b = ttnn.typecast(dev_tensor(device, torch.tensor([[1.999]]), ttnn.float32), ttnn.bfloat8_b)
    assert ttnn.to_torch(b).item() == 1.984375
    h = ttnn.typecast(ttnn.from_torch(x), ttnn.bfloat16)
    assert h.device() is None and torch.equal(ttnn.to_torch(h), x.bfloat16())
    assert ttnn.to_dtype(ttnn.from_torch(x), ttnn.bfloat16).dtype == ttnn.bfloat16


def test_permute_transpose_clone(device):
    x = torch.randn(1, 2, 32, 64)
    t = dev_tensor(device, x)
    assert torch.equal(ttnn.to_torch(ttnn.permute(t, (0, 2, 1, 3))),
                       x.bfloat16().permute(0, 2, 1, 3))
    assert torch.equal(ttnn.to_torch(ttnn.transpose(t, 1, 2)), x.bfloat16().transpose(1, 2))
    c = ttnn.clone(t, dtype=ttnn.float32)
    assert c.dtype == ttnn.float32 and torch.equal(ttnn.to_torch(c), x.bfloat16().float())


def test_output_tensor_written_in_place(device):
    x = torch.randn(1, 1, 32, 64)
    out = dev_tensor(device, torch.zeros(1, 1, 32, 64), ttnn.float32)
    r = ttnn.typecast(dev_tensor(device, x), ttnn.float32, output_tensor=out)
    assert r is out and torch.equal(ttnn.to_torch(out), x.bfloat16().float())


def test_accounting_records_dram_bytes(device):
    t = dev_tensor(device, torch.randn(1, 1, 32, 64))
    device.op_log.reset()
    ttnn.typecast(t, ttnn.bfloat8_b)
    rec = device.op_log.recent[-1]
    assert rec.name == "typecast" and rec.dram_bytes == 2 * 2048 + 2 * 1088 and rec.flops == 0
