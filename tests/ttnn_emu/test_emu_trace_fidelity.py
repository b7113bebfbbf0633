"""Trace fidelity: a replay runs the op sequence the capture recorded on the buffers it resolved,
not the Python code that issued it; a capture itself changes nothing; allocation rules."""

import warnings
from dataclasses import dataclass

import pytest
import torch
from emu_helpers import on

import llm.ttnn_emu as ttnn

SHAPE = (1, 1, 32, 32)


def _host(values):
    return ttnn.from_torch(values, dtype=ttnn.bfloat16, layout=ttnn.TILE_LAYOUT)


def _val(t) -> float:
    return ttnn.to_torch(t)[0, 0, 0, 0].item()


@dataclass
class _Cfg:  # a mutable Python config the model code reads
    scale: float
    starts: list


class _Model:
    """Model code whose Python-side state (tensor bindings, config, a method) can change."""

    def __init__(self, x, cfg):
        self.x, self.cfg = x, cfg

    def forward(self):
        y = ttnn.multiply(self.x, self.cfg.scale)
        return ttnn.slice(y, self.cfg.starts, [1, 1, 32, 32])


def _capture(device, fn):
    fn()  # compile run
    tid = ttnn.begin_trace_capture(device)
    out = fn()
    ttnn.end_trace_capture(device, tid)
    return tid, out


def test_host_write_into_a_non_captured_buffer_is_invisible(device):
    a = on(device, torch.full(SHAPE, 1.0))
    b = on(device, torch.full(SHAPE, 2.0))  # same spec as a, never used by the trace
    m = _Model(a, _Cfg(3.0, [0, 0, 0, 0]))
    tid, out = _capture(device, m.forward)
    m.x = b  # rebinding the Python variable the model reads: the trace keeps a's buffer
    ttnn.copy_host_to_device_tensor(_host(torch.full(SHAPE, 7.0)), b)
    ttnn.execute_trace(device, tid)
    assert _val(out) == 3.0  # 1 * 3: neither the rebinding nor the write into b reached it
    ttnn.copy_host_to_device_tensor(_host(torch.full(SHAPE, 5.0)), a)
    ttnn.execute_trace(device, tid)
    assert _val(out) == 15.0  # a write into the captured input buffer is seen


def test_a_tensor_list_changed_after_capture_is_not_seen(device):
    a = on(device, torch.full(SHAPE, 1.0))
    b = on(device, torch.full(SHAPE, 2.0))
    other = on(device, torch.full(SHAPE, 9.0))
    parts = [a, b]  # the list object the op received during capture
    tid, out = _capture(device, lambda: ttnn.concat(parts, dim=3))
    parts[1] = other  # Python mutates that very list; other was never captured
    ttnn.copy_host_to_device_tensor(_host(torch.full(SHAPE, 4.0)), b)
    ttnn.execute_trace(device, tid)
    got = ttnn.to_torch(out)[0, 0, 0]
    assert got[:32].eq(1.0).all() and got[32:].eq(4.0).all()


def test_python_changes_after_capture_do_not_change_the_replay(device, monkeypatch):
    x = on(device, torch.arange(32.0).repeat(32, 1).reshape(SHAPE))
    cfg = _Cfg(2.0, [0, 0, 0, 0])
    m = _Model(x, cfg)
    tid, out = _capture(device, m.forward)
    cfg.scale = 100.0  # a Python scalar in a config object the model code reads
    cfg.starts[3] = 16  # a list passed to ttnn.slice, mutated in place
    m.forward = lambda: pytest.fail("replay re-ran the Python model")
    monkeypatch.setattr(ttnn, "multiply", lambda *a, **k: pytest.fail("replay looked up ttnn"))
    ttnn.execute_trace(device, tid)
    got = ttnn.to_torch(out)
    assert got.shape == SHAPE
    assert torch.equal(got[0, 0, 0], 2.0 * torch.arange(32.0))


def test_capture_changes_nothing_and_replays_do(device):
    pos = on(device, torch.zeros(32, dtype=torch.int32), ttnn.int32, ttnn.ROW_MAJOR_LAYOUT)
    x = on(device, torch.full(SHAPE, 1.0))
    dst = on(device, torch.full(SHAPE, -1.0))

    def step():
        ttnn.plus_one(pos)
        ttnn.add(x, 1.0, output_tensor=dst)

    tid, _ = _capture(device, step)
    ttnn.copy_host_to_device_tensor(_host(torch.full(SHAPE, -1.0)), dst)
    # the capture neither advanced pos nor wrote dst: the compile run did, once
    assert ttnn.to_torch(pos)[0].item() == 1 and _val(dst) == -1.0
    ttnn.execute_trace(device, tid)
    ttnn.execute_trace(device, tid)
    assert ttnn.to_torch(pos)[0].item() == 3 and _val(dst) == 2.0


def test_outputs_of_a_capture_are_undefined_until_executed(device):
    x = on(device, torch.full(SHAPE, 1.0))
    tid, out = _capture(device, lambda: ttnn.add(x, x))
    with pytest.raises(RuntimeError, match="holds no data until execute_trace"):
        ttnn.to_torch(out)
    with pytest.raises(RuntimeError, match="holds no data until execute_trace"):
        ttnn.add(out, 1.0)  # an eager op reading it would read garbage on a device
    ttnn.execute_trace(device, tid)
    assert _val(out) == 2.0


def test_an_op_not_compiled_before_capture_is_refused(device):
    x = on(device, torch.full(SHAPE, 1.0))
    ttnn.add(x, x)
    tid = ttnn.begin_trace_capture(device)
    ttnn.add(x, x)
    with pytest.raises(RuntimeError, match="Cannot load new binaries during trace capture"):
        ttnn.multiply(x, x)
    ttnn.end_trace_capture(device, tid)
    y = on(device, torch.ones(1, 1, 32, 64))  # another shape is another program
    tid = ttnn.begin_trace_capture(device)
    with pytest.raises(RuntimeError, match="not yet in the program cache"):
        ttnn.add(y, y)
    ttnn.add(x, x)
    ttnn.end_trace_capture(device, tid)


def test_a_captured_input_freed_after_capture_is_an_error(device):
    x = on(device, torch.full(SHAPE, 1.0))
    tid, _ = _capture(device, lambda: ttnn.add(x, 1.0))
    ttnn.deallocate(x)
    with pytest.raises(RuntimeError, match="deallocated after capture"):
        ttnn.execute_trace(device, tid)


def test_buffers_freed_inside_the_capture_belong_to_the_trace(device):
    x = on(device, torch.full(SHAPE, 1.0))

    def step():
        y = ttnn.add(x, 1.0, memory_config=ttnn.L1_MEMORY_CONFIG)
        z = ttnn.multiply(y, 3.0)
        ttnn.deallocate(y)
        return z

    tid, z = _capture(device, step)
    used = device.l1_used()
    ttnn.copy_host_to_device_tensor(_host(torch.full(SHAPE, 4.0)), x)
    ttnn.execute_trace(device, tid)
    assert _val(z) == 15.0
    assert device.l1_used() == used  # a replay allocates nothing
    assert ttnn.trace_step_cost(device, tid).num_ops == 2


def test_capture_leaves_the_device_rng_where_it_was(device):
    users, width = 4, 64
    tv = on(device, torch.randn(1, 1, users, width))
    ti = on(device, torch.arange(width).repeat(users, 1).reshape(1, 1, users, width), ttnn.int32,
            ttnn.ROW_MAJOR_LAYOUT)
    tk = on(device, torch.full((users,), 32), ttnn.int32, ttnn.ROW_MAJOR_LAYOUT)
    tp = on(device, torch.full((users,), 1.0), ttnn.bfloat16, ttnn.ROW_MAJOR_LAYOUT)
    tt = on(device, torch.full((users,), 1.0), ttnn.bfloat16, ttnn.ROW_MAJOR_LAYOUT)
    ttnn.sampling(tv, ti, tk, tp, tt)  # compile run
    ttnn.manual_seed(5, device=device)
    first = ttnn.to_torch(ttnn.sampling(tv, ti, tk, tp, tt))
    ttnn.manual_seed(5, device=device)
    tid = ttnn.begin_trace_capture(device)
    traced = ttnn.sampling(tv, ti, tk, tp, tt)
    ttnn.end_trace_capture(device, tid)
    assert torch.equal(ttnn.to_torch(ttnn.sampling(tv, ti, tk, tp, tt)), first)
    ttnn.manual_seed(5, device=device)
    ttnn.execute_trace(device, tid)
    assert torch.equal(ttnn.to_torch(traced), first)


def test_an_op_writing_an_input_behind_the_capture_is_caught(device):
    from llm.ttnn_emu.accounting import op

    @op("bad_inplace")
    def bad_inplace(t):
        t.padded_shards()[0].add_(1)  # not through mutable_shards
        return t

    x = on(device, torch.zeros(SHAPE))
    bad_inplace(x)
    ttnn.begin_trace_capture(device)
    with pytest.raises(RuntimeError, match="without Tensor.mutable_shards"):
        bad_inplace(x)


def test_an_input_freed_and_reallocated_inside_the_capture_is_the_trace_input(device):
    """tt-metal's trace guide, 'Trace with Non-Persistent L1 Input': the model frees its L1
    input; allocate_tensor_on_device at the end of the capture gets that address back, so
    writing the new tensor feeds the trace."""
    l1 = ttnn.L1_MEMORY_CONFIG

    def run_model(inp):
        out = ttnn.multiply(inp, 2.0)
        ttnn.deallocate(inp)
        return out

    run_model(ttnn.to_device(_host(torch.full(SHAPE, 1.0)), device, l1))  # compile run
    inp = ttnn.to_device(_host(torch.full(SHAPE, 1.0)), device, l1)
    tid = ttnn.begin_trace_capture(device)
    out = run_model(inp)
    inp = ttnn.allocate_tensor_on_device(inp.shape, inp.dtype, inp.layout, device, l1)
    other = ttnn.allocate_tensor_on_device(inp.shape, inp.dtype, inp.layout, device, l1)
    ttnn.end_trace_capture(device, tid)
    ttnn.copy_host_to_device_tensor(_host(torch.full(SHAPE, 5.0)), inp)
    ttnn.copy_host_to_device_tensor(_host(torch.full(SHAPE, 7.0)), other)  # a new address
    ttnn.execute_trace(device, tid)
    assert _val(out) == 10.0


def test_buffers_allocated_after_capture_and_alive_at_replay_warn(device):
    x = on(device, torch.full(SHAPE, 1.0))
    tid, _ = _capture(device, lambda: ttnn.add(x, 1.0))
    temp = on(device, torch.zeros(SHAPE))
    ttnn.deallocate(temp)  # freed before the replay: allowed
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ttnn.execute_trace(device, tid)
    kept = on(device, torch.zeros(SHAPE))
    with pytest.warns(RuntimeWarning, match="1 device buffer.* allocated after trace"):
        ttnn.execute_trace(device, tid)
    assert kept.is_allocated()
