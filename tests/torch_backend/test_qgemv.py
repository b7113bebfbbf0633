"""Quantized small-batch GEMV (kernels/qgemv.py) against x @ dequantize(W).T, every format.

Small shapes run everywhere (Triton's interpreter on the CPU); Llama-3.1-8B shapes and the
bandwidth table only on a GPU (`pytest -s` prints the table).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed")
from llm.backends.torch.kernels.dequant import dequantize_dense  # noqa: E402
from llm.backends.torch.kernels.qgemv import (  # noqa: E402
    MAX_M,
    qgemm_tc,
    qgemv,
    qgemv_silu_mul,
    tc_kernel_runs,
    words_kernel_runs,
)
from llm.backends.torch.kernels.qgemv_config import (  # noqa: E402
    QGemvConfig,
    QGemvWConfig,
    qgemv_config,
    qgemv_w_config,
    words_rows_max,
)
from llm.backends.torch.kernels.qgemv_words import qgemv_words  # noqa: E402
from llm.model.quant import QuantizedTensor, get_format, quantize_int4, quantize_int8  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GGML = ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k"]
INT = ["int8", "int4_g128", "int4_g32"]
# (N, K, config): N odd (never a multiple of BLOCK_N); K a multiple of the format's block but
# not of BLOCK_K, so the last chunk is partial; int8 (block 1) gets K = 100. Few programs and
# chunks: the interpreter's time grows with both.
SMALL = {"legacy": (13, 160, QGemvConfig(8, 64)),
         "k": (11, 768, QGemvConfig(8, 512)),
         "int8": (9, 100, QGemvConfig(8, 64))}


def random_quantized(fmt: str, n: int, k: int, g: torch.Generator,
                     device: str = DEVICE) -> QuantizedTensor:
    """Random planes (any code bits; finite scales) for a GGUF format, or our quantizers' output
    for random weights."""
    if fmt in INT or fmt.startswith("int4_g"):  # our quantizers' output, any group size
        w = torch.randn(n, k, generator=g) * 0.05
        q = quantize_int8(w) if fmt == "int8" else quantize_int4(w, int(fmt[len("int4_g"):]))
        return q.to(device)
    planes = {}
    for p in get_format(fmt).planes:
        shape = (n, p.width(k))
        if p.dtype == torch.float16:
            planes[p.name] = (torch.randn(shape, generator=g) * 0.01).half()
        else:
            bits = torch.randint(0, 256, shape, generator=g, dtype=torch.int32)
            if p.name in ("scales", "mins") and p.dtype == torch.uint8:
                bits &= 63  # Q4_K / Q5_K 6-bit sub-block scales
            planes[p.name] = bits.to(torch.uint8).view(p.dtype)
    return QuantizedTensor(fmt, (n, k), planes).to(device)


def _ref(x: torch.Tensor, w: QuantizedTensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ dequantize(w).T (+ bias) in float64 from the fp32 weights (exact products)."""
    y = x.double() @ w.dequantize(torch.float32).double().T
    return y if bias is None else y + bias.double()


def _assert_close(out: torch.Tensor, ref: torch.Tensor, x: torch.Tensor) -> None:
    assert out.dtype == x.dtype and out.shape == ref.shape
    assert torch.isfinite(out).all()
    err = (out.double() - ref).norm() / ref.norm()
    assert err < (1e-5 if x.dtype == torch.float32 else 8e-3), err


def _shape(fmt: str) -> tuple[int, int, QGemvConfig]:
    if fmt == "int8":
        return SMALL["int8"]
    if fmt.endswith("_k") or fmt == "int4_g128":
        return SMALL["k"]
    return SMALL["legacy"]


@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("fmt", GGML + INT)
def test_qgemv_matches_the_dequantized_matmul(fmt: str, m: int) -> None:
    g = torch.Generator().manual_seed(m * 100 + len(fmt))
    n, k, cfg = _shape(fmt)
    w = random_quantized(fmt, n, k, g)
    x = torch.randn(m, k, generator=g).to(DEVICE)
    bias = torch.randn(n, generator=g).to(DEVICE) if m != 3 else None
    _assert_close(qgemv(x, w, bias, config=cfg), _ref(x, w, bias), x)
    if m != 3:  # the default config too (one row; 16 rows: 8 x 64 blocks)
        _assert_close(qgemv(x, w, bias), _ref(x, w, bias), x)


@pytest.mark.parametrize("fmt", GGML + INT)
def test_one_hot_rows_read_back_the_exact_weights(fmt: str) -> None:
    """x = unit rows e_k: y[:, n] = w[n, k] exactly, so the kernel's weights are ggml's bits."""
    g = torch.Generator().manual_seed(7)
    n, k, cfg = _shape(fmt)
    w = random_quantized(fmt, n, k, g)
    cols = torch.randperm(k, generator=g)[:MAX_M]
    x = torch.zeros(MAX_M, k).index_put_((torch.arange(MAX_M), cols), torch.tensor(1.0))
    y = qgemv(x.to(DEVICE), w, config=cfg)
    assert torch.equal(y.T.cpu(), w.dequantize(torch.float32)[:, cols].cpu())


def test_half_precision_activations() -> None:
    g = torch.Generator().manual_seed(3)
    w = random_quantized("q4_k", 11, 768, g)
    for dtype in (torch.bfloat16, torch.float16):
        x = torch.randn(3, 768, generator=g).to(DEVICE, dtype)
        _assert_close(qgemv(x, w, config=QGemvConfig(8, 256)), _ref(x, w, None), x)


def test_cpu_fallback_is_the_reference(monkeypatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    g = torch.Generator().manual_seed(4)
    w = random_quantized("q6_k", 5, 256, g, device="cpu")
    x = torch.randn(2, 256, generator=g)
    assert torch.equal(qgemv(x, w), x @ w.dequantize().T)


@pytest.mark.parametrize("fmt", GGML + INT)
def test_dequantize_dense_equals_dequantize_then_cast(fmt: str) -> None:
    """The prompt path's dense copy (kernels/dequant.py) is dequantize(float32).to(dtype) bit for
    bit: N odd, K not a multiple of the kernel's 256 columns where the format allows."""
    g = torch.Generator().manual_seed(len(fmt))
    n, k, _ = _shape(fmt)
    w = random_quantized(fmt, n, k, g)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        out = dequantize_dense(w, dtype)
        assert out.dtype == dtype and out.is_contiguous()
        assert torch.equal(out, w.dequantize(torch.float32).to(dtype))


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q4_k", "q6_k", "int4_g32"])
def test_dequantize_dense_rows_is_an_embedding_lookup(fmt: str) -> None:
    """rows=: the listed rows only (repeats, any order), equal to take_rows then dequantize; the
    quantized embedding's lookup on CUDA (QuantLinear.rows) is this one launch."""
    g = torch.Generator().manual_seed(len(fmt) + 1)
    n, k, _ = _shape(fmt)
    w = random_quantized(fmt, n, k, g)
    rows = torch.tensor([n - 1, 0, 3, 3, n // 2], device=DEVICE)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        out = dequantize_dense(w, dtype, rows=rows)
        assert out.shape == (5, k) and out.dtype == dtype
        assert torch.equal(out, w.take_rows(rows).dequantize(torch.float32).to(dtype))


def test_rejects_what_it_cannot_compute() -> None:
    g = torch.Generator().manual_seed(5)
    w = random_quantized("q4_0", 4, 64, g)
    with pytest.raises(ValueError, match="at most 16"):
        qgemv(torch.randn(MAX_M + 1, 64).to(DEVICE), w)
    with pytest.raises(ValueError, match=r"x \[M, 64\]"):
        qgemv(torch.randn(2, 32).to(DEVICE), w)


def test_config_keeps_the_accumulator_bounded() -> None:
    assert qgemv_config(1, 4096, 4096) == QGemvConfig(2, 1024)
    assert qgemv_config(8, 4096, 4096) == QGemvConfig(8, 128)
    for m in range(1, MAX_M + 1):
        cfg = qgemv_config(m, 4096, 4096)
        assert cfg.block_k % 32 == 0 and triton_pow2(m) * cfg.block_n * cfg.block_k // 2 <= 4096
    assert qgemv_config(1, 8, 64).block_k == 64


def triton_pow2(m: int) -> int:
    return 1 << (m - 1).bit_length()


# v2 kernels (bf16 / fp16 activations): the one-row kernel on whole 32-groups and the
# tensor-core kernel for batches; formats they implement
V2 = ["q8_0", "q4_0", "q4_1", "q4_k", "int4_g128", "int8"]  # the tensor-core kernel's too
WORDS = V2 + ["q5_0", "q5_1", "q5_k"]  # the v2 one-row kernel's (and Q6_K: test_qgemv_q6k.py)


def _v2_shape(fmt: str) -> tuple[int, int]:
    # N odd; K = 5 or 3 chunks of the configs below, plus a partial one where the format allows
    return (11, 768) if fmt in ("q4_k", "q5_k", "int4_g128") else (13, 160)


@pytest.mark.parametrize("magic, prefetch, stages", [(False, False, 1), (True, False, 1),
                                                     (True, True, 1), (True, False, 3)])
@pytest.mark.parametrize("fmt", WORDS)
def test_one_row_kernel_matches_the_dequantized_matmul(fmt: str, magic: bool, prefetch: bool,
                                                       stages: int) -> None:
    g = torch.Generator().manual_seed(11 + len(fmt))
    n, k = _v2_shape(fmt)
    w = random_quantized(fmt, n, k, g)
    for dtype, bias in ((torch.bfloat16, None), (torch.float16, torch.randn(n, generator=g))):
        x = torch.randn(1, k, generator=g).to(DEVICE, dtype)
        b = None if bias is None else bias.to(DEVICE)
        assert words_kernel_runs(x, w)
        # 4 groups per chunk: K = 160 leaves a partial chunk, 768 none (2 and 6 chunks, so the
        # prefetch loop's last load is past K); 8 rows: N = 11 and 13 leave a partial program
        cfg = QGemvWConfig(8, 4, 4, num_stages=stages, magic=magic, prefetch=prefetch)
        _assert_close(qgemv(x, w, b, config=cfg), _ref(x, w, b), x)
    _assert_close(qgemv(x, w, b), _ref(x, w, b), x)  # the default config, picked by qgemv


@pytest.mark.parametrize("fmt", ["q8_0", "int8"])
def test_eight_bit_offset_codes_agree_with_the_unbiased_codes(fmt: str) -> None:
    """`magic` for 8-bit codes (2^15 + 128 + c, exact, times x exact; the offset taken off each
    group's sum once): the offset's cancellation costs ~8 bits of the float32 group sums, an
    error of 2e-5 (Q8_0's uniform random codes) to 1.5e-4 (int8's quantized Gaussian rows,
    smaller codes) of the output's norm over K = 1,024 (a few fp16 units in the last place of
    the outputs near zero), and both stay as close to the float64 product as fp16 allows."""
    g = torch.Generator().manual_seed(5)
    n, k = 64, 1024
    w = random_quantized(fmt, n, k, g)
    x = torch.randn(1, k, generator=g).to(DEVICE, torch.float16)
    plain = qgemv(x, w, config=QGemvWConfig(8, 8, 4))
    magic = qgemv(x, w, config=QGemvWConfig(8, 8, 4, magic=True))
    assert (magic.float() - plain.float()).norm() / plain.float().norm() < 3e-4
    ref = _ref(x, w, None)
    for y in (plain, magic):
        assert (y.double() - ref).norm() / ref.norm() < 6e-4  # fp16 rounding: ~3e-4


@pytest.mark.filterwarnings("ignore:overflow encountered")  # the interpreter's silu
@pytest.mark.parametrize("fmt", WORDS + ["q6_k"])
def test_row_tiles_of_one_program_equal_one_tile_programs(fmt: str) -> None:
    """`tiles` > 1 (a program walks several row tiles, x read once): bit-equal to the one-tile
    launch of the same block shape, with and without the prefetch, for 1 and 2 rows of x, with
    bias and with SiLU*up; the last program's tiles partly or wholly past N."""
    g = torch.Generator().manual_seed(41 + len(fmt))
    n, k = _v2_shape(fmt) if fmt != "q6_k" else (11, 512)
    block_g = triton.next_power_of_2(k // 32)  # K in one chunk (a masked partial one at 160)
    w = random_quantized(fmt, 2 * n, k, g)
    x = torch.randn(2, k, generator=g).to(DEVICE, torch.float16)
    bias = torch.randn(2 * n, generator=g).to(DEVICE, torch.float16)
    for prefetch in (False, True):
        one = QGemvWConfig(4, block_g, 4, magic=fmt != "q8_0", prefetch=prefetch)
        for tiles in (2, 3):  # 2n = 22 or 26 rows: 6 or 7 tiles of 4
            cfg = replace(one, tiles=tiles)
            for m in (1, 2):
                assert torch.equal(qgemv_words(x[:m], w, bias, cfg),
                                   qgemv_words(x[:m], w, bias, one))
            if fmt != "q6_k":  # its random planes' products overflow fp16 in silu
                assert torch.equal(qgemv_words(x[:1], w, None, cfg, glu=True),
                                   qgemv_words(x[:1], w, None, one, glu=True))
    _assert_close(qgemv_words(x[:1], w, bias, replace(one, tiles=2)), _ref(x[:1], w, bias), x)


def test_row_tiles_need_k_in_one_chunk() -> None:
    w = random_quantized("q4_0", 8, 256, torch.Generator().manual_seed(0))
    x = torch.randn(1, 256).to(DEVICE, torch.bfloat16)
    with pytest.raises(ValueError, match="K in one chunk"):
        qgemv_words(x, w, config=QGemvWConfig(4, 4, 4, tiles=2))
    with pytest.raises(ValueError, match="at least one row tile"):
        QGemvWConfig(4, 4, 4, tiles=0)


def test_a_config_loads_ahead_one_way_only() -> None:
    with pytest.raises(ValueError, match="prefetch or num_stages > 1, not both"):
        QGemvWConfig(8, 4, 4, num_stages=3, prefetch=True)


def _silu_mul_ref(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """silu(gate) * up of the exact product y [M, 2I] (float64), rounded as F.linear's output
    and then as kernels/silu_mul.py rounds."""
    gate, up = y.to(dtype).float().chunk(2, dim=1)
    act = torch.nn.functional.silu(gate).to(dtype).float()
    return (act * up).to(dtype).double()


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # the interpreter's silu
@pytest.mark.parametrize("fmt", WORDS)
def test_one_row_kernel_fuses_silu_mul(fmt: str) -> None:
    """The activation in the v2 kernel's epilogue: bit-equal to `silu_mul` after the unfused
    kernel with the same config (the same per-row sums), close to the float64 reference."""
    from llm.backends.torch.kernels.silu_mul import silu_mul

    g = torch.Generator().manual_seed(23 + len(fmt))
    n, k = _v2_shape(fmt)
    w = random_quantized(fmt, 2 * n, k, g)  # I = n: odd, a partial last program
    # Q5_K's random planes (codes up to 31) give products that overflow fp16 in silu * up at
    # unit-variance x (so in test_rows_of_one_launch_match_the_dequantized_matmul)
    scale = 0.25 if fmt == "q5_k" else 1.0
    for dtype, bias in ((torch.bfloat16, None), (torch.float16, torch.randn(2 * n, generator=g))):
        x = (torch.randn(1, k, generator=g) * scale).to(DEVICE, dtype)
        b = None if bias is None else bias.to(DEVICE)
        for prefetch in (False, True):
            cfg = QGemvWConfig(8, 4, 4, magic=True, prefetch=prefetch)
            fused = qgemv_silu_mul(x, w, b, config=cfg)
            assert fused.shape == (1, n)
            assert torch.equal(fused, silu_mul(qgemv(x, w, b, config=cfg)))
    # against float64, in fp16 (bf16's four roundings, each up to 2^-9, compound through silu's
    # slope to a few % per element: there the bit-equality above is the check)
    _assert_close(qgemv_silu_mul(x, w, b), _silu_mul_ref(_ref(x, w, b), torch.float16), x)
    x3 = (torch.randn(3, k, generator=g) * scale).to(DEVICE, torch.float16)  # several rows
    _assert_close(qgemv_silu_mul(x3, w), _silu_mul_ref(_ref(x3, w, None), torch.float16), x3)


@pytest.mark.parametrize("magic", [False, True])
@pytest.mark.parametrize("fmt", WORDS)
def test_one_row_kernel_reads_back_the_exact_weights(fmt: str, magic: bool) -> None:
    """x = a unit row e_k in fp16 (exact, and so is the fp16 output of any weight of these
    random planes' range): y[n] = w[n, k] as ggml dequantizes it, rounded once to fp16."""
    g = torch.Generator().manual_seed(17)
    n, k = _v2_shape(fmt)
    w = random_quantized(fmt, n, k, g)
    ref = w.dequantize(torch.float32)
    for col in torch.randperm(k, generator=g)[:4].tolist():
        x = torch.zeros(1, k).index_fill_(1, torch.tensor([col]), 1.0).to(DEVICE, torch.float16)
        y = qgemv(x, w, config=QGemvWConfig(8, 4, 4, magic=magic))
        assert torch.equal(y[0].cpu(), ref[:, col].half().cpu())


@pytest.mark.filterwarnings("ignore:overflow encountered")  # the interpreter's silu
@pytest.mark.parametrize("fmt", WORDS + ["q6_k"])
def test_rows_of_one_launch_match_the_dequantized_matmul(fmt: str) -> None:
    """The v2 kernel with 2..4 rows of x in one launch (codes decoded once for all rows), with
    bias, with SiLU*up in its epilogue, prefetching or not: each row as close to the float64
    reference as one-row launches are, and the rows of a launch independent of each other."""
    g = torch.Generator().manual_seed(31 + len(fmt))
    n, k = _v2_shape(fmt) if fmt != "q6_k" else (11, 512)
    w = random_quantized(fmt, 2 * n, k, g)
    # Q5_K: see test_one_row_kernel_fuses_silu_mul
    x = (torch.randn(4, k, generator=g) * (0.25 if fmt == "q5_k" else 1.0)).to(DEVICE,
                                                                               torch.float16)
    bias = torch.randn(2 * n, generator=g).to(DEVICE)
    ref = _ref(x, w, bias)
    for cfg in (QGemvWConfig(8, 4, 4, magic=True, prefetch=True), QGemvWConfig(4, 4, 4)):
        for m in (2, 3, 4):
            y = qgemv_words(x[:m], w, bias, cfg)
            _assert_close(y, ref[:m], x)
            assert torch.equal(qgemv_words(x[[0, m - 1]], w, bias, cfg)[1], y[m - 1])
            if fmt != "q6_k":  # its random planes' products overflow fp16 in silu
                _assert_close(qgemv_words(x[:m], w, bias, cfg, glu=True),
                              _silu_mul_ref(ref[:m], torch.float16), x)
    xb = x.bfloat16()
    _assert_close(qgemv(xb, w, bias), _ref(xb, w, bias), xb)  # picked by qgemv, default config
    x7 = xb.repeat(2, 1)[:7]  # more rows than one launch takes
    _assert_close(qgemv_words(x7, w, bias), _ref(x7, w, bias), x7)


def test_batches_up_to_the_limit_take_the_v2_kernel(monkeypatch) -> None:
    """`qgemv` sends up to `words_rows_max` rows of bf16 x to the v2 kernel in one launch, more
    to the tensor-core kernel (where it runs) or the first kernel."""
    from llm.backends.torch.kernels import qgemv as module

    calls = []
    monkeypatch.setattr(module, "qgemv_words",
                        lambda x, *a, **kw: calls.append(x.shape[0]) or torch.zeros(1))
    g = torch.Generator().manual_seed(3)
    for fmt in ("q4_0", "q8_0"):
        calls.clear()
        w = random_quantized(fmt, 13, 160, g)
        for m in range(1, words_rows_max(fmt) + 2):
            qgemv(torch.randn(m, 160, generator=g).to(DEVICE, torch.bfloat16), w)
        assert calls == list(range(1, words_rows_max(fmt) + 1))


@pytest.mark.parametrize("m", [2, 16])
@pytest.mark.parametrize("fmt", V2)
def test_tensor_core_kernel_matches_the_dequantized_matmul(fmt: str, m: int) -> None:
    g = torch.Generator().manual_seed(m + len(fmt))
    n, k = _v2_shape(fmt)
    w = random_quantized(fmt, n, k, g)
    x = torch.randn(m, k, generator=g).to(DEVICE, torch.bfloat16)
    bias = torch.randn(n, generator=g).to(DEVICE) if m == 2 else None
    assert tc_kernel_runs(x, w)
    _assert_close(qgemm_tc(x, w, bias, block_n=16, num_warps=1), _ref(x, w, bias), x)
    _assert_close(qgemv(x, w, bias), _ref(x, w, bias), x)  # picked by qgemv (or the first)


def test_v2_kernels_are_picked_for_half_precision_only() -> None:
    g = torch.Generator().manual_seed(19)
    w = random_quantized("q4_0", 4, 64, g)
    x = torch.randn(1, 64).to(DEVICE)
    assert not words_kernel_runs(x, w) and not tc_kernel_runs(x, w)  # fp32: the first kernel
    int8 = random_quantized("int8", 4, 64, g)  # since 2026-12-07, K of whole 32-groups
    assert words_kernel_runs(x.bfloat16(), int8) and tc_kernel_runs(x.bfloat16(), int8)
    odd = random_quantized("int8", 4, 100, g)  # int8's K need not be: the first kernel
    assert not words_kernel_runs(x.new_zeros(1, 100).bfloat16(), odd)
    for fmt in ("q5_0", "q5_1", "q5_k", "q6_k"):  # the 5- and 6-bit formats: since 2026-12-05
        assert words_kernel_runs(x.bfloat16(), random_quantized(fmt, 4, 256, g))
    assert not tc_kernel_runs(x.half(), w)  # the tensor-core kernel takes bf16 only
    assert qgemv_w_config(1, 14336, 4096, "q4_0") == QGemvWConfig(8, 128, 4, magic=True,
                                                                  prefetch=True)
    # K = 14336: 448 groups, 7 whole chunks of 64
    assert qgemv_w_config(1, 4096, 14336, "q4_0") == QGemvWConfig(4, 64, 4, magic=True,
                                                                  prefetch=True)
    assert qgemv_w_config(1, 4096, 4096, "q8_0") == QGemvWConfig(4, 128, 4)
    assert qgemv_w_config(1, 4096, 14336, "q8_0") == QGemvWConfig(4, 64, 4, prefetch=True)
    assert qgemv_w_config(1, 3072, 2048, "q8_0") == QGemvWConfig(8, 64, 4, prefetch=True)
    assert qgemv_w_config(1, 16384, 2048, "q4_0").block_n == 16
    # Q4_0 one-chunk K = 4096 with many rows (8B gate_up): 2 row tiles a program; not at 2 rows,
    # not Q8_0, not the smaller matrices, not K = 2048
    assert qgemv_w_config(1, 28672, 4096, "q4_0") == QGemvWConfig(8, 128, 4, magic=True,
                                                                  prefetch=True, tiles=2)
    assert qgemv_w_config(2, 28672, 4096, "q4_0").tiles == 1
    assert qgemv_w_config(1, 28672, 4096, "q8_0").tiles == 1
    assert qgemv_w_config(1, 16384, 2048, "q4_0").tiles == 1
    assert qgemv_w_config(1, 64, 3200, "q4_0").block_g == 128  # 100 groups: no small divisor
    assert qgemv_w_config(1, 64, 64, "q4_0").block_g == 2


GPU = pytest.mark.skipif(DEVICE == "cpu", reason="Llama-3.1-8B shapes and timings need a GPU")
SHAPES_8B = [(4096, 4096), (14336, 4096), (4096, 14336)]  # o_proj, gate or up, down


@GPU
@pytest.mark.parametrize("fmt", ["q4_0", "q4_k", "q5_0", "q5_k", "q6_k", "q8_0", "int4_g128",
                                 "int8"])
@pytest.mark.parametrize("n, k", SHAPES_8B[:2])
def test_llama_8b_shapes(fmt: str, n: int, k: int) -> None:
    g = torch.Generator().manual_seed(n + k)
    w = random_quantized(fmt, n, k, g)
    for m in (1, 8):
        x = torch.randn(m, k, generator=g).to(DEVICE, torch.bfloat16)
        _assert_close(qgemv(x, w), _ref(x, w, None), x)


def _graph_us(calls: list, reps: int = 25) -> float:
    """Median microseconds per call of `calls` replayed as one CUDA graph (after a warm-up)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return 1000 * sorted(times)[reps // 2] / len(calls)


def _copies(w, nbytes: int) -> list:
    """w and distinct copies of it, together well over the L2 (so every call reads HBM)."""
    def clone(w):
        if isinstance(w, torch.Tensor):
            return w.clone()
        return QuantizedTensor(w.format, w.shape, {p: t.clone() for p, t in w.planes.items()})

    return [w] + [clone(w) for _ in range(max(1, -(-512 * 2**20 // nbytes)) - 1)]


def _copy_gbps() -> float:
    src = torch.randint(0, 255, (2**31,), dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    _graph_us([lambda: dst.copy_(src)] * 4, reps=5)  # clocks up
    us = _graph_us([lambda: dst.copy_(src)] * 4, reps=10)
    return 2 * src.numel() / us / 1e3  # bytes read + written


def _row(rows: list, line: str) -> None:
    """Keep a table row and print it at once (a run cut short still shows what it measured)."""
    rows.append(line)
    print(line, flush=True)


@GPU
def test_h200_bandwidth_table() -> None:
    """Prints us per call, GB/s of packed weight bytes, % of the copy bandwidth, and the bf16
    F.linear of the same shape (run with -s)."""
    from llm.backends.torch.kernels.gemv import gemv

    copy = _copy_gbps()
    rows = [f"copy bandwidth {copy:.0f} GB/s (read + write); {torch.cuda.get_device_name()}"]
    print(rows[0], flush=True)
    g = torch.Generator().manual_seed(0)
    for n, k in SHAPES_8B:
        wf = _copies(torch.randn(n, k, device=DEVICE, dtype=torch.bfloat16) * 0.02, n * k * 2)
        bf = {m: torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16) for m in (1, 8)}
        lin = {m: _graph_us([lambda w=w, x=bf[m]: torch.nn.functional.linear(x, w) for w in wf])
               for m in (1, 8)}
        eng = _graph_us([lambda w=w, x=bf[1]: gemv(x, w) for w in wf])
        _row(rows, f"bf16 {n}x{k}: F.linear B=1 {lin[1]:.1f} us B=8 {lin[8]:.1f} us, "
                    f"engine gemv B=1 {eng:.1f} us ({n * k * 2 / eng / 1e3:.0f} GB/s)")
        for fmt in ("q4_0", "q4_k", "q6_k", "q8_0", "int4_g128", "int8"):
            w0 = random_quantized(fmt, n, k, g)
            ws = _copies(w0, w0.nbytes)
            for m in (1, 8):
                us = _graph_us([lambda w=w, x=bf[m]: qgemv(x, w) for w in ws])
                gbps = w0.nbytes / us / 1e3
                _row(rows, f"{fmt:9s} {n:5d}x{k:5d} B={m}: {us:7.1f} us {gbps:6.0f} GB/s "
                     f"{100 * gbps / copy:4.0f}% of copy, bf16 F.linear {lin[m]:.1f} us "
                     f"({lin[m] / us:.2f}x)")
    print("\n" + "\n".join(rows))  # the table again, last


def test_words_kernel_takes_x_at_an_unaligned_offset() -> None:
    """x contiguous but starting one element into its storage (not on an 8-byte word): the
    kernel reads it as 64-bit words, so it is copied to an aligned buffer first (it raised)."""
    g = torch.Generator().manual_seed(3)
    w = random_quantized("q4_0", 32, 64, g)
    flat = torch.randn(65, generator=g).to(DEVICE, torch.bfloat16)
    x = flat[1:].view(1, 64)  # storage offset 1: contiguous, not word-aligned
    assert x.is_contiguous() and x.storage_offset() == 1
    assert torch.equal(qgemv_words(x, w), qgemv_words(x.clone(), w))
