"""Q6_K in the one-row quantized GEMV (kernels/qgemv_words.py) against dequantize-then-matmul.

Small shapes under Triton's interpreter on the CPU (and on a GPU where there is one); the
Llama-3.1-8B LM head chunk and the 1B tied embedding shapes on a GPU only. The standard is issue
15's: per module, max relative error <= 1e-3 against x @ dequantize(W).T in fp32, before the
output's own rounding (asserted on fp32 accumulations here through fp16 outputs, whose rounding
is 2^-11 < 1e-3 of each element); a unit row x reads back ggml's weights exactly.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")
from test_qgemv import DEVICE, _ref, _silu_mul_ref, random_quantized  # noqa: E402

from llm.backends.torch.kernels.qgemv import qgemv, qgemv_silu_mul  # noqa: E402
from llm.backends.torch.kernels.qgemv_config import QGemvWConfig, qgemv_w_config  # noqa: E402
from llm.backends.torch.kernels.qgemv_words import words_kernel_runs  # noqa: E402

# N odd (a partial last program of 8 rows); K = 768: 24 groups, so 4-group chunks divide it (6
# chunks: the prefetch's last load is past K) and 16-group chunks leave a partial one
N, K = 11, 768
CONFIGS = [QGemvWConfig(8, 4, 4, magic=m, prefetch=p) for m, p in
           ((False, False), (True, False), (True, True))] + [
    QGemvWConfig(4, 16, 4, magic=True, prefetch=True), QGemvWConfig(16, 32, 4, magic=True)]


def max_rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref| (the issue's per-module measure)."""
    return float((out.double() - ref).abs().max() / ref.abs().max())


def fp16_rounding(ref: torch.Tensor) -> float:
    """The largest error the fp16 output's own rounding can make, relative to max |ref|."""
    return float((ref.half().double() - ref).abs().max() / ref.abs().max())


def test_q6_k_takes_the_one_row_kernel() -> None:
    w = random_quantized("q6_k", N, K, torch.Generator().manual_seed(0))
    x = torch.randn(1, K).to(DEVICE, torch.bfloat16)
    assert words_kernel_runs(x, w) and words_kernel_runs(x.half(), w)
    assert not words_kernel_runs(x.float(), w)  # fp32 activations: the first kernel
    cfg = qgemv_w_config(1, 16384, 4096, "q6_k")  # the 8B LM head chunk: 4-bit's rule, but
    # one row tile a program (2 were timed for Q4_0 only)
    q4 = qgemv_w_config(1, 16384, 4096, "q4_0")
    assert cfg == replace(q4, tiles=1) and cfg.magic and cfg.prefetch


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.block_n}x{c.block_g}"
                         f"{'m' if c.magic else ''}{'p' if c.prefetch else ''}")
def test_matches_the_dequantized_matmul(cfg: QGemvWConfig) -> None:
    g = torch.Generator().manual_seed(cfg.block_n + cfg.block_g)
    w = random_quantized("q6_k", N, K, g)
    bias = torch.randn(N, generator=g)
    for dtype, b in ((torch.float16, None), (torch.float16, bias), (torch.bfloat16, None)):
        x = torch.randn(1, K, generator=g).to(DEVICE, dtype)
        bb = None if b is None else b.to(DEVICE, dtype)
        ref = _ref(x, w, bb)
        out = qgemv(x, w, bb, config=cfg)
        assert out.dtype == dtype and out.shape == (1, N)
        err = max_rel(out, ref)
        if dtype == torch.float16:  # the bound, plus the output's own rounding
            assert err <= 1e-3 + fp16_rounding(ref), err
        else:  # bf16 output: rounding up to 2^-9 of each element
            assert err <= 2.0**-8, err
    x = torch.randn(1, K, generator=g).to(DEVICE, torch.float16)
    assert max_rel(qgemv(x, w), _ref(x, w, None)) <= 1e-3 + fp16_rounding(_ref(x, w, None))


@pytest.mark.parametrize("magic", [False, True])
def test_unit_rows_read_back_the_exact_weights(magic: bool) -> None:
    """x = e_k in fp16: y[n] = w[n, k] as ggml dequantizes it (fp32), rounded once to fp16;
    every column of a group's both halves and every bit position of the 2-bit plane."""
    g = torch.Generator().manual_seed(5)
    w = random_quantized("q6_k", N, 256, g)
    ref = w.dequantize(torch.float32).half().cpu()
    cols = list(range(0, 32)) + torch.randperm(256, generator=g)[:8].tolist()
    x = torch.zeros(len(cols), 256)
    x[torch.arange(len(cols)), torch.tensor(cols)] = 1.0
    cfg = QGemvWConfig(8, 4, 4, magic=magic, prefetch=magic)
    x = x.to(DEVICE, torch.float16)
    y = torch.cat([qgemv(part, w, config=cfg) for part in x.split(16)])  # a launch per row
    assert torch.equal(y.T.cpu(), ref[:, cols])


def test_the_code_range_and_the_scales_signs() -> None:
    """Codes 0 and 63 (q - 32 = -32, 31) and negative int8 scales: the unit-row read-back."""
    g = torch.Generator().manual_seed(9)
    w = random_quantized("q6_k", 4, 256, g)
    w.planes["qs"][0].fill_(0x00)
    w.planes["qh"][0].fill_(0x00)
    w.planes["qs"][1].fill_(0xFF)
    w.planes["qh"][1].fill_(0xFF)
    w.planes["scales"][:2].copy_(torch.tensor([-128, 127] * 8, dtype=torch.int8))
    ref = w.dequantize(torch.float32).half().cpu()
    assert ref[0, 0] != 0 and ref[1, 0] != 0
    for col in (0, 15, 16, 31, 255):
        x = torch.zeros(1, 256).index_fill_(1, torch.tensor([col]), 1.0)
        for magic in (False, True):
            y = qgemv(x.to(DEVICE, torch.float16), w, config=QGemvWConfig(4, 8, 4, magic=magic))
            assert torch.equal(y[0].cpu(), ref[:, col])


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # the interpreter's silu
def test_fuses_silu_mul() -> None:
    """SiLU*up in the epilogue (a Q6_K gate/up weight): bit-equal to `silu_mul` after the unfused
    kernel with the same config, close to the float64 reference."""
    from llm.backends.torch.kernels.silu_mul import silu_mul

    g = torch.Generator().manual_seed(13)
    w = random_quantized("q6_k", 2 * N, K, g)
    w.planes["d"].div_(64)  # products within fp16's range: the gate times the up row
    x = torch.randn(1, K, generator=g).to(DEVICE, torch.float16)
    for cfg in CONFIGS[1:3]:
        fused = qgemv_silu_mul(x, w, config=cfg)
        assert fused.shape == (1, N)
        assert torch.equal(fused, silu_mul(qgemv(x, w, config=cfg)))
    ref = _silu_mul_ref(_ref(x, w, None), torch.float16)
    assert float((qgemv_silu_mul(x, w).double() - ref).norm() / ref.norm()) < 8e-3


def test_slices_of_a_larger_weight() -> None:
    """Row slices (LM head chunks, tensor-parallel shards) and a column slice of whole
    super-blocks: planes with strides the kernel must honour."""
    g = torch.Generator().manual_seed(21)
    w = random_quantized("q6_k", 3 * N, 2 * K, g)
    x = torch.randn(1, K, generator=g).to(DEVICE, torch.float16)
    for part in (w.slice_cols(K, 2 * K).slice_rows(N, 2 * N), w.slice_cols(0, K)):
        assert part.in_features == K
        ref = _ref(x, part, None)
        assert max_rel(qgemv(x, part), ref) <= 1e-3 + fp16_rounding(ref)


def hopper_compiles() -> dict[str, dict]:
    """The Q6_K kernel compiled for sm_90 with PDL (Triton's PTX and ptxas; no GPU needed; the
    interpreter off): per variant, whether the inline PTX assembled, the byte permutes in the
    PTX, and the global stores / loads before griddepcontrol.wait."""
    import re

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from llm.backends.torch.kernels import qgemv_words

    kernel = qgemv_words._qgemv_w_kernel
    pointers = {"xw_ptr": "*i64", "qw_ptr": "*i32", "qh_ptr": "*i32", "d_ptr": "*fp16",
                "sc_ptr": "*i8"}
    out = {}
    for magic in (False, True):
        for prefetch in (False, True):
            for glu in (False, True):
                constexprs = dict(K=4096, FMT=7, GS=32, BLOCK_N=8, BLOCK_G=128, MAGIC=magic,
                                  PREFETCH=prefetch, GLU=glu, ROPE=False, N_HEADS=0, N_KV=0,
                                  HEAD_DIM=2, XF16=False, HAS_BIAS=True, COMPILED=True,
                                  USE_GDC=True, STAGES=1, TILES=1, NORM=False,
                                  NORM_N=1, NBLOCK=1)
                signature = {a: "constexpr" if a in constexprs else pointers.get(
                    a, "*bf16" if a.endswith("_ptr") else "i32") for a in kernel.arg_names}
                compiled = triton.compile(ASTSource(kernel, signature, constexprs),
                                          target=GPUTarget("cuda", 90, 32),
                                          options={"num_warps": 4, "launch_pdl": True})
                lines = [re.sub(r"^@!?%\w+\s+", "", line.strip())
                         for line in compiled.asm["ptx"].splitlines()]
                wait = next(i for i, line in enumerate(lines)
                            if line.startswith("griddepcontrol.wait"))
                out[f"m{int(magic)}p{int(prefetch)}g{int(glu)}"] = {
                    "cubin": len(compiled.asm["cubin"]),
                    "prmt": sum(line.count("prmt.b32") for line in lines),
                    "writes": [x for x in lines[:wait] if x.startswith(("st.global", "atom."))],
                    "loads": sum(x.startswith("ld.global") for x in lines[:wait])}
    return out


def test_compiles_for_hopper_with_nothing_dependent_before_the_wait() -> None:
    """The compiled path (inline PTX byte permutes) assembles; with PDL only the codes (qs and
    qh words) are loaded before the wait, and only when prefetching; nothing is written."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import test_qgemv_q6k as t; "
            "print(json.dumps(t.hopper_compiles()))")
    r = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent)], env=env,
                       capture_output=True, text=True, timeout=900)
    if r.returncode and "GPUTarget" in r.stderr and "ImportError" in r.stderr:
        pytest.skip("this Triton cannot compile for a CUDA target here")
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    for name, v in got.items():
        assert v["cubin"] > 0 and v["prmt"] > 0 and not v["writes"], (name, v)
        assert (v["loads"] > 0) == ("p1" in name), (name, v)


GPU = pytest.mark.skipif(DEVICE == "cpu", reason="Llama shapes need a GPU")


@GPU
@pytest.mark.parametrize("n, k", [(16384, 4096), (4096, 14336), (128256, 2048)],
                         ids=["8b_head_chunk", "8b_down", "1b_tied_head"])
def test_llama_shapes_on_a_gpu(n: int, k: int) -> None:
    """The compiled kernel (inline PTX byte permutes) at the shapes real Q4_0 / Q4_K_M files
    keep in Q6_K, with its default config, fp16 and bf16 activations."""
    g = torch.Generator().manual_seed(n + k)
    w = random_quantized("q6_k", n, k, g)
    for dtype in (torch.float16, torch.bfloat16):
        x = torch.randn(1, k, generator=g).to(DEVICE, dtype)
        ref = _ref(x, w, None)
        err = max_rel(qgemv(x, w), ref)
        assert err <= (1e-3 + fp16_rounding(ref) if dtype == torch.float16 else 2.0**-8), err
        v1 = qgemv(x, w, variant="v1")  # the first kernel: the same function
        assert max_rel(v1, ref) <= (1e-3 + fp16_rounding(ref)
                                    if dtype == torch.float16 else 2.0**-8)


@GPU
def test_lm_head_argmax_on_a_gpu() -> None:
    """The LM head path of a Q4_0 file with a Q6_K head: chunked logits by the one-row kernel,
    then the fused argmax, equal to the argmax of the dequantized reference's logits where the
    top two are apart by more than the output's rounding."""
    from llm.backends.torch.kernels.argmax import max_argmax
    from llm.backends.torch.lm_head import LMHead
    from llm.backends.torch.weight import QuantLinear

    g = torch.Generator().manual_seed(1)
    w = random_quantized("q6_k", 40000, 2048, g)
    head = LMHead(QuantLinear(w, torch.bfloat16), chunk_size=16384, fused_argmax=True)
    x = torch.randn(1, 2048, generator=g).to(DEVICE, torch.bfloat16)
    logits = head(x)
    ref = _ref(x, w, None)[0]
    assert max_rel(logits, ref[None]) <= 2.0**-8
    top2 = ref.topk(2).values
    if float(top2[0] - top2[1]) > 2.0**-7 * float(top2[0].abs()):
        assert int(head.argmax(logits)[0]) == int(ref.argmax())
    value, index = max_argmax(logits)
    assert int(index[0]) == int(logits.float().argmax())
