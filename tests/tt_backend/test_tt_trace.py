"""Traced decode: replays give the same tokens as untraced steps; the capture holds no host
transfer (the emulator forbids them inside a capture and the check is live); while the same users
keep decoding, a step writes nothing from the host (tokens and positions advance on device)."""

from __future__ import annotations

import pytest
import torch
from hf_reference import hf_model, state_dict
from test_tt_runner import GREEDY, generate
from tt_helpers import MESH_CONFIG, TT_CONFIGS

from llm.backends.tt.runner import TTBackend
from llm.engine.contract.backend import DecodeInput, PrefillInput
from llm.model.checkpoint.common import Checkpoint
from llm.model.config import RuntimeConfig


@pytest.mark.parametrize("name,mesh", [("llama_gqa", "1x1"), ("mesh", "1x2")])
def test_traced_equals_untraced(name: str, mesh: str) -> None:
    config = MESH_CONFIG if name == "mesh" else TT_CONFIGS[name]
    ck = Checkpoint(config, state_dict(hf_model(config)), source=None)
    rt = RuntimeConfig(max_batch=3, max_seq_len=96, block_size=32)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, config.vocab_size, (n,), generator=g).tolist() for n in (9, 33, 20)]
    steps = 10
    outs = {}
    for traced in (False, True):
        backend = TTBackend(ck, rt, mesh=mesh, trace=traced, implementation="emulator")
        outs[traced] = generate(backend, prompts, steps)
        runner = backend.decoder
        assert runner.steps == steps - 1
        if traced:
            ttnn, dev = backend.mesh.ttnn, backend.mesh.device
            trace = dev._traces[int(runner.trace_id)]
            assert trace.replays == steps - 1  # one replay per step, captured once
            # the step cost is the replayed graph: weights of every layer were read
            assert backend.step_cost().dram_bytes > 0
            # zero host transfers inside the capture: any would have raised; prove it is live
            tid = ttnn.begin_trace_capture(dev, cq_id=0)
            with pytest.raises(RuntimeError, match="not allowed while a trace is being captured"):
                ttnn.copy_host_to_device_tensor(
                    ttnn.from_torch(torch.zeros(3, dtype=torch.int64), dtype=ttnn.int32,
                                    layout=ttnn.ROW_MAJOR_LAYOUT,
                                    mesh_mapper=backend.mesh.replicate()),
                    runner.inputs.dev["cur_pos"])
            with pytest.raises(RuntimeError, match="not allowed while a trace is being captured"):
                backend.mesh.read(runner.inputs.next_tokens)
            runner.run_graph()
            ttnn.end_trace_capture(dev, tid, cq_id=0)
            ttnn.release_trace(dev, tid)
            # steady state: after the first step (4 inputs written) nothing more was copied
            assert runner.inputs.host_writes == 4 + 2 * 4  # + the two rewrites around capture
    assert outs[True] == outs[False]


def test_inputs_rewritten_only_when_the_batch_changes() -> None:
    config = TT_CONFIGS["llama_gqa"]
    ck = Checkpoint(config, state_dict(hf_model(config)), source=None)
    backend = TTBackend(ck, RuntimeConfig(max_batch=2, max_seq_len=64, block_size=32),
                        implementation="emulator")
    a = backend.prefill(PrefillInput(0, [3, 4, 5], 0, [1, 2], GREEDY))
    b = backend.prefill(PrefillInput(1, [6, 7], 0, [3, 4], GREEDY))
    inputs = backend.decoder.inputs
    t = backend.decode(DecodeInput([0, 1], [a, b], [3, 2], [[1, 2], [3, 4]], [GREEDY] * 2))
    before = inputs.host_writes
    t = backend.decode(DecodeInput([0, 1], t, [4, 3], [[1, 2], [3, 4]], [GREEDY] * 2))
    assert inputs.host_writes == before  # same users continuing: no host write at all
    backend.decode(DecodeInput([1], [t[1]], [4], [[3, 4]], [GREEDY]))  # user 0 left
    assert inputs.host_writes == before + 1  # only cur_pos (user 0 now idle) changed


def _join_leave(backend) -> list[list[int]]:
    """User A (slot 0) and B (slot 1) decode; A leaves, C joins slot 0 while B keeps going."""
    pa, pb, pc = [3, 4, 5, 6], [7, 8, 9], [10, 11, 12, 13, 14]
    a = [backend.prefill(PrefillInput(0, pa, 0, [1, 2], GREEDY))]
    b = [backend.prefill(PrefillInput(1, pb, 0, [3, 4], GREEDY))]
    for t in range(3):
        a_next, b_next = backend.decode(DecodeInput([0, 1], [a[-1], b[-1]],
                                                    [len(pa) + t, len(pb) + t],
                                                    [[1, 2], [3, 4]], [GREEDY] * 2))
        a.append(a_next)
        b.append(b_next)
    c = [backend.prefill(PrefillInput(0, pc, 0, [5, 6], GREEDY))]  # slot 0 reused, new pages
    for t in range(3):
        c_next, b_next = backend.decode(DecodeInput([0, 1], [c[-1], b[-1]],
                                                    [len(pc) + t, len(pb) + 3 + t],
                                                    [[5, 6], [3, 4]], [GREEDY] * 2))
        c.append(c_next)
        b.append(b_next)
    return [a, b, c]


def test_users_joining_and_leaving_a_captured_trace() -> None:
    config = TT_CONFIGS["llama_gqa"]
    ck = Checkpoint(config, state_dict(hf_model(config)), source=None)
    rt = RuntimeConfig(max_batch=2, max_seq_len=64, block_size=32, num_blocks=8)
    traced = TTBackend(ck, rt, implementation="emulator")
    untraced = TTBackend(ck, rt, trace=False, implementation="emulator")
    assert _join_leave(traced) == _join_leave(untraced)
    assert traced.decoder.trace_id is not None and traced.decoder.steps == 6
