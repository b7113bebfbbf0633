"""Every ttnn call of llm/backends/tt binds to ttnn 0.81.1's signatures and to the emulator's,
and the emulator is no looser than real ttnn, so code that passes the emulator cannot fail on
a real signature.

Calls are read from the source (ttnn_signatures.calls_in: name, positional count, keywords). Real
ttnn's signatures (nanobind's, parsed; names, kinds, which have defaults) are recorded in
ttnn_0_81_1_signatures.json, so the CI checks run without the wheel; where `ttnn` imports, the
last three tests check the recording, the calls and a few refusals against the installed
wheel. To run those (ttnn 0.81.1 imports only in Python 3.12; no device is needed):

    python3.12 -m venv /tmp/ttnn312
    /tmp/ttnn312/bin/pip install ttnn==0.81.1 pytest
    /tmp/ttnn312/bin/python -m pytest --noconftest tests/tt_backend/test_tt_ttnn_conformance.py

(the emulator tests then skip: they need torch, which the conftests import too; hence
`--noconftest`). After a ttnn upgrade, `/tmp/ttnn312/bin/python tests/tt_backend/ttnn_signatures.py`
rewrites the recording.
"""

from __future__ import annotations

import importlib.util
import inspect
import json

import pytest
from ttnn_signatures import (
    LOOSE,
    REAL_ONLY,
    SNAPSHOT,
    Call,
    calls_in,
    from_json,
    looser,
    mismatches,
    real_signatures,
    record,
    resolve,
    unknown_keywords,
)

RECORDED = json.loads(SNAPSHOT.read_text())
real = pytest.mark.skipif(importlib.util.find_spec("ttnn") is None,
                          reason="real ttnn does not import here (it needs Python 3.12)")


def _emulator():
    pytest.importorskip("torch")
    import llm.ttnn_emu as emu
    return emu


def emulator_signatures(obj) -> list[inspect.Signature]:
    return [inspect.signature(obj)]


def recorded_signatures(obj) -> list[inspect.Signature]:
    return from_json(obj)


def test_the_parser_finds_the_calls():
    calls = calls_in()
    names = {c.name for c in calls}
    assert len(calls) > 100 and {"SDPAProgramConfig", "ShardSpec", "CoreCoord", "linear",
                                 "transformer.scaled_dot_product_attention",
                                 "experimental.paged_update_cache"} <= names
    sdpa = [c for c in calls if c.name == "SDPAProgramConfig"]
    assert all({"q_chunk_size", "k_chunk_size"} <= set(c.keywords) for c in sdpa), sdpa
    wrapped = [c for c in calls if c.where.startswith("chunking.py") and c.keywords]
    assert len(wrapped) == 1 and wrapped[0].name == "linear" and wrapped[0].npos == 2
    assert "program_config" in wrapped[0].keywords  # prefill_linear -> linear_in_chunks


def test_backend_calls_bind_the_emulator():
    emu = _emulator()
    calls = [c for c in calls_in() if c.name not in REAL_ONLY]
    assert mismatches(emu, emulator_signatures, calls) == []


def test_backend_calls_bind_the_recorded_real_signatures():
    assert mismatches(RECORDED, recorded_signatures, calls_in()) == []


def test_emulator_is_no_looser_than_real_ttnn():
    emu = _emulator()
    problems = {}
    for name, overloads in RECORDED.items():
        if name in REAL_ONLY:
            continue
        check = unknown_keywords if name in LOOSE else looser
        found = check(inspect.signature(resolve(emu, name)), from_json(overloads))
        if found:
            problems[name] = found
    assert problems == {}


def test_the_checks_reject_what_real_ttnn_rejects():
    emu = _emulator()
    bad = [Call("CoreCoord", 0, ("x", "y"), "t:1"),
           Call("SDPAProgramConfig", 0, ("compute_with_storage_grid_size",), "t:2"),
           Call("ShardSpec", 2, (), "t:3"),
           Call("MatmulMultiCoreReuseMultiCastProgramConfig", 0,
                ("compute_with_storage_grid_size", "in0_block_w", "out_subblock_h",
                 "out_subblock_w", "per_core_M", "per_core_N"), "t:4"),
           Call("CoreGrid", 2, (), "t:5"), Call("linear", 2, ("bias_tensor",), "t:6")]
    for sigs in (emulator_signatures, recorded_signatures):
        module = emu if sigs is emulator_signatures else RECORDED
        assert len(mismatches(module, sigs, bad)) == len(bad)
    defaulted = inspect.signature(lambda *, compute_with_storage_grid_size, q_chunk_size=32,
                                  k_chunk_size=32: None)
    assert looser(defaulted, from_json(RECORDED["SDPAProgramConfig"])) == [
        "q_chunk_size is required in real ttnn, defaulted here",
        "k_chunk_size is required in real ttnn, defaulted here"]
    invented = inspect.signature(lambda input_tensor, shape, *, padded=None, **kw: None)
    assert unknown_keywords(invented, from_json(RECORDED["reshape"])) == [
        "takes padded= which no real overload does", "accepts **kw"]
    by_name = inspect.signature(lambda x, y: None)
    assert looser(by_name, from_json(RECORDED["CoreCoord"])) == [
        "x is positional-only in real ttnn", "y is positional-only in real ttnn",
        "takes x= which real ttnn does not", "takes y= which real ttnn does not"]


@real
def test_recording_matches_the_installed_wheel():
    import ttnn
    assert record(ttnn) == RECORDED


@real
def test_backend_calls_bind_the_installed_wheel():
    import ttnn
    assert mismatches(ttnn, real_signatures, calls_in()) == []


@real
def test_the_installed_wheel_refuses_what_the_emulator_refuses():
    """The recording's claims, at run time: real ttnn raises TypeError for the shapes that the
    emulator now refuses (constructors need no device), and accepts them when complete."""
    import ttnn
    grid = ttnn.CoreRangeSet({ttnn.CoreRange(ttnn.CoreCoord(0, 0), ttnn.CoreCoord(1, 0))})
    mm = dict(compute_with_storage_grid_size=(8, 8), in0_block_w=1, out_subblock_h=1,
              out_subblock_w=1, per_core_M=1, per_core_N=1)
    refused = [lambda: ttnn.CoreCoord(x=1, y=2), lambda: ttnn.CoreGrid(8, 8),
               lambda: ttnn.ShardSpec(grid, (32, 64)),
               lambda: ttnn.MatmulMultiCoreReuseMultiCastProgramConfig(**mm),
               lambda: ttnn.SDPAProgramConfig(compute_with_storage_grid_size=(8, 8)),
               lambda: ttnn.WormholeComputeKernelConfig(ttnn.MathFidelity.HiFi4)]
    for make in refused:
        with pytest.raises(TypeError):
            make()
    ttnn.ShardSpec(grid, (32, 64), ttnn.ShardOrientation.ROW_MAJOR)
    ttnn.MatmulMultiCoreReuseMultiCastProgramConfig(**mm, transpose_mcast=False)
    ttnn.SDPAProgramConfig(compute_with_storage_grid_size=(8, 8), q_chunk_size=32,
                           k_chunk_size=32)
