"""Programmatic dependent launch (kernels/pdl.py): where it is chosen; each decode kernel, compiled
for Hopper (no GPU needed), touches no other kernel's data before its griddepcontrol.wait; and a
decode layer's kernels give bit-identical results with and without PDL on a GPU."""

from __future__ import annotations

import re

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")
import triton  # noqa: E402
from uninterpreted import call_uninterpreted  # noqa: E402

from llm.backends.torch.kernels import (  # noqa: E402
    argmax,
    gemv,
    gumbel,
    norm,
    paged_decode,
    qgemv_words_kernel,
    rope_kv,
    silu_mul,
)
from llm.backends.torch.kernels.argmax import max_argmax  # noqa: E402
from llm.backends.torch.kernels.gemv import norm_gate_up_silu_gemv, norm_gemv  # noqa: E402
from llm.backends.torch.kernels.norm import add_rms_norm  # noqa: E402
from llm.backends.torch.kernels.paged_decode import paged_decode_attention  # noqa: E402
from llm.backends.torch.kernels.pdl import launch_options, use_pdl  # noqa: E402
from llm.backends.torch.kernels.rope_kv import rope_and_cache  # noqa: E402

CUDA = torch.cuda.is_available()


def test_chosen_only_where_supported() -> None:
    cpu = torch.zeros(1)
    assert use_pdl(cpu) is False and use_pdl(cpu, False) is False
    with pytest.raises(ValueError, match="compute capability >= 9"):
        use_pdl(cpu, True)
    assert launch_options(False) == {} and launch_options(True) == {"launch_pdl": True}


GEMV_ONE_ROW = dict(K=2048, BLOCK_M=1, BLOCK_N=2, BLOCK_K=1024, ROWS=1, STAT_K=2048, COMPACT=True,
                    NORM=True, HAS_RESIDUAL=True, HAS_BIAS=True, GLU=True, IEEE=False, FMA=True)
GEMV_DOT = {**GEMV_ONE_ROW, "BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 256, "ROWS": 4,
            "STAT_K": 1024, "GLU": False, "FMA": False}
QGEMV_WORDS = dict(K=4096, FMT=1, GS=32, M=1, BLOCK_N=8, BLOCK_G=64, MAGIC=True, PREFETCH=True,
                   GLU=True, ROPE=False, N_HEADS=0, N_KV=0, HEAD_DIM=2, XF16=False,
                   HAS_BIAS=True, COMPILED=True, STAGES=1, TILES=1, NORM=False, NORM_N=1,
                   NBLOCK=1)
QGEMV_ROPE = {**QGEMV_WORDS, "GLU": False, "ROPE": True, "N_HEADS": 32, "N_KV": 8,
              "HEAD_DIM": 64}
QGEMV_POINTERS = {"xw_ptr": "*i64", "qw_ptr": "*i32", "d_ptr": "*fp16"}
QW_KERNEL = qgemv_words_kernel._qgemv_w_kernel
KERNELS = [  # (kernel, constexprs, pointer types other than bf16, loads allowed before the wait)
    (norm._add_rms_norm_kernel, dict(HIDDEN=2048, BLOCK=2048, HAS_RESIDUAL=True), {}, False),
    (rope_kv._rope_kv_kernel, dict(N_HEADS=32, N_KV=8, HEAD_DIM=64, BLOCK_T=1, K_OUT=False),
     {"blocks_ptr": "*i64", "offsets_ptr": "*i64"}, False),
    (rope_kv._rope_kv_kernel, dict(N_HEADS=32, N_KV=8, HEAD_DIM=64, BLOCK_T=32, K_OUT=True),
     {"blocks_ptr": "*i64", "offsets_ptr": "*i64"}, False),  # prefill: tokens per program
    (paged_decode._partial_kernel, dict(GROUP=4, GROUP_PAD=16, HEAD_DIM=64, BLOCK=32,
                                        IEEE=False),
     {"pt_ptr": "*i32", "pos_ptr": "*i32", "acc_ptr": "*fp32", "ml_ptr": "*fp32"}, False),
    (paged_decode._combine_kernel, dict(N_SPLITS=4, SPLITS_PAD=4, HEAD_DIM=64),
     {"acc_ptr": "*fp32", "ml_ptr": "*fp32"}, False),
    (argmax._partial_kernel, dict(N_CHUNKS=63, BLOCK=2048),
     {"val_ptr": "*fp32", "idx_ptr": "*i64"}, False),
    (argmax._final_kernel, dict(N_CHUNKS=63, CHUNKS_PAD=64),
     {"val_ptr": "*fp32", "idx_ptr": "*i64", "out_val_ptr": "*fp32", "out_idx_ptr": "*i64"},
     False),
    (gumbel._partial_kernel, dict(HAS_TOKENS=True, N_CHUNKS=63, BLOCK=2048),
     {"x_ptr": "*fp32", "tok_ptr": "*i64", "seed_ptr": "*i64", "pos_ptr": "*i64",
      "val_ptr": "*fp64", "best_ptr": "*i64"}, False),
    (gumbel._final_kernel, dict(N_CHUNKS=63, CHUNKS_PAD=64),
     {"val_ptr": "*fp64", "best_ptr": "*i64", "out_ptr": "*i64"}, False),
    (gemv._gemv_kernel, GEMV_ONE_ROW, {}, True),  # the first weight chunk: loaded before
    (gemv._gemv_kernel, GEMV_DOT, {}, True),
    (silu_mul._silu_mul_kernel, dict(INTER=8192, BLOCK=1024), {}, False),
    # the quantized one-row GEMV with its SiLU epilogue: codes prefetched before the wait, or
    # (PREFETCH off) nothing
    (QW_KERNEL, QGEMV_WORDS, QGEMV_POINTERS, True),
    (QW_KERNEL, {**QGEMV_WORDS, "PREFETCH": False}, QGEMV_POINTERS, False),
    (QW_KERNEL, {**QGEMV_WORDS, "M": 4, "BLOCK_N": 2}, QGEMV_POINTERS, True),
    # the chunk loop pipelined through shared memory: its cp.async loads after the wait too
    (QW_KERNEL, {**QGEMV_WORDS, "PREFETCH": False, "STAGES": 3,
                "BLOCK_G": 32}, QGEMV_POINTERS, False),
    # several row tiles a program: the next tile's codes loaded after the wait
    (QW_KERNEL, {**QGEMV_WORDS, "TILES": 3, "BLOCK_G": 128}, QGEMV_POINTERS,
     True),
    # Q5_K: its `qh` words prefetched beside the codes
    (QW_KERNEL, {**QGEMV_WORDS, "FMT": 6},
     {**QGEMV_POINTERS, "qh_ptr": "*u8", "m_ptr": "*fp16", "sc_ptr": "*u8", "mn_ptr": "*u8"},
     True),
    # with RoPE and the K/V write in its epilogue (the RoPE rows and the page slot after the wait)
    (QW_KERNEL, QGEMV_ROPE,
     {**QGEMV_POINTERS, "blocks_ptr": "*i64", "offsets_ptr": "*i64"}, True),
    # with the residual add and the next norm in its epilogue (its counter after the wait)
    (QW_KERNEL, {**QGEMV_WORDS, "GLU": False, "NORM": True,
                "NORM_N": 4096, "NBLOCK": 4096},
     {**QGEMV_POINTERS, "cnt_ptr": "*i32"}, True),
]


IDS = ["norm", "rope_kv", "rope_kv_prefill", "attn_partial", "attn_combine", "argmax_partial",
       "argmax_final", "gumbel_partial", "gumbel_final", "gemv_fma", "gemv_dot", "silu_mul",
       "qgemv_words", "qgemv_words_no_prefetch", "qgemv_words_4_rows", "qgemv_words_stages",
       "qgemv_words_tiles", "qgemv_words_q5_k", "qgemv_words_rope", "qgemv_words_norm"]


def hopper_ptx_before_wait() -> dict[str, dict]:
    """Compile every kernel of KERNELS for sm_90 with USE_GDC (no GPU needed; must run with
    Triton's interpreter off) -> per kernel: how many waits / releases, in order, and the global
    writes and loads that come before the wait."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    out = {}
    for name, (kernel, constexprs, pointers, _) in zip(IDS, KERNELS):
        constexprs = {**constexprs, "USE_GDC": True}
        signature = {}
        for arg in kernel.arg_names:
            if arg in constexprs:
                signature[arg] = "constexpr"
            elif arg in pointers:
                signature[arg] = pointers[arg]
            elif arg.endswith(("_ptr", "_pool")):
                signature[arg] = "*bf16"
            else:
                signature[arg] = "fp32" if arg in ("eps", "scale") else "i32"
        compiled = triton.compile(ASTSource(kernel, signature, constexprs),
                                  target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": 4, "launch_pdl": True})
        lines = [re.sub(r"^@!?%\w+\s+", "", line.strip())  # drop predicate guards
                 for line in compiled.asm["ptx"].splitlines()]
        waits = [i for i, line in enumerate(lines) if line.startswith("griddepcontrol.wait")]
        releases = [i for i, line in enumerate(lines)
                    if line.startswith("griddepcontrol.launch_dependents")]
        before = lines[:waits[0]] if waits else lines
        out[name] = {
            "in_order": len(waits) == 1 and len(releases) == 1 and waits[0] < releases[0],
            "writes": [x for x in before if x.startswith(("st.global", "atom.", "red."))],
            "loads": [x for x in before if x.startswith(("ld.global", "cp.async"))]}
    return out


@pytest.fixture(scope="module")
def hopper_ptx() -> dict[str, dict]:
    """hopper_ptx_before_wait() in a child process without TRITON_INTERPRET."""
    return call_uninterpreted("test_pdl", "hopper_ptx_before_wait")


@pytest.mark.parametrize("name, weight_loads", [(i, k[3]) for i, k in zip(IDS, KERNELS)])
def test_nothing_dependent_before_the_wait(hopper_ptx, name: str, weight_loads: bool) -> None:
    got = hopper_ptx[name]
    assert got["in_order"]  # one wait, then one release
    assert not got["writes"], got["writes"]
    if weight_loads:  # the GEMV streams its first weight chunk during the previous kernel
        assert got["loads"]
    else:
        assert not got["loads"], got["loads"]


@pytest.mark.skipif(not CUDA or torch.cuda.get_device_capability()[0] < 9,
                    reason="PDL needs a CUDA GPU of compute capability >= 9")
def test_decode_kernels_equal_with_and_without_pdl() -> None:
    """One decode layer's kernel chain, back to back on one stream (each kernel reads the one
    before it), with and without PDL: the same bits."""
    g = torch.Generator(device="cuda").manual_seed(0)
    dt, h, nh, n_kv, hd, block, b = torch.bfloat16, 2048, 32, 8, 64, 32, 1

    def rnd(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g, device="cuda")).to(dt)

    x, res, nw = rnd(b, h), rnd(b, h), 1 + rnd(h, scale=0.1)
    wqkv, wgu = rnd((nh + 2 * n_kv) * hd, h, scale=h ** -0.5), rnd(2 * 8192, h, scale=h ** -0.5)
    cos, sin = rnd(b, hd), rnd(b, hd)
    pages = torch.arange(8, device="cuda", dtype=torch.int32)[None]
    blocks, offsets = pages[:, 2].long(), torch.full((b,), 5, device="cuda")
    positions = torch.full((b,), 2 * block + 5, device="cuda", dtype=torch.int32)
    k_init = torch.zeros(8, n_kv, block, hd, dtype=dt, device="cuda")
    v_init = torch.zeros_like(k_init)
    k_init[:3].copy_(rnd(3, n_kv, block, hd))
    v_init[:3].copy_(rnd(3, n_kv, block, hd))
    outs = []
    for pdl in (False, True):
        k_pool, v_pool = k_init.clone(), v_init.clone()
        qkv, total = norm_gemv(x, res, nw, 1e-5, wqkv, pdl=pdl)
        q = rope_and_cache(qkv, cos, sin, blocks, offsets, k_pool, v_pool, nh, pdl=pdl)
        o = paged_decode_attention(q, k_pool, v_pool, pages, positions, hd ** -0.5, 1, pdl=pdl)
        act, total = norm_gate_up_silu_gemv(o.reshape(b, -1)[:, :h], total, nw, 1e-5, wgu,
                                            pdl=pdl)
        y = add_rms_norm(act[:, :h], total, nw, 1e-5, pdl=pdl)[0]
        best, index = max_argmax(act, pdl=pdl)
        torch.cuda.synchronize()
        outs.append([qkv, q, k_pool, o, act, y, best, index])
    for a, c in zip(*outs):
        assert torch.equal(a, c)
