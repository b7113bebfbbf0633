"""Reading parts of checkpoint tensors (tensor-parallel ranks): every reader gives exactly the
slices of what `load_checkpoint` gives, from HF safetensors (sharded), a GGUF (F32, F16 and
quantized; Q/K rows un-permuted per head; aligned and unaligned column slices) and a GGUF's cache.
"""

from __future__ import annotations

import gguf
import pytest
import torch
from test_checkpoint import hf_dir, hf_model, tiny_gguf

import llm.backends.torch.parallel.slices as ws
from llm.model.checkpoint.common import CheckpointError, expected_tensors
from llm.model.checkpoint.load import load_checkpoint

Q = gguf.GGMLQuantizationType


def assert_slices_match(slices: ws.WeightSlices, full: dict[str, torch.Tensor]) -> None:
    hd = slices.config.head_dim
    for name, shape in expected_tensors(slices.config).items():
        t = full[name]
        assert torch.equal(slices.read(name), t), name
        rows = [(hd, 3 * hd), (0, hd)] if shape[0] >= 3 * hd else [(0, hd)]
        assert torch.equal(slices.read(name, 0, rows),
                           torch.cat([t[a:b] for a, b in rows])), name
        if len(shape) == 2:
            for cols in ([(32, 64)], [(5, 37), (1, 2)]):  # whole quant blocks, then not
                assert torch.equal(slices.read(name, 1, cols),
                                   torch.cat([t[:, a:b] for a, b in cols], dim=1)), name


@pytest.mark.parametrize(("arch", "qtype"), [("llama", Q.F32), ("llama", Q.F16),
                                           ("llama", Q.Q8_0), ("phi3", Q.Q8_0)])
def test_gguf_slices_equal_the_converted_tensors(tmp_path, arch, qtype) -> None:
    """(Phi-3: q/k/v and gate/up are row ranges of the fused attn_qkv / ffn_up.)"""
    path, _ = tiny_gguf(tmp_path, arch, qtype=qtype)
    full = load_checkpoint(path, cache_dir=tmp_path / "cache", progress=False).tensors
    assert_slices_match(ws.GGUFSlices(path), full)


def test_gguf_with_a_cache_entry_is_read_from_the_cache(tmp_path, monkeypatch) -> None:
    path, _ = tiny_gguf(tmp_path, qtype=Q.Q8_0)
    cache = tmp_path / "cache"
    full = load_checkpoint(path, cache_dir=cache, progress=False).tensors
    monkeypatch.setattr(ws, "GGUFSlices", None)  # any use of the GGUF reader would fail
    slices = ws.open_weight_slices(path, cache_dir=cache, progress=False)
    assert isinstance(slices, ws.SafetensorsSlices)
    assert slices.source_sha256 is not None
    assert_slices_match(slices, full)


def test_gguf_without_cache_is_read_directly_and_nothing_is_written(tmp_path) -> None:
    path, _ = tiny_gguf(tmp_path, qtype=Q.Q8_0)
    slices = ws.open_weight_slices(path, cache_dir=tmp_path / "cache", progress=False)
    assert isinstance(slices, ws.GGUFSlices)
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("arch", ["llama", "phi3"])
def test_sharded_hf_directory_slices(tmp_path, arch) -> None:
    """(Phi-3: q/k/v and gate/up are row ranges of the stored qkv_proj / gate_up_proj.)"""
    d = hf_dir(tmp_path, hf_model(arch, False, 0), max_shard_size="20KB")
    slices = ws.open_weight_slices(d, progress=False)
    assert len({file for file, _ in slices.where.values()}) > 1
    assert_slices_match(slices, load_checkpoint(d, progress=False).tensors)
    slices.close()


def test_bad_requests_name_the_tensor(tmp_path) -> None:
    d = hf_dir(tmp_path, hf_model("llama", False, 0))
    slices = ws.open_weight_slices(d, progress=False)
    with pytest.raises(CheckpointError, match="no tensor 'model.nope'"):
        slices.read("model.nope")
    with pytest.raises(ValueError, match=r"range \[0, 9999\) of dim 0 of 'model.norm.weight'"):
        slices.read("model.norm.weight", 0, [(0, 9999)])
    with pytest.raises(CheckpointError, match="pickle"):
        (tmp_path / "pytorch_model.bin").write_bytes(b"x")
        ws.open_weight_slices(tmp_path / "pytorch_model.bin")


def test_a_non_finite_value_in_a_ranks_slice_is_an_error_naming_the_tensor(tmp_path) -> None:
    model = hf_model("llama", False, 0)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[5, 3] = float("nan")
    slices = ws.open_weight_slices(hf_dir(tmp_path, model), progress=False)
    assert torch.isfinite(slices.read("model.layers.0.mlp.up_proj.weight", 0, [(0, 4)])).all()
    with pytest.raises(CheckpointError, match="tensor 'model.layers.0.mlp.up_proj.weight' "
                                              "holds a non-finite value"):
        slices.read("model.layers.0.mlp.up_proj.weight", 0, [(4, 8)])
    slices.close()
