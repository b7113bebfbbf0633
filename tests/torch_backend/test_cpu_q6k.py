"""Q6_K on the C kernels (cpu_kernels.c's q6 layout, quant/code_groups.py) against dequantize-then-
matmul in float32: the matrix bit for bit, matmuls within accumulation order (issue 15's per-module
max relative error <= 1e-3, and the summation-order bound of test_quant_cpu), embedding rows, the
float16-scale variant, the portable build, and whole models decoding through `layer_decode`
bit-equal to the per-op path: every matrix Q6_K, and Q4_K_M's mix of Q4_K and Q6_K blocks."""

from __future__ import annotations

import gguf
import pytest
import torch
import torch.nn.functional as F
from test_quant_cpu import group_max
from test_quant_gguf import random_blocks

from llm.backends.torch.quant.code_groups import to_code_groups
from llm.backends.torch.quant.cpu import prepare_cpu
from llm.backends.torch.quant.native import FLAGS, NativeKernelsUnavailable, load_kernels
from llm.model.quant import QuantizedTensor, repack_gguf

Q6_K = gguf.GGMLQuantizationType.Q6_K


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    try:
        return load_kernels(tmp_path_factory.mktemp("kernels"))
    except NativeKernelsUnavailable as e:
        pytest.fail(f"the C kernels do not build here: {e}")


@pytest.fixture(scope="module")
def portable(tmp_path_factory):
    """The loops the compiler vectorizes itself (machines without AVX-512)."""
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("-march=x86-64-v2 is an x86-64 flag")
    flags = tuple("-march=x86-64-v2" if f == "-march=native" else f for f in FLAGS)
    return load_kernels(tmp_path_factory.mktemp("portable"), flags)


def q6k(n: int, k: int, seed: int, scale: float = 0.01) -> QuantizedTensor:
    """Random GGUF Q6_K blocks (any code and int8 scale bytes, d ~ N(0, scale)) repacked as the
    loader repacks a file's."""
    return repack_gguf(random_blocks(Q6_K, n, k, seed=seed, scale=scale), Q6_K, (n, k))


def exact_f16_scales(w: QuantizedTensor) -> QuantizedTensor:
    """`w` with d a power of two and |sc| < 64, so that every d * sc is a float16."""
    planes = dict(w.planes)
    planes["d"] = torch.full_like(w.planes["d"], 2.0**-10)
    planes["scales"] = (w.planes["scales"].to(torch.int16) % 64).to(torch.int8)
    return QuantizedTensor(w.format, w.shape, planes)


W = q6k(37, 512, seed=3)  # N odd: a lone last row; K two super-blocks


def max_rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).abs().max() / want.abs().max())


@pytest.mark.parametrize("w", [W, exact_f16_scales(W)], ids=["f32_scales", "f16_scales"])
def test_code_groups_are_the_dequantized_matrix_bit_for_bit(w) -> None:
    groups = to_code_groups(w)
    assert groups.bits == 6 and groups.codes.dtype == torch.int8
    assert groups.scale.shape == groups.zero.shape == (w.out_features, w.in_features // 32)
    assert int(groups.codes.min()) >= -32 and int(groups.codes.max()) <= 31
    want_dtype = torch.float16 if w is not W else torch.float32
    assert groups.scale.dtype == want_dtype
    assert torch.equal(groups.dequantize(), w.dequantize(torch.float32))
    # 1.25 bytes a weight against dense float32's 4 (and the GGUF's 0.82)
    assert groups.nbytes == w.out_features * w.in_features * (1 + 2 * want_dtype.itemsize / 32)


@pytest.mark.parametrize("build", ["kernels", "portable"])
@pytest.mark.parametrize("m", [1, 2, 4, 5, 16, 17])  # 17: dequantize + F.linear (prompts)
@pytest.mark.parametrize("w", [W, exact_f16_scales(W)], ids=["f32_scales", "f16_scales"])
def test_matmul_equals_the_dequantized_matmul(request, build, w, m) -> None:
    layer = prepare_cpu(w, torch.float32, kernels=request.getfixturevalue(build))
    assert layer.kind == "native" and layer.bits == 6
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, w.in_features, generator=g)
    bias = torch.randn(w.out_features, generator=g)
    dense = w.dequantize(torch.float32)
    want = F.linear(x.double(), dense.double(), bias.double())
    got = layer(x, bias)
    assert got.shape == (m, w.out_features) and got.dtype == torch.float32
    assert max_rel(got, want) <= 1e-3
    bound = 2.0**-14 * (x.abs() @ group_max(dense).T) + 1e-6  # summation order only
    assert ((got.double() - want).abs() <= bound).all()


def test_a_rows_result_never_depends_on_the_batch(kernels) -> None:
    layer = prepare_cpu(W, torch.float32, kernels=kernels)
    x = torch.randn(16, W.in_features, generator=torch.Generator().manual_seed(3))
    alone = torch.cat([layer(x[i:i + 1]) for i in range(16)])
    for m in (2, 3, 5, 16):
        assert torch.equal(layer(x[:m]), alone[:m]), m


@pytest.mark.parametrize("w", [W, exact_f16_scales(W)], ids=["f32_scales", "f16_scales"])
def test_embedding_rows_and_dequant_are_exact(kernels, w) -> None:
    layer = prepare_cpu(w, torch.float32, kernels=kernels)
    ids = torch.tensor([0, 36, 5, 5, 17])
    dense = w.dequantize(torch.float32)
    assert torch.equal(layer.rows(ids), dense[ids])
    g = to_code_groups(w)
    out = kernels.dequant(6, g.codes, g.scale, g.zero, w.out_features, w.in_features)
    assert torch.equal(out, dense)
    with pytest.raises(IndexError, match="token ids"):
        layer.rows(torch.tensor([37]))


def test_the_code_range_and_negative_scales(kernels) -> None:
    """Codes 0 and 63 (q - 32 = -32 and 31) under scales -128 and 127."""
    planes = dict(W.planes)
    planes["qs"] = W.planes["qs"].clone()
    planes["qh"] = W.planes["qh"].clone()
    planes["scales"] = W.planes["scales"].clone()
    planes["qs"][0], planes["qh"][0] = 0x00, 0x00
    planes["qs"][1], planes["qh"][1] = 0xFF, 0xFF
    planes["scales"][:2] = torch.tensor([-128, 127], dtype=torch.int8).repeat(16)
    w = QuantizedTensor("q6_k", W.shape, planes)
    dense = w.dequantize(torch.float32)
    assert float(dense[0].abs().min()) > 0 and float(dense[1].abs().min()) > 0
    layer = prepare_cpu(w, torch.float32, kernels=kernels)
    eye = torch.eye(W.in_features)[:16]  # unit rows: each column's weight
    assert torch.equal(layer(eye), dense[:, :16].T)


def test_a_q6_k_model_decodes_through_layer_decode(tmp_path) -> None:
    """Every matrix Q6_K (the tied embedding too): `layer_decode` (one C call a layer, its
    projections through q6_matmul) bit-equal to the per-op path, logits within 1e-3 of the same
    model on the dequantized float32 weights."""
    from llm.model.checkpoint.common import expected_tensors
    from llm.model.config import ModelConfig

    config = ModelConfig(arch="llama", vocab_size=512, hidden_size=256, intermediate_size=512,
                         num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64,
                         max_position_embeddings=128, tie_word_embeddings=True)
    tensors = {}
    for i, (name, shape) in enumerate(expected_tensors(config).items()):
        if len(shape) == 1:
            tensors[name] = torch.ones(shape)
        else:  # weights of std ~ 1 / sqrt(K): codes ~18 and int8 scales ~74 times d
            tensors[name] = q6k(*shape, seed=i, scale=1.0 / (1370 * shape[1] ** 0.5))
    fused, ref = _layer_decode_equals_per_op(config, tensors, tmp_path)
    assert fused.model.weight_bytes < 0.45 * ref.model.weight_bytes


def _layer_decode_equals_per_op(config, tensors: dict, tmp_path) -> tuple:
    """Decode steps at batch 1 and 3 by `layer_decode` and by the per-op path: the same logits
    and K/V bit for bit, within 1e-3 of the model on the dequantized float32 weights. Returns
    the fused backend and the float32 one."""
    from llm.backends.torch.runner import TorchBackend
    from llm.model.checkpoint.common import Checkpoint
    from llm.model.config import RuntimeConfig

    quant = Checkpoint(config, tensors, tmp_path / "quant")
    dense = Checkpoint(config, {k: v.dequantize(torch.float32)
                                if isinstance(v, QuantizedTensor) else v
                                for k, v in tensors.items()}, tmp_path / "dense")
    runtime = RuntimeConfig(max_batch=3, max_seq_len=64, block_size=16)
    fused, per_op = (TorchBackend(quant, runtime, cache_dir=tmp_path) for _ in range(2))
    ref = TorchBackend(dense, runtime, cache_dir=tmp_path)
    per_op.model._layer_plans = lambda cache: None
    g = torch.Generator().manual_seed(1)
    for b in (1, 3):  # (past 16 rows the per-op path's layers use F.linear: other last bits)
        tokens = torch.randint(0, config.vocab_size, (b,), generator=g)
        positions = torch.randint(0, 20, (b,), generator=g)
        table = torch.arange(4 * b).view(b, 4)
        got = [be.model.decode(tokens, positions, table, be.cache, 19)
               for be in (fused, per_op, ref)]
        assert fused.model._layer_plans(fused.cache), "the fused path did not run"
        assert torch.equal(got[0], got[1])
        for pools in ((fused.cache.k, per_op.cache.k), (fused.cache.v, per_op.cache.v)):
            assert all(torch.equal(a, c) for a, c in zip(*pools, strict=True))
        assert max_rel(got[0], got[2].double()) <= 1e-3
    return fused, ref


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: q/k/v biases, sliced per block
def test_a_k_quant_mix_decodes_through_layer_decode(tmp_path, arch) -> None:
    """Q4_K_M's layout: q, k, o and gate in Q4_K, v, up and down in Q6_K, so the fused QKV and
    gate/up are row blocks of two formats (`RowBlocks`): `layer_decode` takes them as chained
    blocks, bit-equal to the per-op path (each block's matmul, then the concatenation) at batch
    1 and 3, logits within 1e-3 of the dequantized float32 model."""
    from llm.backends.torch.weight import RowBlocks
    from llm.model.checkpoint.common import expected_tensors
    from llm.model.config import ModelConfig

    config = ModelConfig(arch=arch, vocab_size=512, hidden_size=256, intermediate_size=512,
                         num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64,
                         max_position_embeddings=128, tie_word_embeddings=True,
                         qkv_bias=arch == "qwen2")
    q4_k = gguf.GGMLQuantizationType.Q4_K
    tensors = {}
    for i, (name, shape) in enumerate(expected_tensors(config).items()):
        if len(shape) == 1:
            tensors[name] = torch.ones(shape) if name.endswith("norm.weight") else \
                0.1 * torch.randn(shape, generator=torch.Generator().manual_seed(i))
        elif name.endswith(("v_proj.weight", "up_proj.weight", "down_proj.weight")) or \
                "embed" in name:
            tensors[name] = q6k(*shape, seed=i, scale=1.0 / (1370 * shape[1] ** 0.5))
        else:  # |d * sc * q| up to ~945 d
            tensors[name] = repack_gguf(random_blocks(q4_k, *shape, seed=i,
                                                      scale=1.0 / (500 * shape[1] ** 0.5)),
                                        q4_k, shape)
    fused, _ = _layer_decode_equals_per_op(config, tensors, tmp_path)
    layer = fused.model.layers[0]
    assert isinstance(layer.attn.wqkv, RowBlocks) and isinstance(layer.mlp.gate_up, RowBlocks)
