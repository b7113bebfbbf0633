"""Traced decode replays the captured graph, not the Python model: once the decode trace is
captured, the model's Python decode is replaced by one that fails, and the traced tokens still
equal the untraced ones (on the emulator, whose replay runs only the recorded ops). Dropping the
weights instead would free buffers the trace reads, which execute_trace refuses."""

from __future__ import annotations

import warnings

import pytest
import torch
from hf_reference import hf_model, state_dict
from test_tt_runner import GREEDY, generate
from tt_helpers import TT_CONFIGS

from llm.backends.tt.runner import TTBackend
from llm.engine.contract.backend import DecodeInput, PrefillInput
from llm.model.checkpoint.common import Checkpoint
from llm.model.config import RuntimeConfig


def _break_python_after_capture(backend: TTBackend, drop_weights: bool = False) -> list[int]:
    """After the step that captures the trace, make any Python re-run of the model fail (or,
    with drop_weights, drop the layers' attention modules and with them their weights)."""
    runner, model = backend.decoder, backend.model
    step = runner.step
    captured: list[int] = []

    def fail(*args, **kwargs):
        pytest.fail("a traced step re-ran the Python decode graph")

    def step_then_break(*args, **kwargs):
        out = step(*args, **kwargs)
        if runner.trace_id is not None and not captured:
            captured.append(runner.steps)
            model.decode = fail  # what run_graph calls
            for layer in model.layers:  # and what a re-run of it would call
                layer.decode = fail
                if drop_weights:
                    layer.attn = None
        return out

    runner.step = step_then_break
    return captured


def _setup():
    config = TT_CONFIGS["llama_gqa"]
    ck = Checkpoint(config, state_dict(hf_model(config)), source=None)
    rt = RuntimeConfig(max_batch=2, max_seq_len=64, block_size=32)
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, config.vocab_size, (n,), generator=g).tolist() for n in (5, 12)]
    return ck, rt, prompts


def test_traced_tokens_come_from_the_captured_graph() -> None:
    ck, rt, prompts = _setup()
    steps = 6
    untraced = generate(TTBackend(ck, rt, trace=False, implementation="emulator"), prompts, steps)
    backend = TTBackend(ck, rt, trace=True, implementation="emulator")
    captured = _break_python_after_capture(backend)
    traced = generate(backend, prompts, steps)
    assert captured == [1]  # the first decode step captured, the later ones only replayed
    trace = backend.mesh.device._traces[int(backend.decoder.trace_id)]
    assert trace.replays == steps - 1
    assert traced == untraced
    with warnings.catch_warnings():  # a prefill after the capture frees what it allocates
        warnings.simplefilter("error", RuntimeWarning)  # before the next replay
        token = backend.prefill(PrefillInput(0, [3, 4, 5], 0, [1, 2], GREEDY))
        backend.decode(DecodeInput([0], [token], [3], [[1, 2]], [GREEDY]))


def test_freeing_weights_a_trace_reads_is_refused() -> None:
    ck, rt, prompts = _setup()
    backend = TTBackend(ck, rt, trace=True, implementation="emulator")
    _break_python_after_capture(backend, drop_weights=True)
    with pytest.raises(RuntimeError, match="deallocated after capture"):
        generate(backend, prompts, 3)
