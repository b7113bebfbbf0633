"""`QuantizedTensor` bookkeeping: plane validation, device moves, and the flat save/load through a
real safetensors file (planes come back with the same dtypes and bytes).
"""

from __future__ import annotations

import json

import pytest
import safetensors
import safetensors.torch
import torch
from test_quant_gguf import random_blocks

from llm.model.quant import (
    GGUF_FORMATS,
    QuantizedTensor,
    flatten_state,
    get_format,
    quantize_int4,
    quantize_int8,
    repack_gguf,
    unflatten_state,
)
from llm.model.quant.state import QUANT_METADATA_KEY


def q4_k(n: int = 4, k: int = 512) -> QuantizedTensor:
    qtype = next(t for t, f in GGUF_FORMATS.items() if f == "q4_k")
    return repack_gguf(random_blocks(qtype, n, k, seed=7, scale=0.01), qtype, (n, k))


def assert_same(a: QuantizedTensor, b: QuantizedTensor) -> None:
    assert (a.format, a.shape) == (b.format, b.shape)
    assert sorted(a.planes) == sorted(b.planes)
    for name, t in a.planes.items():
        assert t.dtype == b.planes[name].dtype and torch.equal(t, b.planes[name]), name


def test_planes_are_checked_against_the_format() -> None:
    w = q4_k()
    planes = dict(w.planes)
    with pytest.raises(ValueError, match="unknown quantized format 'q3_k'"):
        QuantizedTensor("q3_k", w.shape, planes)
    with pytest.raises(ValueError, match="expected torch.float16"):
        QuantizedTensor("q4_k", w.shape, {**planes, "d": planes["d"].float()})
    with pytest.raises(ValueError, match=r"\(4, 8\), expected torch.uint8 \(4, 16\)"):
        QuantizedTensor("q4_k", w.shape, {**planes, "scales": planes["scales"][:, :8]})
    with pytest.raises(ValueError, match="planes .* given"):
        QuantizedTensor("q4_k", w.shape, {k: v for k, v in planes.items() if k != "mins"})
    with pytest.raises(ValueError, match="not a multiple of the block size 256"):
        QuantizedTensor("q4_k", (4, 384), planes)
    with pytest.raises(ValueError, match="several devices"):
        QuantizedTensor("q4_k", w.shape, {**planes, "d": planes["d"].to("meta")})


def test_to_moves_every_plane_and_keeps_dtypes() -> None:
    w = quantize_int8(torch.randn(8, 64))
    moved = w.to("meta")
    assert moved.device == torch.device("meta") and moved.shape == w.shape
    for name, t in moved.planes.items():
        assert t.device.type == "meta" and t.dtype == w.planes[name].dtype
        assert t.shape == w.planes[name].shape
    assert_same(w.to("cpu"), w)


def test_state_round_trips_through_a_safetensors_file(tmp_path) -> None:
    torch.manual_seed(0)
    weights = {
        "layers.0.q4_k.weight": q4_k(),
        "layers.0.int4.weight": quantize_int4(torch.randn(6, 256), group_size=32),
        "layers.0.int8.weight": quantize_int8(torch.randn(5, 96)),
        "layers.0.slice.weight": q4_k(8, 768).slice_rows(2, 6).slice_cols(256, 768),
        "norm.weight": torch.randn(96).to(torch.bfloat16),
    }
    tensors, metadata = flatten_state(weights)
    assert "layers.0.q4_k.weight.qs" in tensors and "norm.weight" in tensors
    assert json.loads(metadata[QUANT_METADATA_KEY])["layers.0.int4.weight"] == {
        "format": "int4_g32", "shape": [6, 256]}
    path = tmp_path / "weights.safetensors"
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)
    with safetensors.safe_open(str(path), "pt") as f:
        stored_metadata = f.metadata()
    loaded = unflatten_state(safetensors.torch.load_file(str(path)), stored_metadata)
    assert sorted(loaded) == sorted(weights)
    for name, w in weights.items():
        if isinstance(w, QuantizedTensor):
            assert_same(loaded[name], w)
            assert torch.equal(loaded[name].dequantize(), w.dequantize())
        else:
            assert loaded[name].dtype == w.dtype and torch.equal(loaded[name], w)


def test_flat_names_must_not_collide() -> None:
    w = q4_k()
    with pytest.raises(ValueError, match="'x.qs' is used twice"):
        flatten_state({"x": w, "x.qs": torch.zeros(1)})
    tensors, meta = w.to_flat("x")
    del tensors["x.mins"]
    with pytest.raises(KeyError, match="'x.mins' missing"):
        QuantizedTensor.from_flat("x", tensors, meta)


def test_nbytes_counts_every_plane() -> None:
    w = q4_k(4, 512)
    assert w.nbytes == 4 * (256 + 2 * 2 + 2 * 2 + 16 + 16) == get_format("q4_k").nbytes(4, 512)
    assert w.slice_cols(0, 256).nbytes == w.nbytes // 2
    assert w.slice_rows(0, 1).nbytes == w.nbytes // 4
