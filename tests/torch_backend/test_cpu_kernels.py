"""The C kernels of llm/backends/torch/quant/cpu_kernels.c (built here with the machine's C
compiler) against torch: quantized matmuls against F.linear on the dequantized float32 matrix,
the fused norm / activation / decode attention against the torch backend's own modules, and the
fallback when no compiler works."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from test_quant_cpu import FORMATS, group_max

from llm.backends.torch.attention import Attention, DecodeMeta
from llm.backends.torch.kv_cache import PagedKVCache
from llm.backends.torch.norm import RMSNorm
from llm.backends.torch.quant.code_groups import to_code_groups
from llm.backends.torch.quant.cpu import prepare_cpu
from llm.backends.torch.quant.native import FLAGS, NativeKernelsUnavailable, load_kernels
from llm.backends.torch.rope import RotaryEmbedding
from llm.model.config import ModelConfig, RuntimeConfig


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    try:
        return load_kernels(tmp_path_factory.mktemp("kernels"))
    except NativeKernelsUnavailable as e:  # CI and the dev machines have gcc: this must not skip
        pytest.fail(f"the C kernels do not build here: {e}")


MAPPED = [w for w in FORMATS if to_code_groups(w) is not None]
PORTABLE = tuple("-march=x86-64-v2" if f == "-march=native" else f for f in FLAGS)


@pytest.fixture(scope="module")
def portable(tmp_path_factory):
    """The loops the compiler vectorizes itself (machines without AVX-512)."""
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("-march=x86-64-v2 is an x86-64 flag")
    return load_kernels(tmp_path_factory.mktemp("portable"), PORTABLE)


def test_every_format_maps_onto_the_kernels() -> None:
    assert {w.format for w in FORMATS} == {w.format for w in MAPPED}
    dtypes = {w.format: to_code_groups(w).scale.dtype for w in MAPPED}
    assert dtypes["q4_1"] == dtypes["q8_0"] == torch.float16  # the GGUF's float16 d and m
    assert dtypes["q4_k"] == dtypes["int8"] == dtypes["q6_k"] == torch.float32  # d * sc


@pytest.mark.parametrize("w", MAPPED, ids=lambda w: w.format)
def test_code_groups_are_the_dequantized_matrix_bit_for_bit(w) -> None:
    assert torch.equal(to_code_groups(w).dequantize(), w.dequantize(torch.float32))


@pytest.mark.parametrize("m", [1, 2, 4, 5, 16, 17, 40])  # 17, 40: dequantize + F.linear
@pytest.mark.parametrize("w", MAPPED, ids=lambda w: w.format)
def test_matmul_equals_the_dequantized_matmul(kernels, w, m) -> None:
    """Only the summation order differs: |err| <= K * 2^-24 * |x| @ |W|^T, asserted with the
    looser group-max scale of test_quant_cpu (2^-14 * B)."""
    layer = prepare_cpu(w, torch.float32, kernels=kernels)
    assert layer.kind == "native"
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, w.in_features, generator=g)
    bias = torch.randn(w.out_features, generator=g)
    dense = w.dequantize(torch.float32)
    want = F.linear(x.double(), dense.double(), bias.double())
    got = layer(x, bias)
    bound = 2.0**-14 * (x.abs() @ group_max(dense).T) + 1e-6
    assert got.shape == (m, w.out_features) and got.dtype == torch.float32
    assert ((got.double() - want).abs() <= bound).all()


@pytest.mark.parametrize("m", [1, 5])
@pytest.mark.parametrize("w", MAPPED, ids=lambda w: w.format)
def test_portable_matmul_equals_the_dequantized_matmul(portable, w, m) -> None:
    layer = prepare_cpu(w, torch.float32, kernels=portable)
    x = torch.randn(m, w.in_features, generator=torch.Generator().manual_seed(m))
    dense = w.dequantize(torch.float32)
    want = x.double() @ dense.double().T
    bound = 2.0**-14 * (x.abs() @ group_max(dense).T) + 1e-6
    assert ((layer(x).double() - want).abs() <= bound).all()


def test_odd_row_counts_and_a_lone_last_row(kernels) -> None:
    """N odd: the kernels take rows in pairs; the last one alone must not write elsewhere."""
    w = next(x for x in MAPPED if x.format == "q4_1")
    w = w.slice_rows(0, 7)
    for m in (1, 3, 6):
        x = torch.randn(m, w.in_features)
        got = prepare_cpu(w, torch.float32, kernels=kernels)(x)
        want = x.double() @ w.dequantize(torch.float32).double().T
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_add_rms_norm_and_silu_mul(kernels) -> None:
    g = torch.Generator().manual_seed(0)
    x, r, w = (torch.randn(3, 576, generator=g) for _ in range(3))
    norm = RMSNorm(w[0], 1e-5)
    out, total = kernels.add_rms_norm(x, r, w[0], 1e-5)
    ref_out, ref_total = norm.add_norm(x, r)
    assert torch.equal(total, ref_total)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    out, total = kernels.add_rms_norm(x, None, w[0], 1e-5)
    assert torch.equal(total, x)
    torch.testing.assert_close(out, norm(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("build", ["kernels", "portable"])
def test_silu_mul(request, build) -> None:
    """SiLU(gate) * up against torch, rows whose length is not a multiple of 16, and gates far
    out on both sides (exp(-|g|) never overflows)."""
    kernels = request.getfixturevalue(build)
    g = torch.Generator().manual_seed(1)
    gu = torch.randn(3, 2 * 37, generator=g) * 4  # [M, 2I], I = 37
    gu[0, :4] = torch.tensor([100.0, -100.0, 90.0, -90.0])
    want = F.silu(gu[:, :37]) * gu[:, 37:]
    torch.testing.assert_close(kernels.silu_mul(gu), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("build", ["kernels", "portable"])
@pytest.mark.parametrize("heads, kv_heads, hd, bs, positions", [
    (6, 2, 16, 8, [3, 17, 30]),  # short: one chunk of positions per user
    (10, 2, 64, 32, [0, 129, 300]),  # 5 heads per KV head (two sets), up to 3 chunks of 128
])
def test_attention_decode_equals_the_torch_path(request, build, heads, kv_heads, hd, bs,
                                                positions) -> None:
    """Three users at different positions on scattered pages, GQA: the same K/V written and the
    same attention output as Attention.decode_qkv's torch path."""
    kernels = request.getfixturevalue(build)
    hidden, kv = heads * hd, kv_heads * hd
    config = ModelConfig(arch="llama", vocab_size=32, hidden_size=hidden, intermediate_size=64,
                         num_layers=1, num_heads=heads, num_kv_heads=kv_heads, head_dim=hd,
                         max_position_embeddings=512)
    pages = -(-(max(positions) + 1) // bs)
    runtime = RuntimeConfig(max_batch=3, max_seq_len=pages * bs, block_size=bs)
    g = torch.Generator().manual_seed(0)
    w = {f"model.layers.0.self_attn.{n}_proj.weight": torch.randn(o, hidden, generator=g) * 0.1
         for n, o in (("q", hidden), ("k", kv), ("v", kv))}
    w["model.layers.0.self_attn.o_proj.weight"] = torch.randn(hidden, hidden, generator=g) * 0.1
    attn = Attention(config, w, 0)
    rope = RotaryEmbedding(config, 512, "cpu", torch.float32)
    caches = [PagedKVCache(config, runtime, "cpu", torch.float32) for _ in range(2)]
    for i, pool in enumerate((caches[0].k[0], caches[0].v[0])):  # earlier tokens in the pages
        pool.copy_(torch.randn(pool.shape, generator=g) * (1 + 3 * i))
        (caches[1].k, caches[1].v)[i][0].copy_(pool)
    blocks = caches[0].k[0].shape[0]
    page_table = torch.randperm(blocks, generator=g)[:3 * pages].reshape(3, pages)
    positions = torch.tensor(positions)
    meta = DecodeMeta.build(rope, positions, page_table, bs, int(positions.max()))
    qkv = torch.randn(3, hidden + 2 * kv, generator=g) * 2  # spread scores: exp's whole range
    want = attn.decode_qkv(qkv.clone(), meta, caches[0])
    out = kernels.attention_decode(qkv.clone(), meta.cos, meta.sin, caches[1].k[0],
                                   caches[1].v[0], page_table, positions, heads,
                                   int(positions.max()), hd ** -0.5)
    torch.testing.assert_close(F.linear(out, attn.wo), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(caches[1].k[0], caches[0].k[0], rtol=1e-6, atol=1e-6)
    assert torch.equal(caches[1].v[0], caches[0].v[0])


def test_no_compiler_is_a_clear_error_and_the_backend_falls_back(tmp_path, monkeypatch) -> None:
    from test_checkpoint import tiny_gguf
    from test_quant_loading import logits

    from llm.model.checkpoint.load import load_checkpoint

    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.raises(NativeKernelsUnavailable, match="no-such-cc"):
        load_kernels(tmp_path / "k")
    path, _ = tiny_gguf(tmp_path)
    stored = load_checkpoint(path, cache_dir=tmp_path / "s", progress=False, weights="stored")
    with pytest.warns(RuntimeWarning, match="dequantized to float32 instead"):
        got = logits(stored, [3, 1, 4])
    torch.testing.assert_close(got, logits(stored, [3, 1, 4], native=False), rtol=0, atol=0)
    assert not list((tmp_path / "k").rglob("*.tmp"))


def test_built_once_per_source_and_machine(tmp_path) -> None:
    a = load_kernels(tmp_path)
    b = load_kernels(tmp_path)
    assert a.path == b.path and a.path.parent == tmp_path / "kernels"
    assert [p.name for p in (tmp_path / "kernels").iterdir()] == [a.path.name]


def test_an_unwritable_cache_builds_in_a_temporary_folder(tmp_path) -> None:
    """A cache whose kernels folder cannot be made (here a file is in its place, as a read-only
    cache fails the same mkdir) still gets the kernels, built for this process, with a warning;
    and a killed build's leftover temporary file is removed by the next build."""
    (tmp_path / "kernels").write_text("not a folder")
    with pytest.warns(RuntimeWarning, match="building them in a temporary folder"):
        lib = load_kernels(tmp_path)
    assert lib.lib.attention_scratch(1, 1, 64, 8) > 0
    assert (tmp_path / "kernels").read_text() == "not a folder"
    fresh = tmp_path / "fresh"
    (fresh / "kernels").mkdir(parents=True)
    stale = fresh / "kernels" / "cpu_kernels-0123.abc.tmp"
    stale.write_bytes(b"")
    os.utime(stale, (1, 1))
    load_kernels(fresh)
    assert not stale.exists()


def test_a_rows_result_never_depends_on_the_batch(kernels) -> None:
    """Decode batches of 1..16 rows run the same arithmetic per row (one row: four rows of W at a
    time; more: pairs), so greedy tokens cannot depend on who else is decoding: bit-equal rows."""
    for w in (next(x for x in MAPPED if x.format == f) for f in ("q4_1", "q8_0", "q4_k")):
        layer = prepare_cpu(w, torch.float32, kernels=kernels)
        x = torch.randn(16, w.in_features, generator=torch.Generator().manual_seed(3))
        alone = torch.cat([layer(x[i:i + 1]) for i in range(16)])
        for m in (2, 3, 5, 16):
            assert torch.equal(layer(x[:m]), alone[:m]), (w.format, m)


@pytest.mark.parametrize(("arch", "qtype"), [("llama", "Q4_1"), ("qwen2", "Q8_0")])
def test_one_call_per_layer_equals_the_per_op_path(tmp_path, arch, qtype) -> None:
    """`layer_decode` (one C call per layer) runs the per-op path's functions in its order: the
    same logits bit for bit, at batch 1 and 3 (qwen2: q/k/v biases), and the same K/V written."""
    import gguf
    from test_checkpoint import tiny_gguf

    from llm.backends.torch.runner import TorchBackend
    from llm.model.checkpoint.load import load_checkpoint

    path, _ = tiny_gguf(tmp_path, arch=arch, qtype=getattr(gguf.GGMLQuantizationType, qtype))
    ck = load_checkpoint(path, cache_dir=tmp_path / "c", progress=False, weights="stored")
    runtime = RuntimeConfig(max_batch=3, max_seq_len=64, block_size=16)
    fused, per_op = (TorchBackend(ck, runtime, cache_dir=tmp_path) for _ in range(2))
    per_op.model._layer_plans = lambda cache: None
    for b in (1, 3):
        tokens, positions = torch.tensor([5, 9, 2][:b]), torch.tensor([0, 7, 19][:b])
        table = torch.arange(4 * b).view(b, 4)
        logits = [be.model.decode(tokens, positions, table, be.cache, 19) for be in (fused, per_op)]
        assert fused.model._layer_plans(fused.cache), "the fused path did not run"
        assert torch.equal(logits[0], logits[1])
        assert all(torch.equal(a, c) for a, c in zip(fused.cache.k, per_op.cache.k))


@pytest.mark.parametrize("arch", ["qwen3", "granite", "phi3", "phi4_mini"])
def test_quantized_decodes_op_by_op_with_head_norms_or_multipliers(tmp_path, arch) -> None:
    """A stored-Q8_0 Qwen3, Granite or Phi-3 (LongRoPE) GGUF on the C kernels: `layer_decode` has
    no q/k head norms, Granite's multipliers or another attention scale than 1/sqrt(head_dim),
    so the layers decode op by op (`decode_native`); Phi-4-mini's kind (partial rotation: q/k
    rows reordered in the quantized QKV, LongRoPE's factor in the tables) runs `layer_decode`.
    Prefill and decode logits follow transformers run on the same (dequantized) weights."""
    import gguf
    from hf_reference import Tolerance, assert_matches, fp32, hf_model
    from test_checkpoint import tiny_gguf

    from llm.backends.torch.runner import TorchBackend
    from llm.model.checkpoint.fused import fuse
    from llm.model.checkpoint.load import load_checkpoint

    path, _ = tiny_gguf(tmp_path, arch=arch, qtype=gguf.GGMLQuantizationType.Q8_0)
    ck = load_checkpoint(path, cache_dir=tmp_path / "c", progress=False, weights="stored")
    dense = load_checkpoint(path, cache_dir=tmp_path / "c", progress=False)
    assert {"qwen3": ck.config.qk_norm, "granite": ck.config.scaled,
            "phi3": ck.config.rope_scaling is not None,
            "phi4_mini": ck.config.partial_rotary_dim == 12}[arch]
    model = hf_model(ck.config)
    model.load_state_dict(fuse(ck.config, dense.tensors), strict=not ck.config.tie_word_embeddings)
    backend = TorchBackend(ck, RuntimeConfig(max_batch=1, max_seq_len=64, block_size=16),
                           cache_dir=tmp_path)
    m = backend.model
    assert m.cpu_kernels is not None and m.quantized
    assert (m._layer_plans(backend.cache) is None) == (arch != "phi4_mini")
    tokens = torch.randint(0, ck.config.vocab_size, (12,),
                           generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = model(tokens[None]).logits[0]  # [12, V]
    row = torch.arange(1, 5)
    prefill = m.prefill(tokens[:11], 0, row, backend.cache)  # [V], position 10
    decode = m.decode(tokens[11:], torch.tensor([11]), row[None], backend.cache, 11)[0]
    # the C matmuls apply the stored blocks to float32 activations: fp32-close (measured max
    # relative error 6e-7 prefill, 1e-6 decode). Phi-3's test models (every weight N(0, 1), no
    # q/k norm or small attention multiplier to keep the scores small) miss assert_close's atol
    # on a few near-zero logits: measured max relative error 2.5e-6 / 1.2e-5 (phi4_mini decode
    # through layer_decode), the dense torch path 2.1e-6 / 3.7e-6 on the same weights.
    tol = fp32(0.9999) if arch in ("qwen3", "granite") else Tolerance(0.9999, max_rel=5e-5,
                                                                        gain=1e-5)
    for what, ours, want in (("prefill", prefill, ref[10]), ("decode", decode, ref[11])):
        assert_matches(ours, want, tol, what)
