"""Tensor parallelism on quantized weights: each rank reads only its slices of a GGUF's blocks as
stored (Q8_0, Q4_0, a Q4_K / Q5_K / Q6_K mix) or quantizes its slices of a Hugging Face model at
load (int8, int4), and 2 gloo processes on the CPU compute what the single-process model of the
same checkpoint computes.

Tolerance: both sides multiply by exactly the same dequantized float32 weights; they differ in
the order of accumulation only (a row-parallel o_proj / down_proj sums two partial products over
the all-reduce; the single process runs whole-layer C kernels, the ranks op by op), so fp32
logits agree to 1e-4 absolute / relative (as tests/test_quant_loading.py holds the C kernels to
torch's ops), and greedy tokens are equal.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from test_checkpoint import write_gguf
from test_quant_gguf import random_blocks
from test_tensor_parallel import random_model_dir
from tp_ranks import quantized_models_rank, spawn_ranks

import llm
from llm.backends.torch.parallel.plan import ColumnBlock, TensorParallelPlan
from llm.backends.torch.parallel.quantizing_slices import QuantizingSlices, open_slices_as
from llm.backends.torch.parallel.slices import open_weight_slices
from llm.model.checkpoint.common import CheckpointError, expected_tensors
from llm.model.checkpoint.load import load_checkpoint
from llm.model.config import ConfigError, ModelConfig
from llm.model.quant.registry import get_format

Q = gguf.GGMLQuantizationType
TOL = 1e-4
_BASE = dict(arch="llama", num_layers=2, max_position_embeddings=256, eos_token_ids=(2,))
# 6 query / 3 KV heads: on 2 ranks KV head 1 is replicated; intermediate 96 is 3 groups of 32,
# so the MLP splits 32 + 64 (the even 48 + 48 would cut a group); int4's o_proj groups of 64
# columns are 2 heads: heads split 2 + 4.
ODD = ModelConfig(**_BASE, hidden_size=64, intermediate_size=96, head_dim=32, num_heads=6,
                  num_kv_heads=3, vocab_size=96)
# K-quants (groups of 256): every input dim a multiple of 256; tied Q6_K embedding / LM head.
KQ = ModelConfig(**_BASE, hidden_size=256, intermediate_size=512, head_dim=128, num_heads=4,
                 num_kv_heads=2, vocab_size=64, tie_word_embeddings=True)
# Phi-3's fused qkv_proj / gate_up_proj (llama.cpp attn_qkv, 2 x intermediate ffn_up): each
# rank's q / k / v and gate / up rows are read from the fused tensor's blocks
PHI3 = ModelConfig(**{**_BASE, "arch": "phi3"}, hidden_size=64, intermediate_size=96,
                   head_dim=32, num_heads=6, num_kv_heads=3, vocab_size=96)
CASES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "k_quants", "int4", "int4_mix", "int8",
         "phi3_Q8_0")


def float_tensors(config: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: (1.0 if name.endswith("norm.weight") else 0.0)
            + 0.1 * torch.randn(shape, generator=g)
            for name, shape in expected_tensors(config).items()}


def k_quant_gguf(path) -> str:
    """KQ as a GGUF: attention / gate / up Q4_K, down Q6_K and Q5_K, embedding Q6_K (random
    blocks with scales giving weights of about 0.1)."""
    blocks = {}
    for i, (name, shape) in enumerate(expected_tensors(KQ).items()):
        if len(shape) != 2:
            continue
        n, k = shape
        qtype, scale = (Q.Q4_K, 4e-4)
        if name.endswith("down_proj.weight"):
            qtype, scale = (Q.Q6_K, 1e-4) if ".0." in name else (Q.Q5_K, 2e-4)
        elif name == "model.embed_tokens.weight":
            qtype, scale = Q.Q6_K, 1e-4
        blocks[name] = (random_blocks(qtype, n, k, seed=i, scale=scale), qtype)
    return str(write_gguf(path, KQ, float_tensors(KQ), blocks=blocks))


@pytest.fixture(scope="module")
def ranks_out(tmp_path_factory) -> list[dict]:
    """Every case on one pair of spawned ranks (one process start for all)."""
    tmp = tmp_path_factory.mktemp("tp_quant")
    cases = []
    for qtype in (Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1):
        path = write_gguf(tmp / f"{qtype.name}.gguf", ODD, float_tensors(ODD), qtype=qtype)
        cache = tmp / f"cache-{qtype.name}"
        if qtype == Q.Q4_0:  # its stored cache entry exists: the ranks read the entry's planes
            load_checkpoint(path, cache_dir=cache, progress=False, weights="stored")
        cases.append(dict(name=qtype.name, path=str(path), weights="stored", cache=str(cache)))
    cases.append(dict(name="k_quants", path=k_quant_gguf(tmp / "kq.gguf"), weights="stored",
                      cache=str(tmp / "cache-kq")))
    phi3 = write_gguf(tmp / "phi3.gguf", PHI3, float_tensors(PHI3), qtype=Q.Q8_0)
    cases.append(dict(name="phi3_Q8_0", path=str(phi3), weights="stored",
                      cache=str(tmp / "cache-phi3")))
    hf = random_model_dir(tmp / "hf", ODD)
    cases += [dict(name=m, path=str(hf), weights=m, cache=str(tmp / "c"))
              for m in ("int4", "int4_mix", "int8")]
    return spawn_ranks(quantized_models_rank, 2, tmp, cases)


@pytest.mark.parametrize("case", CASES)
def test_two_ranks_compute_the_single_process_quantized_model(ranks_out, case) -> None:
    readers = {"Q8_0": "GGUFSlices", "Q4_0": "SafetensorsSlices", "Q4_1": "GGUFSlices",
               "Q5_0": "GGUFSlices", "Q5_1": "GGUFSlices", "k_quants": "GGUFSlices",
               "int8": "QuantizingSlices", "int4": "QuantizingSlices",
               "int4_mix": "QuantizingSlices", "phi3_Q8_0": "GGUFSlices"}
    for res in ranks_out:
        got = res[case]
        assert got["reader"] == readers[case]
        sharded, whole = got["logits"]
        assert sharded.shape == whole.shape
        torch.testing.assert_close(sharded, whole, rtol=TOL, atol=TOL)
        tp_tokens, single_tokens = got["tokens"]
        assert tp_tokens == single_tokens


def test_the_launch_quantizes_each_rank_as_one_process_does(ranks_out) -> None:
    """create_backend(tensor_parallel=2, weights="int8") (what LLM(...) runs) on the HF model:
    the ranks' logits and the leader's greedy tokens are the single-process int8 model's (its
    row-parallel int8 scales agreed over the ranks: each rank's own maxima would be 3e-2 off)."""
    launched, single = ranks_out[0]["launched"], ranks_out[0]["int8"]
    torch.testing.assert_close(launched["logits"], single["logits"][1], rtol=TOL, atol=TOL)
    assert launched["tokens"] == single["tokens"][1]
    assert "launched" not in ranks_out[1]  # the follower only followed


@pytest.mark.parametrize("case", CASES)
def test_each_rank_holds_only_its_share_of_the_quantized_bytes(ranks_out, case) -> None:
    formats = ranks_out[0][case]["formats"]  # {name: (format, bytes)} of the whole checkpoint
    if case in ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"):  # every matrix in the file's format
        assert {f for f, _ in formats.values()} == {case.lower()}
    assert len(formats) == 7 * 2 + 1 + (case not in ("k_quants",))  # every matrix quantized
    whole = sum(b for _, b in formats.values())
    for res in ranks_out:
        got = res[case]
        local = expected_tensors(got["local"])  # the rank's shapes by the plan
        planned = {name: get_format(fmt).nbytes(*local[name]) for name, (fmt, _) in
                   formats.items() if name in local}
        assert got["quantized_bytes"] == planned  # exactly the plan's slices, nothing more
        # 1/2 of the whole, over only by the KV heads the odd split replicates
        limit = 1.0 if case == "k_quants" else 1.35
        assert sum(planned.values()) <= limit * whole / 2
    if case in ("Q8_0", "Q4_0", "k_quants", "phi3_Q8_0"):  # stored blocks partition exactly,
        # KV heads aside
        def apart(r: int) -> int:
            return sum(b for n, b in ranks_out[r][case]["quantized_bytes"].items()
                       if not n.endswith(("k_proj.weight", "v_proj.weight")))

        assert apart(0) + apart(1) == sum(b for n, (_, b) in formats.items() if not n.endswith(
            ("k_proj.weight", "v_proj.weight")))


def test_plan_aligns_row_parallel_splits_to_quantization_groups() -> None:
    plan = TensorParallelPlan(ODD, 2, ColumnBlock(64, "o", "int4_g64"),
                              ColumnBlock(32, "down", "q4_0"))
    shards = [plan.shard(r) for r in range(2)]
    assert [s.heads for s in shards] == [(0, 2), (2, 6)]  # o_proj cut at column 64, not 96
    assert [s.kv_heads for s in shards] == [(0,), (1, 2)]
    assert [s.ffn for s in shards] == [(0, 32), (32, 96)]
    dense = TensorParallelPlan(ODD, 2)
    assert [dense.shard(r).ffn for r in range(2)] == [(0, 48), (48, 96)]
    assert [dense.shard(r).kv_heads for r in range(2)] == [(0, 0, 1), (1, 2, 2)]
    down = ColumnBlock(32, "model.layers.1.mlp.down_proj.weight", "q4_0")
    with pytest.raises(ConfigError, match=r"down_proj\.weight \(q4_0, quantization groups of 32 "
                                          r"columns\) at group boundaries: its 96 columns "
                                          r"\(intermediate_size\) are 3 groups for 4 ranks \(the "
                                          r"even split at columns \[24, 48, 72\] cuts groups at "
                                          r"\[24, 48, 72\]\)"):
        TensorParallelPlan(ODD, 4, down_block=down)


def test_unalignable_split_is_refused_naming_tensor_group_and_split(tmp_path,
                                                                     monkeypatch) -> None:
    path = k_quant_gguf(tmp_path / "kq.gguf")
    monkeypatch.setenv("WORLD_SIZE", "4")  # as torchrun would start rank 0 of 4
    want = (r"tensor_parallel=4 cannot split the input columns of "
            r"model\.layers\.0\.self_attn\.o_proj\.weight \(q4_k, quantization groups of 256 "
            r"columns\) at group boundaries: its 512 columns \(4 query heads x head_dim 128\) are "
            r"2 groups for 4 ranks \(the even split at columns \[128, 256, 384\] cuts groups at "
            r"\[128, 384\]\)")
    with pytest.raises(ConfigError, match=want):
        llm.LLM(path, tensor_parallel=4, weights="stored", progress=False, cache_dir=tmp_path)
    # the same split of the dequantized weights is fine
    assert TensorParallelPlan.for_weights(open_weight_slices(path, cache_dir=tmp_path,
                                                             progress=False), 4).size == 4
    hf = random_model_dir(tmp_path / "hf", ODD)
    with pytest.raises(ConfigError, match=r"o_proj\.weight \(int4_g64, quantization groups "
                                          r"of 64 columns\).* 192 columns \(6 query heads x "
                                          r"head_dim 32\) are 3 groups for 4 ranks"):
        TensorParallelPlan.for_weights(open_slices_as(hf, "int4"), 4)


def test_stored_slices_are_slices_of_the_stored_load(tmp_path) -> None:
    """Rows (Q/K un-permuted per head), repeated rows and whole-group columns read from the GGUF
    and from its stored cache entry are the stored load's planes, byte for byte."""
    path = k_quant_gguf(tmp_path / "kq.gguf")
    full = load_checkpoint(path, cache_dir=tmp_path / "c", progress=False, weights="stored")
    hd = KQ.head_dim
    for slices in (open_weight_slices(path, cache_dir=tmp_path / "none", weights="stored"),
                   open_weight_slices(path, cache_dir=tmp_path / "c", weights="stored")):
        reads = [("model.layers.1.self_attn.q_proj.weight", 0, [(hd, 3 * hd)]),
                 ("model.layers.0.self_attn.k_proj.weight", 0, [(hd, 2 * hd), (0, hd)] * 2),
                 ("model.layers.0.self_attn.o_proj.weight", 1, [(256, 512)]),
                 ("model.layers.1.mlp.down_proj.weight", 1, [(0, 256)]),
                 ("model.embed_tokens.weight", 0, [(5, 40)])]
        for name, dim, ranges in reads:
            w = full.tensors[name]
            parts = [w.slice_rows(a, b) if dim == 0 else w.slice_cols(a, b) for a, b in ranges]
            got = slices.read(name, dim, ranges)
            assert got.format == w.format and got.shape[1 - dim] == w.shape[1 - dim], name
            for plane in w.planes:
                want = torch.cat([p.planes[plane] for p in parts], dim=0)
                assert torch.equal(got.planes[plane], want), (name, plane)
        with pytest.raises(ValueError, match=r"o_proj.weight \(q4_k\): column slice \[128, "
                                             r"512\) does not fall on its quantization groups "
                                             r"of 256 columns"):
            slices.read("model.layers.0.self_attn.o_proj.weight", 1, [(128, 512)])
        slices.close()


def test_int8_column_slices_take_the_whole_rows_scales(tmp_path) -> None:
    """With the row maxima of the other rank's columns, an int8 column slice is exactly the
    whole matrix's quantization, sliced (what `across(mesh)` does over the ranks)."""
    hf = random_model_dir(tmp_path / "hf", ODD)
    whole = load_checkpoint(hf, progress=False, weights="int8").tensors
    dense = open_weight_slices(hf)
    name = "model.layers.0.mlp.down_proj.weight"
    other = dense.read(name, 1, [(48, 96)]).abs().amax(dim=1, keepdim=True)
    alone = QuantizingSlices(dense, "int8").read(name, 1, [(0, 48)])
    agreed = QuantizingSlices(dense, "int8", lambda x: torch.maximum(x, other))
    part = agreed.read(name, 1, [(0, 48)])
    want = whole[name].slice_cols(0, 48)
    assert torch.equal(part.planes["qs"], want.planes["qs"])
    assert torch.equal(part.planes["d"], want.planes["d"])
    assert not torch.equal(alone.planes["d"], want.planes["d"])  # its own maxima: other scales
    with pytest.raises(CheckpointError, match="a GGUF runs as stored"):
        open_slices_as(write_gguf(tmp_path / "f.gguf", ODD, float_tensors(ODD)), "int4",
                       cache_dir=tmp_path)
    np.testing.assert_array_equal(part.dequantize().numpy(), want.dequantize().numpy())


def test_a_chosen_int4_group_slices_as_the_single_process_load(tmp_path) -> None:
    """`int4_group` reaches the ranks' reader: row and column slices of the int4 g32 load, and a
    group that does not divide a matrix is refused naming it."""
    hf = random_model_dir(tmp_path / "hf", ODD)
    whole = load_checkpoint(hf, progress=False, weights="int4", int4_group=32).tensors
    slices = open_slices_as(hf, "int4", int4_group=32)
    name = "model.layers.0.self_attn.o_proj.weight"  # in_features 192: default group 64
    for dim, ranges in ((1, [(0, 64)]), (0, [(8, 40)])):
        got = slices.read(name, dim, ranges)
        (a, b), = ranges
        want = whole[name].slice_cols(a, b) if dim else whole[name].slice_rows(a, b)
        assert got.format == "int4_g32" == want.format
        for plane in want.planes:
            assert torch.equal(got.planes[plane], want.planes[plane]), plane
    wide = open_slices_as(hf, "int4", int4_group=4096)
    with pytest.raises(CheckpointError, match="no multiple of the int4 group 4096"):
        wide.read(name, 0, [(0, 8)])
    with pytest.raises(CheckpointError, match="int4_group applies to weights='int4'"):
        open_slices_as(hf, "int8", int4_group=32)


def test_the_launch_hands_int4_group_to_the_ranks_reader(tmp_path, monkeypatch) -> None:
    """`BackendSpec.int4_group` reaches `open_slices_as` on the tensor-parallel path (dropped,
    the ranks would quantize with their default groups: accepted and ignored)."""
    from llm.backends.torch.parallel import launch
    from llm.engine.contract.backend import BackendSpec

    seen = {}

    def fake_open(path, weights, **kw):
        seen.update(kw, weights=weights)
        raise RuntimeError("stop")

    monkeypatch.setattr(launch, "open_slices_as", fake_open)
    monkeypatch.setattr(launch.Mesh, "check_launch", staticmethod(lambda size, device: None))
    hf = random_model_dir(tmp_path / "hf", ODD)
    with pytest.raises(RuntimeError, match="stop"):
        launch.launch(BackendSpec(model=hf, tensor_parallel=2, weights="int4", int4_group=32),
                      build=None)
    assert seen["int4_group"] == 32 and seen["weights"] == "int4"


def test_cuda_kernels_apply_a_ranks_slices(tmp_path) -> None:
    """The GPU path of a rank is the same QuantLinear on its slices: the Triton GEMV (decode) and
    the dequantizing copy (prompts), here in Triton's interpreter, on each rank's row-parallel
    slices (first 8 output rows: the interpreter is slow) equal x @ dequantize(slice).T."""
    pytest.importorskip("triton", reason="triton is not installed")
    from llm.backends.torch.kernels.dequant import dequantize_dense
    from llm.backends.torch.kernels.qgemv import qgemv

    q4_0 = write_gguf(tmp_path / "q4_0.gguf", ODD, float_tensors(ODD), qtype=Q.Q4_0)
    readers = [open_weight_slices(q4_0, cache_dir=tmp_path, weights="stored"),
               open_weight_slices(k_quant_gguf(tmp_path / "kq.gguf"), cache_dir=tmp_path,
                                  weights="stored"),
               open_slices_as(random_model_dir(tmp_path / "hf", ODD), "int4")]
    g = torch.Generator().manual_seed(0)
    for slices in readers:
        plan = TensorParallelPlan.for_weights(slices, 2)
        for rank in range(2):
            local = plan.read_local(slices, rank)
            for kind in ("self_attn.o_proj", "mlp.down_proj"):
                w = local[f"model.layers.0.{kind}.weight"].slice_rows(0, 8).contiguous()
                x = torch.randn(2, w.in_features, generator=g)
                want = x.double() @ w.dequantize().double().T
                for got in (qgemv(x, w), x @ dequantize_dense(w, torch.float32).T):
                    assert (got.double() - want).norm() / want.norm() < 1e-5, (w.format, rank)
