"""The 4-bit tensor-core kernel (kernels/q4_mma.py, kernels/q4_mma.cu) for Q4_0 and Q4_K against
dequantize-then-matmul, and the rule that routes `qgemv` to it.

Everywhere: the kernel's lane arithmetic emulated in numpy, each m16n8k16 `mma.sync` by the PTX
ISA's fragment layout (A rows groupID / + 8, columns 2 * tid (+ 1, + 8, + 9); B rows 2 * tid (..),
column groupID; C rows groupID / + 8, columns 2 * tid, + 1): what makes the column order of the
codes each lane feeds to A and of the x it feeds to B agree; the routing rule; the refusals. On a
GPU: the compiled kernel at 1..16 rows, with and without PDL, in a CUDA graph, and through
`qgemv` / `qgemv_silu_mul`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")
from test_qgemv import DEVICE, random_quantized  # noqa: E402

from llm.backends.torch.kernels import q4_mma  # noqa: E402
from llm.backends.torch.kernels.q4_mma import (  # noqa: E402
    ROWS,
    kernel_name,
    mma_rows,
    q4_mma_matmul,
)
from llm.backends.torch.kernels.qgemv import qgemv, qgemv_silu_mul  # noqa: E402
from llm.backends.torch.kernels.silu_mul import silu_mul  # noqa: E402
from llm.model.quant.tensor import QuantizedTensor  # noqa: E402


def _pair(word: int, shift: int, first: int) -> tuple[float, float]:
    """The bf16 pair a `prmt` makes of bytes first, first + 1 of (word >> shift) & 0x0F0F0F0F."""
    nib = (word >> shift) & 0x0F0F0F0F
    return tuple(128.0 + ((nib >> (8 * b)) & 0xFF) for b in (first, first + 1))


def _mma(c: np.ndarray, a: list, b: list) -> None:
    """c [32 lanes, 4] += A @ B of one m16n8k16 from the lanes' fragments (PTX ISA layout)."""
    am, bm = np.zeros((16, 16)), np.zeros((16, 8))
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        am[g, 2 * t:2 * t + 2], am[g + 8, 2 * t:2 * t + 2] = a[lane][0], a[lane][1]
        am[g, 2 * t + 8:2 * t + 10], am[g + 8, 2 * t + 8:2 * t + 10] = a[lane][2], a[lane][3]
        bm[2 * t:2 * t + 2, g], bm[2 * t + 8:2 * t + 10, g] = b[lane][0], b[lane][1]
    cm = am @ bm
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        c[lane] += (cm[g, 2 * t], cm[g, 2 * t + 1], cm[g + 8, 2 * t], cm[g + 8, 2 * t + 1])


def _group_scales(w: QuantizedTensor) -> tuple[np.ndarray, np.ndarray]:
    """Per row and 32-group, what the kernel multiplies the mma sum C and the sum of x by: Q4_0
    d and 136 d (d * (C - 136 sum x)); Q4_K s = d * scale and 128 s + o, o = dmin * min."""
    p = w.planes
    if w.format == "q4_0":
        d = p["d"].double().numpy()
        return d, 136.0 * d
    n = w.shape[0]
    s = (p["d"].double().numpy().repeat(8, axis=1) * p["scales"].double().numpy()).reshape(n, -1)
    o = (p["dmin"].double().numpy().repeat(8, axis=1) * p["mins"].double().numpy()).reshape(n, -1)
    return s, 128.0 * s + o


def emulate(w: QuantizedTensor, x: np.ndarray, warps: int) -> np.ndarray:
    """The kernel's result for x [M, K] (float32 holding bf16 values) and Q4_0 / Q4_K `w`, lane
    by lane as kernels/q4_mma.cu computes it, K's quads split among `warps` warps; [M, N]. It
    models the fragments and the per-group arithmetic; the ring, the addresses and the launch are
    left to the GPU tests below."""
    n, k = w.shape
    m_rows = x.shape[0]
    one = m_rows == 1
    tiles = 1 if m_rows <= 8 else 2
    words = w.planes["qs"].contiguous().numpy().view("<u4")  # [N, K / 8]
    mult, off = _group_scales(w)  # [N, groups]: a group adds mult * C - off * sum x
    quads = k // 128
    sx = x.reshape(m_rows, -1, 32).sum(2)  # [M, groups]
    y = np.zeros((m_rows, n))
    for blk in range(n // ROWS):
        part = np.zeros((warps, ROWS, m_rows))
        for sw in range(warps):
            q_lo, q_hi = quads * sw // warps, quads * (sw + 1) // warps
            acc = np.zeros((2, tiles, 32, 4))  # [16-row block][tile][lane][c0..c3]
            for gi in range(4 * q_lo, 4 * q_hi):
                for nt in range(tiles):
                    c = np.zeros((2, 32, 4))
                    for shift, xoff in ((0, 0), (4, 16)):
                        a, b = ([], []), []
                        for lane in range(32):
                            g, t = lane >> 2, lane & 3
                            r0 = blk * ROWS + g
                            ws = [int(words[r0 + 8 * i, 4 * gi + t]) for i in range(4)]
                            for blk16 in range(2):
                                w0, w1 = ws[2 * blk16], ws[2 * blk16 + 1]
                                a[blk16].append((_pair(w0, shift, 0), _pair(w1, shift, 0),
                                                 _pair(w0, shift, 2), _pair(w1, shift, 2)))
                            row = 0 if one else 8 * nt + g
                            if row < m_rows:
                                at = 32 * gi + xoff + 4 * t
                                xs = x[row, at:at + 4]
                            else:
                                xs = np.zeros(4)
                            b.append(((xs[0], xs[1]), (xs[2], xs[3])))
                        _mma(c[0], a[0], b)
                        _mma(c[1], a[1], b)
                    for lane in range(32):
                        g, t = lane >> 2, lane & 3
                        r0 = blk * ROWS + g
                        cols = (0, 0) if one else (8 * nt + 2 * t, 8 * nt + 2 * t + 1)
                        s = [sx[col, gi] if col < m_rows else 0.0 for col in cols]
                        for blk16 in range(2):
                            ra, rb = r0 + 16 * blk16, r0 + 16 * blk16 + 8
                            da, db = mult[ra, gi], mult[rb, gi]
                            oa, ob = off[ra, gi], off[rb, gi]
                            cc = c[blk16][lane]
                            acc[blk16, nt, lane] += (da * cc[0] - oa * s[0], da * cc[1] - oa * s[1],
                                                     db * cc[2] - ob * s[0], db * cc[3] - ob * s[1])
            for lane in range(32):  # the partials as the kernel stores them
                g, t = lane >> 2, lane & 3
                for blk16 in range(2):
                    for nt in range(tiles):
                        row = 16 * blk16 + g
                        if one:
                            if t == 0:
                                part[sw, row, 0] = acc[blk16, nt, lane, 0]
                                part[sw, row + 8, 0] = acc[blk16, nt, lane, 2]
                            continue
                        for i, (dr, col) in enumerate(((0, 2 * t), (0, 2 * t + 1), (8, 2 * t),
                                                       (8, 2 * t + 1))):
                            if 8 * nt + col < m_rows:
                                part[sw, row + dr, 8 * nt + col] = acc[blk16, nt, lane, i]
        y[:, blk * ROWS:(blk + 1) * ROWS] = part.sum(0).T
    return y


@pytest.mark.parametrize("fmt", ["q4_0", "q4_k"])
@pytest.mark.parametrize(("m", "warps"), [(1, 2), (5, 3), (11, 2), (16, 8)])
def test_emulated_lanes_give_the_dequantized_matmul(fmt: str, m: int, warps: int) -> None:
    """32 x 512 (4 quads: 3 warps split them unevenly, 8 leave some idle; Q4_K: 2 super-blocks)
    at one row of x (x in all of B's columns), 5 (one B tile, 3 columns empty), 11 and 16 (two
    tiles)."""
    g = torch.Generator().manual_seed(m)
    w = random_quantized(fmt, 32, 512, g, "cpu")
    x = torch.randn(m, 512, generator=g).to(torch.bfloat16).float()
    ref = (x.double() @ w.dequantize(torch.float64).T).numpy()
    err = np.abs(emulate(w, x.numpy(), warps) - ref).max() / np.abs(ref).max()
    assert err <= 1e-6


def test_a_swapped_byte_pair_is_caught() -> None:
    """The emulation can fail: codes fed to A in another column order than x to B."""
    g = torch.Generator().manual_seed(3)
    w = random_quantized("q4_0", 32, 128, g, "cpu")
    x = torch.randn(5, 128, generator=g).to(torch.bfloat16).float()
    ref = (x.double() @ w.dequantize(torch.float64).T).numpy()
    qs = w.planes["qs"].clone()
    qs[:, [0, 1]] = qs[:, [1, 0]]  # bytes 0 and 1 of every row's first group
    bad = QuantizedTensor("q4_0", w.shape, {"qs": qs, "d": w.planes["d"]})
    assert np.abs(emulate(bad, x.numpy(), 1) - ref).max() / np.abs(ref).max() > 1e-3


def test_the_rule() -> None:
    """Q4_0 / Q4_K, N a multiple of 32 and K of 128; 4..8 rows everywhere, 2..3 where K <= N and
    N >= 3,072 (measured, H100); never 1 row or more than 8."""
    assert mma_rows("q4_0", 4, 2048, 8192) and mma_rows("q4_0", 8, 4096, 14336)
    assert mma_rows("q4_0", 2, 28672, 4096) and mma_rows("q4_0", 3, 3072, 2048)
    assert mma_rows("q4_0", 2, 4096, 4096)
    assert not mma_rows("q4_0", 2, 4096, 14336) and not mma_rows("q4_0", 3, 2048, 2048)
    assert not mma_rows("q4_0", 1, 28672, 4096) and not mma_rows("q4_0", 9, 28672, 4096)
    assert not mma_rows("q4_1", 4, 28672, 4096) and not mma_rows("q8_0", 4, 28672, 4096)
    assert not mma_rows("q4_0", 4, 28672 + 16, 4096) and not mma_rows("q4_0", 4, 4096, 4096 + 32)
    assert [kernel_name("q4_0", m) for m in (1, 2, 8, 9, 16)] == [
        "q4_0_mma_m1", "q4_0_mma_m8", "q4_0_mma_m8", "q4_0_mma_m16", "q4_0_mma_m16"]
    assert kernel_name("q4_k", 4) == "q4_k_mma_m8"
    assert mma_rows("q4_k", 4, 28672, 4096) and not mma_rows("q5_k", 4, 28672, 4096)
    with pytest.raises(ValueError, match="1..16 rows"):
        kernel_name("q4_0", 17)
    with pytest.raises(ValueError, match="Q4_0|q4_0 or q4_k weights, not q6_k"):
        kernel_name("q6_k", 4)


def test_shared_memory_of_a_launch() -> None:
    """The sums of x (8 rows a tile, K / 32 groups) or the warps' partials, whichever is larger,
    then 8 warps' rings of 4 stages: 8B down at 8 rows ~104 KB, within an H100's 227 KB."""
    ring = 8 * 4 * (32 * 80 + 32 * 8)
    assert q4_mma.shared_bytes(4, 14336) == 4 * 8 * 448 + ring
    assert q4_mma.shared_bytes(1, 4096) == 4 * 8 * 32 + ring  # the partials [8 warps][32][1]
    assert q4_mma.shared_bytes(16, 4096, warps=4, stages=2) == 4 * 16 * 128 + 4 * 2 * 2816


def test_refusals_name_what_is_wrong() -> None:
    g = torch.Generator().manual_seed(5)
    w = random_quantized("q4_0", 64, 256, g, "cpu")
    x = torch.randn(4, 256, generator=g).to(torch.bfloat16)
    assert not q4_mma.q4_mma_runs(x, w)  # the CPU
    with pytest.raises(ValueError, match="bf16 x"):
        q4_mma_matmul(x.float(), w)
    with pytest.raises(ValueError, match=r"x \[M, 256\]"):
        q4_mma_matmul(x[:, :128], w)
    with pytest.raises(ValueError, match="q4_0 or q4_k weights, not q8_0"):
        q4_mma_matmul(x, random_quantized("q8_0", 64, 256, g, "cpu"))
    with pytest.raises(ValueError, match="N % 32"):
        q4_mma_matmul(x, random_quantized("q4_0", 48, 256, g, "cpu"))
    with pytest.raises(ValueError, match="warps must be 1..8"):
        q4_mma_matmul(x, w, warps=9)
    unaligned = torch.empty(4 * 256 + 1, dtype=torch.bfloat16)[1:].view(4, 256)
    with pytest.raises(ValueError, match="aligned"):
        q4_mma_matmul(unaligned, w)
    with pytest.raises(ValueError, match="runs on one CUDA GPU: x is on cpu"):
        q4_mma_matmul(x, w)


GPU = pytest.mark.skipif(
    DEVICE == "cpu" or torch.version.cuda is None or torch.cuda.get_device_capability()[0] < 8,
    reason="the CUDA kernel needs an NVIDIA GPU of compute capability >= 8")


def _close_to_dequantized(y: torch.Tensor, x: torch.Tensor, w: QuantizedTensor) -> None:
    """y (bf16) is x @ dequantize(w).T up to its own rounding (2^-9 of the value) and float32
    sums (1e-3 of the largest value: issue 15's rule)."""
    ref = x.double() @ w.dequantize(torch.float64).T
    assert ((y.double() - ref).abs() <= ref.abs() * 2**-8 + 1e-3 * ref.abs().max()).all()


@GPU
@pytest.mark.parametrize("m", [1, 2, 3, 4, 7, 8, 9, 16])
@pytest.mark.parametrize(("fmt", "n", "k"), [("q4_0", 64, 384), ("q4_k", 64, 768),
                                             ("q4_0", 3072, 2048), ("q4_k", 3072, 2048),
                                             ("q4_0", 4096, 14336), ("q4_k", 4096, 14336)])
def test_cuda_kernel_matches_the_dequantized_matmul(m: int, fmt: str, n: int, k: int) -> None:
    """Every row count (the three kernels, tiles partly empty); K of 3 / 6 quads (8 warps: some
    without work) to the 8B down shape; PDL on and off give the same bits, as do repeated
    calls and 4 warps with a 2-deep ring against the defaults (warps add in a fixed order, but
    another warp count splits K elsewhere: close, not equal)."""
    g = torch.Generator().manual_seed(m * 7 + n)
    w = random_quantized(fmt, n, k, g)
    x = (torch.randn(m, k, generator=g) * 0.5).to(DEVICE, torch.bfloat16)
    y = q4_mma_matmul(x, w, pdl=False)
    assert y.shape == (m, n) and y.dtype == torch.bfloat16
    _close_to_dequantized(y, x, w)
    assert torch.equal(q4_mma_matmul(x, w, pdl=True), y) and torch.equal(q4_mma_matmul(x, w), y)
    _close_to_dequantized(q4_mma_matmul(x, w, warps=4, stages=2), x, w)


@GPU
def test_cuda_graph_replays_the_kernel() -> None:
    """Captured in a CUDA graph (PDL edges kept), replayed on new x: the eager bits."""
    g = torch.Generator().manual_seed(11)
    w = random_quantized("q4_0", 4096, 4096, g)
    x = torch.randn(4, 4096, generator=g).to(DEVICE, torch.bfloat16)
    q4_mma_matmul(x, w)  # compiled before the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = q4_mma_matmul(x, w)
    for _ in range(3):
        x.copy_(torch.randn(4, 4096, generator=g).to(DEVICE, torch.bfloat16))
        graph.replay()
        assert torch.equal(y, q4_mma_matmul(x, w))


@GPU
@pytest.mark.parametrize("fmt", ["q4_0", "q4_k"])
def test_cuda_qgemv_routes_by_the_rule(fmt: str) -> None:
    """qgemv and qgemv_silu_mul take the kernel where `mma_rows` says so (the same bits), and
    their Triton kernels elsewhere and for an x they cannot align."""
    g = torch.Generator().manual_seed(13)
    w = random_quantized(fmt, 3072, 2048, g)
    x = torch.randn(4, 2048, generator=g).to(DEVICE, torch.bfloat16)
    assert q4_mma.q4_mma_runs(x, w) and torch.equal(qgemv(x, w), q4_mma_matmul(x, w))
    assert torch.equal(qgemv_silu_mul(x, w), silu_mul(q4_mma_matmul(x, w)))
    assert not q4_mma.q4_mma_runs(x[:1], w)  # one row: the Triton kernel
    _close_to_dequantized(qgemv(x[:1], w), x[:1], w)
    unaligned = torch.empty(4 * 2048 + 1, dtype=torch.bfloat16, device=DEVICE)[1:].view(4, 2048)
    unaligned.copy_(x)
    assert not q4_mma.q4_mma_runs(unaligned, w)
    _close_to_dequantized(qgemv(unaligned, w), x, w)
    assert not q4_mma.q4_mma_runs(x, w, bias=torch.zeros(3072, device=DEVICE))


@GPU
@pytest.mark.parametrize("fmt", ["q4_0", "q4_k"])
def test_cuda_strided_planes_and_rows(fmt: str) -> None:
    """Views as the engine makes them: an LM-head chunk (`slice_rows`), a tensor-parallel shard of
    the columns (`slice_cols`: every plane's row stride longer than its width) and x rows longer
    than K (x a column slice of a wider buffer): the results of contiguous copies, bit for bit."""
    g = torch.Generator().manual_seed(17)
    w = random_quantized(fmt, 4096, 2048, g)
    buf = torch.randn(4, 2048 + 512, generator=g).to(DEVICE, torch.bfloat16)
    x = buf[:, 512:]  # row stride 2,560, 1,024 bytes in: aligned
    assert q4_mma.planes_aligned(x, w)
    dense = x.contiguous()
    for view in (w.slice_rows(1024, 3072), w.slice_cols(512, 1536), w):
        copy = QuantizedTensor(view.format, view.shape,
                               {k: t.contiguous() for k, t in view.planes.items()})
        xs = x[:, :view.shape[1]]
        assert torch.equal(q4_mma_matmul(xs, view), q4_mma_matmul(xs.contiguous(), copy))
    _close_to_dequantized(q4_mma_matmul(x, w), dense, w)
