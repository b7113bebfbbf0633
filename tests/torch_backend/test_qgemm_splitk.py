"""Split-K of the tensor-core quantized GEMM (kernels/qgemm_tc.py, kernels/splitk.py) against
dequantize-then-matmul in float32, every format the kernel computes; the fixed-order sum (the same
bits on every call, at every batch), the tile counters left at zero, and the rule that picks the
split (kernels/qgemv_config.py).

Small shapes run everywhere (Triton's interpreter on the CPU); CUDA graphs, many calls racing to
finish last, and Llama-3.1-8B shapes only on a GPU.
"""

from __future__ import annotations

import re

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")
from test_qgemv import DEVICE, random_quantized  # noqa: E402
from uninterpreted import call_uninterpreted  # noqa: E402

from llm.backends.torch.kernels import qgemv as qgemv_module  # noqa: E402
from llm.backends.torch.kernels.qgemm_tc import q5_permutes, qgemm_tc  # noqa: E402
from llm.backends.torch.kernels.qgemv_config import (  # noqa: E402
    TC_RULE,
    QGemmTcConfig,
    QGemmTcRule,
    qgemm_tc_config,
    words_rows_max,
)
from llm.backends.torch.kernels.splitk import _counters, split_groups  # noqa: E402
from llm.model.quant import QuantizedTensor  # noqa: E402

# every format the tensor-core kernel computes (qgemv picks it for Q8_0, Q4_0, Q4_1 and Q4_K)
FORMATS = ["q8_0", "q4_0", "q4_1", "q4_k", "int4_g128", "int4_g64", "int4_g32", "q5_0", "q5_1",
           "q5_k", "q6_k"]
SPLITS = [1, 2, 3, 7]


def _shape(fmt: str) -> tuple[int, int]:
    """N odd (two 16-row tiles, the second partial); K of 22 groups (the K-quants, int4_g128 and
    int4_g64: 40, whole 256-column blocks), so that 2, 3 and 7 splits leave a last split shorter
    than the others, or a split whose groups are not a multiple of the kernel's 4-group step."""
    return (21, 1280) if fmt in ("q4_k", "q5_k", "q6_k", "int4_g128", "int4_g64") else (21, 704)


def _ref32(x: torch.Tensor, w: QuantizedTensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Dequantize-then-matmul in float32."""
    return torch.nn.functional.linear(x.float(), w.dequantize(torch.float32),
                                      None if bias is None else bias.float())


def _max_rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref).abs().max() / ref.abs().max())


def _assert_rounded(y: torch.Tensor, y32: torch.Tensor) -> None:
    """y (bf16) is the float32 result y32 rounded once: to nearest compiled; the interpreter's
    cast truncates, so there within one bf16 step (2^-7 of the value) towards zero."""
    if y.is_cuda:
        assert torch.equal(y, y32.to(torch.bfloat16))
    else:
        assert ((y.float() - y32).abs() <= y32.abs() * 2**-7).all()
        assert (y.float().abs() <= y32.abs()).all()


def _tc(x, w, bias=None, split_k=1, out_dtype=None) -> torch.Tensor:
    return qgemm_tc(x, w, bias, block_n=16, num_warps=1, split_k=split_k, out_dtype=out_dtype)


def test_split_groups() -> None:
    assert split_groups(128, 4) == (32, 4)
    assert split_groups(448, 8) == (56, 8)
    assert split_groups(22, 3) == (8, 3)  # 8, 8, 6
    assert split_groups(22, 7) == (4, 6)  # 4 groups a split at least: 6 splits
    assert split_groups(40, 3) == (16, 3)  # 16, 16, 8
    assert split_groups(3, 4) == (4, 1)
    assert split_groups(128, 1) == (128, 1)
    with pytest.raises(ValueError, match="split_k"):
        split_groups(128, 0)


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_split_k_matches_the_dequantized_matmul(fmt: str, split: int) -> None:
    """Max relative error <= 1e-3 (issue 15) of the float32 result; the bf16 result is that
    float32 result rounded once (`_assert_rounded`); a second call gives the same bits."""
    g = torch.Generator().manual_seed(len(fmt) * 10 + split)
    n, k = _shape(fmt)
    w = random_quantized(fmt, n, k, g)
    assert split_groups(k // 32, split)[1] == min(split, 6 if k == 704 else 5)
    for m in (5, 16):  # (2 rows: test_rows_do_not_depend_on_the_batch)
        x = torch.randn(m, k, generator=g).to(DEVICE, torch.bfloat16)
        bias = torch.randn(n, generator=g).to(DEVICE) if m == 5 else None
        y32 = _tc(x, w, bias, split, torch.float32)
        assert y32.dtype == torch.float32 and y32.shape == (m, n)
        assert _max_rel(y32, _ref32(x, w, bias)) <= 1e-3
        y = _tc(x, w, bias, split)
        assert y.dtype == torch.bfloat16
        _assert_rounded(y, y32)
        assert torch.equal(_tc(x, w, bias, split), y)  # deterministic, counters reset
        if DEVICE != "cpu" and fmt.startswith("q5"):  # the engine's launch: Q5 by `_tc_q5`
            assert q5_permutes(64, 4, True, True) and not q5_permutes(16, 1, True, True)
            y64 = qgemm_tc(x, w, bias, split_k=split, out_dtype=torch.float32)
            assert _max_rel(y64, _ref32(x, w, bias)) <= 1e-3
    assert not _counters(y.device).any()


def test_rows_do_not_depend_on_the_batch() -> None:
    """x pads to 16 rows and the split is not a function of the batch: a row's bits are the
    same alone, in 2 rows and in 16."""
    g = torch.Generator().manual_seed(31)
    w = random_quantized("q4_0", 21, 704, g)
    x = torch.randn(16, 704, generator=g).to(DEVICE, torch.bfloat16)
    full = _tc(x, w, split_k=3)
    assert torch.equal(_tc(x[:2], w, split_k=3), full[:2])
    assert torch.equal(_tc(x[5:12], w, split_k=3), full[5:12])
    cfgs = {qgemm_tc_config(m, 6144, 4096, QGemmTcRule(programs=264)) for m in range(2, 17)}
    assert len(cfgs) == 1


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q4_1", "q4_k"])
def test_qgemv_launches_the_configured_split(fmt: str, monkeypatch) -> None:
    """qgemv (the model's entry point) runs the split its config rule gives (for more rows than
    it sends to the v2 kernel), for every format it picks the kernel for (`TC_PICKED`)."""
    g = torch.Generator().manual_seed(37)
    n, k = _shape(fmt)
    w = random_quantized(fmt, n, k, g)
    x = torch.randn(words_rows_max(fmt) + 1, k, generator=g).to(DEVICE, torch.bfloat16)
    rule = QGemmTcRule(16, 1, 3, split_k=3)
    monkeypatch.setattr(qgemv_module, "qgemm_tc_config",
                        lambda m, n, k: qgemm_tc_config(m, n, k, rule))
    launches = []

    def spy(*args, **kwargs):
        launches.append((args[3:6], kwargs["split_k"]))
        return qgemm_tc(*args, **kwargs)

    monkeypatch.setattr(qgemv_module, "qgemm_tc", spy)
    out = qgemv_module.qgemv(x, w)
    assert launches == [((16, 1, 3), 3)]
    assert torch.equal(out, _tc(x, w, split_k=3))


def test_rule_fills_the_grid_of_the_8b_shapes() -> None:
    """programs=264 (2x the H200's 132 SMs), 64-row tiles: K halved until the grid has 264
    programs, never below 16 groups a split."""
    rule = QGemmTcRule(64, 4, 3, programs=264)
    shapes = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096),
              "down": (4096, 14336), "head_chunk": (16384, 4096)}
    assert {s: rule.split_for(n, k) for s, (n, k) in shapes.items()} == {
        "qkv": 4, "o": 8, "gate_up": 1, "down": 8, "head_chunk": 2}
    assert rule.split_for(4096, 512) == 1  # 16 groups: no split leaves 16 in each
    assert QGemmTcRule(split_k=4).split_for(28672, 4096) == 4  # fixed
    assert qgemm_tc_config(16, 4096, 4096, rule) == QGemmTcConfig(64, 4, 3, 8)
    # the default, from the H200 runs (qgemv_config): the grid filled to 528 programs
    assert {s: TC_RULE.split_for(n, k) for s, (n, k) in shapes.items()} == {
        "qkv": 8, "o": 8, "gate_up": 2, "down": 16, "head_chunk": 4}
    assert qgemm_tc_config(16, 4096, 14336) == QGemmTcConfig(64, 4, 3, 16)


def hopper_ptx_of_the_split_kernel() -> dict:
    """Compile the kernel with 4 splits and PDL for sm_90 (no GPU needed; with Triton's
    interpreter off) -> PTX facts, in instruction order, of the split-K epilogue."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from llm.backends.torch.kernels.qgemm_tc import _qgemm_tc_kernel as kernel

    constexprs = dict(K=4096, FMT=1, GS=32, BLOCK_M=16, BLOCK_N=64, SPLITS=4, SPLIT_G=32,
                      FAST=True, HAS_BIAS=False, COMPILED=True, USE_GDC=True)
    types = {"x_ptr": "*bf16", "y_ptr": "*bf16", "b_ptr": "*bf16", "qs_ptr": "*u8", "qh_ptr": "*u8",
             "d_ptr": "*fp16", "m_ptr": "*fp16", "sc_ptr": "*u8", "mn_ptr": "*u8",
             "p_ptr": "*fp32", "cnt_ptr": "*i32"}
    signature = {a: "constexpr" if a in constexprs else types.get(a, "i32")
                 for a in kernel.arg_names}
    compiled = triton.compile(ASTSource(kernel, signature, constexprs),
                              target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": 4, "num_stages": 3, "launch_pdl": True})
    lines = [re.sub(r"^@!?%\w+\s+", "", line.strip())  # drop predicate guards
             for line in compiled.asm["ptx"].splitlines()]

    def first(prefix: str) -> int:
        return next((i for i, line in enumerate(lines) if line.startswith(prefix)), -1)

    atoms = [line for line in lines if line.startswith("atom.")]
    wait, atom = first("griddepcontrol.wait"), first("atom.")
    return {"atoms": atoms, "wait": wait, "first_store": first("st.global"), "atom": atom,
            "barrier_before_atom": "bar.sync" in " ".join(lines[first("st.global"):atom]),
            "partial_loads_cg": any(line.startswith("ld.global.cg") for line in lines[atom:])}


def test_split_epilogue_orders_writes_and_waits_for_the_previous_kernel() -> None:
    """Compiled for Hopper with PDL: nothing is written before griddepcontrol.wait; one atomic
    (acquire-release at GPU scope) per program, after a CTA barrier that follows the partial's
    stores; the last program reads the partials past L1."""
    got = call_uninterpreted("test_qgemm_splitk", "hopper_ptx_of_the_split_kernel")
    assert 0 <= got["wait"] < got["first_store"] < got["atom"]
    assert len(got["atoms"]) == 1 and ".gpu" in got["atoms"][0] and "acq_rel" in got["atoms"][0]
    assert got["barrier_before_atom"] and got["partial_loads_cg"]


GPU = pytest.mark.skipif(DEVICE == "cpu", reason="compiled kernels, graphs and 8B shapes need a "
                                                 "GPU")


@GPU
@pytest.mark.parametrize("fmt", ["q4_0", "q8_0"])
def test_cuda_split_k_is_deterministic_and_graph_safe(fmt: str) -> None:
    """Many programs race to finish last: 20 eager calls and a CUDA graph replayed 5 times give
    the same bits; the counters are zero after each; 8B down shape (448 groups, 8 splits)."""
    g = torch.Generator().manual_seed(41)
    w = random_quantized(fmt, 4096, 14336, g)
    x = torch.randn(16, 14336, generator=g).to(DEVICE, torch.bfloat16)
    ref = _ref32(x, w, None)
    y32 = qgemm_tc(x, w, split_k=8, out_dtype=torch.float32)
    assert _max_rel(y32, ref) <= 1e-3
    y = qgemm_tc(x, w, split_k=8)
    _assert_rounded(y, y32)
    for _ in range(20):
        assert torch.equal(qgemm_tc(x, w, split_k=8), y)
    assert not _counters(y.device).any()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        qgemm_tc(x, w, split_k=8)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = qgemm_tc(x, w, split_k=8)
    for _ in range(5):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, y)
    assert not _counters(y.device).any()


@GPU
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("n, k", [(6144, 4096), (4096, 14336)])
def test_cuda_8b_shapes_with_the_split_rule(fmt: str, n: int, k: int) -> None:
    g = torch.Generator().manual_seed(n + k)
    w = random_quantized(fmt, n, k, g)
    split = QGemmTcRule(programs=264).split_for(n, k)
    assert split > 1
    for m in (2, 8, 16):
        x = torch.randn(m, k, generator=g).to(DEVICE, torch.bfloat16)
        y32 = qgemm_tc(x, w, split_k=split, out_dtype=torch.float32)
        assert _max_rel(y32, _ref32(x, w, None)) <= 1e-3


@pytest.mark.parametrize("fmt", ["q4_1", "q4_k", "q5_0", "q5_1", "q5_k", "q6_k", "int4_g32"])
def test_v4_matches_the_kernel_before(fmt: str) -> None:
    """v4 (x's sums once a step, the K-quants' scales a step ahead, Q5 codes by `_tc_q5` in
    the engine's launch where compiled) against the kernel of 2026-12-05 (`v4=False`): the same
    function up to the order of x's sums, so equal bits where one product per group is added
    (Q5_0) and within float32 rounding elsewhere (x's sums; Q6_K's two products, which the
    compiler may fuse into the sum differently: not bit-equal on an H100); both within 1e-3 of
    dequantize-then-matmul. On the GPU the 8B gate/up shape as well."""
    g = torch.Generator().manual_seed(7)
    shapes = [_shape(fmt)] + ([(28672, 4096)] if DEVICE != "cpu" else [])
    for n, k in shapes:
        w = random_quantized(fmt, n, k, g)
        for m in (5, 16):
            x = torch.randn(m, k, generator=g).to(DEVICE, torch.bfloat16)
            kw = dict(block_n=16, num_warps=1) if DEVICE == "cpu" else {}
            new = qgemm_tc(x, w, out_dtype=torch.float32, **kw)
            old = qgemm_tc(x, w, out_dtype=torch.float32, v4=False, **kw)
            ref = _ref32(x, w, None)
            assert _max_rel(new, ref) <= 1e-3 and _max_rel(old, ref) <= 1e-3
            if fmt == "q5_0":
                assert torch.equal(new, old)
            else:
                assert _max_rel(new, old) <= 1e-5
