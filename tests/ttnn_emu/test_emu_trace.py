"""Trace capture / replay rules, per-step accounting and the N150/N300 projection (ref. 8)."""

import pytest
import torch
from emu_helpers import bf16, on

import llm.ttnn_emu as ttnn

RM = ttnn.ROW_MAJOR_LAYOUT
VOCAB, DIM = 64, 64


def _model(device):
    emb = torch.randn(1, 1, VOCAB, DIM)
    head = torch.randn(1, 1, DIM, VOCAB)
    return emb, head, on(device, emb, layout=RM), on(device, head, ttnn.bfloat8_b)


def _step(tok, pos, temb, thead):
    """embedding -> lm head -> argmax, plus_one(pos); returns the token tensor."""
    x = ttnn.embedding(tok, temb, layout=ttnn.TILE_LAYOUT)  # [1, 32, DIM]
    x4 = ttnn.unsqueeze_to_4D(x)
    logits = ttnn.matmul(x4, thead)
    ttnn.deallocate(x4)
    rm = ttnn.untilize(logits)
    out = ttnn.argmax(rm, dim=3)
    ttnn.plus_one(pos)
    return out


def _ref(tokens, emb, thead):
    x = bf16(emb[0, 0])[tokens]
    logits = bf16(x @ ttnn.to_torch(thead)[0, 0])
    return torch.argmax(logits, -1)


def test_trace_replays_inputs_updated_in_place(device):
    emb, _, temb, thead = _model(device)
    tokens = torch.randint(0, VOCAB, (1, 1, 1, 32))
    tok = on(device, tokens, ttnn.uint32, RM)
    pos = on(device, torch.zeros(32, dtype=torch.int32), ttnn.int32, RM)
    _step(tok, pos, temb, thead)  # compile run
    tid = ttnn.begin_trace_capture(device, cq_id=0)
    out = _step(tok, pos, temb, thead)
    ttnn.end_trace_capture(device, tid, cq_id=0)
    for i in range(3):
        new_tokens = torch.randint(0, VOCAB, (1, 1, 1, 32))
        ttnn.copy_host_to_device_tensor(ttnn.from_torch(new_tokens, dtype=ttnn.uint32), tok)
        ttnn.execute_trace(device, tid, cq_id=0, blocking=False)
        got = ttnn.to_torch(out).to(torch.int64)[0, 0]
        assert torch.equal(got, _ref(new_tokens[0, 0, 0], emb, thead))
        assert ttnn.to_torch(pos)[0].item() == 2 + i  # compile run, replays (not the capture)
    ttnn.release_trace(device, tid)
    with pytest.raises(RuntimeError, match="released"):
        ttnn.execute_trace(device, tid)


def test_capture_forbids_host_io_and_allows_allocation(device):
    t = on(device, torch.zeros(1, 1, 32, 32))
    h = ttnn.from_torch(torch.zeros(1, 1, 32, 32), dtype=ttnn.bfloat16, layout=ttnn.TILE_LAYOUT)
    ttnn.add(t, t)  # compile run
    tid = ttnn.begin_trace_capture(device)
    y = ttnn.add(t, t)
    with pytest.raises(RuntimeError, match="Reads are not supported during trace capture"):
        ttnn.to_torch(y)
    with pytest.raises(RuntimeError, match="Writes are not supported during trace capture"):
        ttnn.copy_host_to_device_tensor(h, t)
    with pytest.raises(RuntimeError, match="trace is being captured"):
        ttnn.from_torch(torch.zeros(2), device=device)
    with pytest.raises(RuntimeError, match="trace is being captured"):
        ttnn.to_device(h, device)
    with pytest.raises(RuntimeError, match="Reads are not supported"):
        ttnn.from_device(y)
    with pytest.raises(RuntimeError, match="trace is being captured"):
        ttnn.get_device_tensors(y)  # the emulator's per-chip tensors are host copies
    with pytest.raises(RuntimeError, match="Event Synchronization is not supported"):
        ttnn.synchronize_device(device)
    # allocating (no transfer) is allowed inside a capture, as in the trace guide's L1 example
    ttnn.allocate_tensor_on_device(ttnn.Shape([32, 32]), ttnn.bfloat16, ttnn.TILE_LAYOUT, device)
    with pytest.raises(RuntimeError, match="already being captured"):
        ttnn.begin_trace_capture(device)
    with pytest.raises(RuntimeError, match="execute_trace is not allowed"):
        ttnn.execute_trace(device, tid)
    ttnn.end_trace_capture(device, tid)
    with pytest.raises(RuntimeError, match="holds no data until execute_trace"):
        ttnn.to_torch(y)  # a capture runs nothing: y is defined by the first replay
    ttnn.execute_trace(device, tid)
    assert ttnn.to_torch(y).shape == (1, 1, 32, 32)


def test_trace_needs_trace_region():
    dev = ttnn.open_device(device_id=0)
    with pytest.raises(RuntimeError, match="trace_region_size"):
        ttnn.begin_trace_capture(dev)
    ttnn.close_device(dev)


def test_trace_step_cost_and_projection(device):
    emb, _, temb, thead = _model(device)
    tok = on(device, torch.zeros(1, 1, 1, 32, dtype=torch.int64), ttnn.uint32, RM)
    pos = on(device, torch.zeros(32, dtype=torch.int32), ttnn.int32, RM)
    _step(tok, pos, temb, thead)  # compile run
    device.op_log.reset()
    tid = ttnn.begin_trace_capture(device)
    _step(tok, pos, temb, thead)
    ttnn.end_trace_capture(device, tid)
    captured = list(device.op_log.recent)
    ttnn.execute_trace(device, tid)
    cost = ttnn.trace_step_cost(device, tid)
    assert cost.num_ops == len(captured) == 6
    assert cost.dram_bytes == sum(r.dram_bytes for r in captured)
    assert cost.flops == sum(r.flops for r in captured)
    assert cost.flops >= 2 * 32 * DIM * VOCAB
    p150 = ttnn.project_step_time(cost, "N150")
    assert p150.seconds == pytest.approx(max(cost.dram_bytes / 240e9, cost.flops / 74e12))
    assert p150.label.startswith("PROJECTED (not measured) N150")
    peak = ttnn.project_step_time(cost, "N300", achievable=False)
    assert peak.dram_seconds == pytest.approx(cost.dram_bytes / 288e9)
    assert peak.math_seconds == pytest.approx(cost.flops / 65.5e12)
    assert "N300" in str(peak)


def test_trace_on_mesh_with_ccl():
    mesh = ttnn.open_mesh_device(ttnn.MeshShape(1, 2), trace_region_size=1 << 20)
    x = on(mesh, torch.zeros(1, 1, 32, 64), ttnn.float32,
           mapper=ttnn.ShardTensorToMesh(mesh, dim=3))
    ttnn.all_gather(ttnn.add(x, 1.0), dim=3)  # compile run
    tid = ttnn.begin_trace_capture(mesh)
    g = ttnn.all_gather(ttnn.add(x, 1.0), dim=3)
    ttnn.end_trace_capture(mesh, tid)
    src = torch.arange(64.0).reshape(1, 1, 1, 64).expand(1, 1, 32, 64).contiguous()
    ttnn.copy_host_to_device_tensor(
        ttnn.from_torch(src, dtype=ttnn.float32, layout=ttnn.TILE_LAYOUT,
                        mesh_mapper=ttnn.ShardTensorToMesh(mesh, dim=3)), x)
    ttnn.execute_trace(mesh, tid)
    for part in ttnn.get_device_tensors(g):
        assert torch.equal(ttnn.to_torch(part), src + 1)
    ttnn.close_mesh_device(mesh)
