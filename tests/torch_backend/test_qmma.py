"""The tensor-core kernel (kernels/qmma.py, kernels/qmma.cu) for every GGUF block format the engine
keeps (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K) and the int8 / int4_g128 of weights
quantized at load, against dequantize-then-matmul, and the rule that routes `qgemv` to it.

Everywhere: the kernel's lane arithmetic emulated in numpy, each m16n8k16 `mma.sync` by the PTX
ISA's fragment layout (A rows groupID / + 8, columns 2 * tid (+ 1, + 8, + 9); B rows 2 * tid (..),
column groupID; C rows groupID / + 8, columns 2 * tid, + 1): what makes the column order of the
codes each lane feeds to A and of the x it feeds to B agree; the routing rule; the refusals. On a
GPU: the compiled kernel at 1..16 rows, with and without PDL, in a CUDA graph, and through
`qgemv` / `qgemv_silu_mul`.
"""

from __future__ import annotations

import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")
from test_qgemv import DEVICE, random_quantized  # noqa: E402

from llm.backends.torch.kernels import qmma  # noqa: E402
from llm.backends.torch.kernels.qgemv import qgemv, qgemv_silu_mul  # noqa: E402
from llm.backends.torch.kernels.qmma import (  # noqa: E402
    ROWS,
    kernel_name,
    mma_rows,
    qmma_matmul,
)
from llm.backends.torch.kernels.silu_mul import silu_mul  # noqa: E402
from llm.model.quant.tensor import QuantizedTensor  # noqa: E402

FORMATS = ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q4_k", "q5_k", "q6_k", "int8", "int4_g128"]
AFFINE = ("q4_1", "q5_1", "q4_k", "q5_k", "int4_g128")
M32 = 0xFFFFFFFF


def _word(plane: np.ndarray, row: int, at: int) -> int:
    """The little-endian 32-bit word at byte `at` of a plane's row."""
    return int.from_bytes(plane[row, at:at + 4].tobytes(), "little")


def _codes(fmt: str, qs: np.ndarray, qh: np.ndarray | None, row: int, gi: int,
           t: int) -> list[tuple[int, int, float, int, int]]:
    """What lane t gives A for one row and 32-group, mma by mma, as qmma.cu's `codes` builds it
    (the same bit operations on the planes' words): (code bytes, multiplier of their bf16 128 +
    byte, the bf16 added to that (`neg_offset`), x's column offset in the group, sub-block)."""
    if fmt in ("q8_0", "int8"):  # int8: Q8_0's code layout
        u, u2 = _word(qs, row, 32 * gi + 4 * t) ^ 0x80808080, _word(
            qs, row, 32 * gi + 16 + 4 * t) ^ 0x80808080
        return [(u & 0x0F0F0F0F, 1, 0.0, 0, 0), ((u >> 4) & 0x0F0F0F0F, 16, -2304.0, 0, 0),
                (u2 & 0x0F0F0F0F, 1, 0.0, 16, 0), ((u2 >> 4) & 0x0F0F0F0F, 16, -2304.0, 16, 0)]
    w = _word(qs, row, 16 * gi + 4 * t)
    lo, hi = w & 0x0F0F0F0F, (w >> 4) & 0x0F0F0F0F
    if fmt in ("q5_0", "q5_1", "q5_k"):
        h = _word(qh, row, 4 * gi) >> (8 * t)
        lo |= (((h & 15) * 0x2040810) & M32) & 0x10101010
        hi |= ((((h >> 4) & 15) * 0x2040810) & M32) & 0x10101010
    elif fmt == "q6_k":
        h, sh = _word(qh, row, 8 * gi + 4 * (t & 1)), 2 * (t >> 1)
        lo |= ((h << (4 - sh)) & M32) & 0x30303030
        hi |= (h >> sh) & 0x30303030
    add = {"q4_0": -136.0, "q5_0": -144.0, "q6_k": -160.0}.get(fmt, 0.0)
    return [(lo, 1, add, 0, 0), (hi, 1, add, 16, 1 if fmt == "q6_k" else 0)]


def _pair(codes: int, mult: int, add: float, first: int) -> tuple[float, float]:
    """The bf16 pair a `prmt` makes of bytes first, first + 1 of the code bytes, mult (128 +
    byte), plus `add` (`plus`'s bf16 fma): both steps exact in bf16 for bytes < 128, mult 1 or 16
    and the offsets used, which the asserts check."""
    made = [float(mult * (128 + ((codes >> (8 * b)) & 0xFF))) for b in (first, first + 1)]
    assert all(((codes >> (8 * b)) & 0xFF) < 128 for b in (first, first + 1))
    pair = tuple(v + add for v in made)
    for v in (*made, add, *pair):
        assert float(torch.tensor(v).to(torch.bfloat16)) == v
    return pair


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


def _f16(bits: int) -> float:
    return float(np.array([bits & 0xFFFF], np.uint16).view(np.float16)[0])


def _quad_bytes(w: QuantizedTensor, row: int, q: int) -> bytes:
    """The scale bytes of one row and quad that the kernel's ring holds (`issue_quad`)."""
    p, fmt = w.planes, w.format

    def raw(name: str, lo: int, hi: int) -> bytes:
        return p[name][row].contiguous().view(torch.uint8).numpy()[lo:hi].tobytes()

    if fmt in ("q4_0", "q5_0", "q8_0"):
        return raw("d", 8 * q, 8 * q + 8)
    if fmt in ("q4_1", "q5_1"):
        return raw("d", 8 * q, 8 * q + 8) + raw("m", 8 * q, 8 * q + 8)
    if fmt == "q6_k":
        return raw("scales", 8 * q, 8 * q + 8)
    return raw("scales", 4 * q, 4 * q + 4) + raw("mins", 4 * q, 4 * q + 4)


def _scales(w: QuantizedTensor) -> tuple[np.ndarray, np.ndarray, int]:
    """Per row and scale (a 32-group; Q6_K a 16-column sub-block), what the kernel multiplies
    the mma sum C and the sum of x by (a scale adds mult * C - off * S; off 0 in the symmetric
    formats, whose codes carry their offset), and the scales a group: decoded from the ring's
    bytes with qmma.cu's `step` operations on its words (x, y, z, w)."""
    p, fmt = w.planes, w.format
    n, k = w.shape
    subs = 2 if fmt == "q6_k" else 1
    mult, off = np.zeros((n, k // 32 * subs)), np.zeros((n, k // 32 * subs))
    if fmt == "int8":  # the row's float32 d for every group (read by __ldg, not the ring)
        mult[:] = p["d"].double().numpy()
        return mult, off, subs
    if fmt == "int4_g128":  # a bf16 d and m per quad: d C - (128 d - m) S
        d = np.repeat(p["d"].double().numpy(), 4, axis=1)
        m = np.repeat(p["m"].double().numpy(), 4, axis=1)
        return d, (128.0 * d - m).astype(np.float32), subs
    for row in range(n):
        for q in range(k // 128):
            raw = _quad_bytes(w, row, q).ljust(16, b"\0")
            sq = [int.from_bytes(raw[4 * i:4 * i + 4], "little") for i in range(4)]
            if fmt in ("q4_k", "q5_k", "q6_k"):
                dk = float(p["d"][row, q >> 1])
                mk = float(p["dmin"][row, q >> 1]) if fmt != "q6_k" else 0.0
            for j in range(4):
                gi, half = 4 * q + j, (sq[0] if j < 2 else sq[1]) >> (16 * (j & 1))
                if fmt in ("q4_0", "q5_0", "q8_0"):
                    mult[row, gi] = _f16(half)
                elif fmt in ("q4_1", "q5_1"):
                    m = _f16((sq[2] if j < 2 else sq[3]) >> (16 * (j & 1)))
                    mult[row, gi], off[row, gi] = _f16(half), 128.0 * _f16(half) - m
                elif fmt == "q6_k":
                    for u in range(2):
                        sc = np.array([(half >> (8 * u)) & 0xFF], np.uint8).view(np.int8)[0]
                        mult[row, 2 * gi + u] = dk * float(sc)
                else:
                    dd = dk * ((sq[0] >> (8 * j)) & 0xFF)
                    mult[row, gi] = dd
                    off[row, gi] = 128.0 * dd + mk * ((sq[1] >> (8 * j)) & 0xFF)
    return mult, off, subs


def emulate(w: QuantizedTensor, x: np.ndarray, warps: int) -> np.ndarray:
    """The kernel's result for x [M, K] (float32 holding bf16 values) and `w` in one of FORMATS,
    lane by lane as kernels/qmma.cu computes it, K's quads split among `warps` warps; [M, N]. It
    models the fragments and the per-group arithmetic; the ring, the addresses and the launch are
    left to the GPU tests below."""
    n, k = w.shape
    m_rows = x.shape[0]
    one = m_rows == 1
    tiles = 1 if m_rows <= 8 else max(8, 1 << (m_rows - 1).bit_length()) // 8  # 2, 4 or 8
    qs = w.planes["qs"].contiguous().view(torch.uint8).numpy()
    qh = w.planes["qh"].contiguous().numpy() if "qh" in w.planes else None
    mult, off, subs = _scales(w)  # [N, scales]
    quads = k // 128
    ones = [((1.0, 1.0),) * 4] * 32  # A of the affine formats' S: every lane's four pairs
    y = np.zeros((m_rows, n))
    for blk in range(n // ROWS):
        part = np.zeros((warps, ROWS, m_rows))
        for sw in range(warps):
            q_lo, q_hi = quads * sw // warps, quads * (sw + 1) // warps
            acc = np.zeros((2, tiles, 32, 4))  # [16-row block][tile][lane][c0..c3]
            for gi in range(4 * q_lo, 4 * q_hi):
                # lane -> rows g + 8i -> the mmas' (codes, mult, add, x offset, sub-block)
                lanes = [[_codes(w.format, qs, qh, blk * ROWS + (lane >> 2) + 8 * i, gi,
                                 lane & 3) for i in range(4)] for lane in range(32)]
                for nt in range(tiles):
                    c, cs = np.zeros((2, subs, 32, 4)), np.zeros((32, 4))
                    for mi, (_, mul, add, xoff, sub) in enumerate(lanes[0][0]):
                        a, b = ([], []), []
                        for lane in range(32):
                            g, t = lane >> 2, lane & 3
                            for blk16 in range(2):
                                v0 = lanes[lane][2 * blk16][mi][0]
                                v1 = lanes[lane][2 * blk16 + 1][mi][0]
                                a[blk16].append((_pair(v0, mul, add, 0), _pair(v1, mul, add, 0),
                                                 _pair(v0, mul, add, 2), _pair(v1, mul, add, 2)))
                            row = 0 if one else 8 * nt + g
                            if row < m_rows:
                                at = 32 * gi + xoff + 4 * t
                                xs = x[row, at:at + 4]
                            else:
                                xs = np.zeros(4)
                            b.append(((xs[0], xs[1]), (xs[2], xs[3])))
                        _mma(c[0, sub], a[0], b)
                        _mma(c[1, sub], a[1], b)
                        if w.format in AFFINE:
                            _mma(cs, ones, b)
                    for lane in range(32):
                        g, t = lane >> 2, lane & 3
                        r0 = blk * ROWS + g
                        s = cs[lane, :2]  # the sums of x of columns 2t, 2t + 1 (ONE: row 0)
                        for blk16 in range(2):
                            ra, rb = r0 + 16 * blk16, r0 + 16 * blk16 + 8
                            for sub in range(subs):
                                si = gi * subs + sub
                                da, db = mult[ra, si], mult[rb, si]
                                oa, ob = off[ra, si], off[rb, si]
                                cc = c[blk16, sub, lane]
                                acc[blk16, nt, lane] += (da * cc[0] - oa * s[0],
                                                         da * cc[1] - oa * s[1],
                                                         db * cc[2] - ob * s[0],
                                                         db * cc[3] - ob * s[1])
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


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("m", "warps"), [(1, 2), (5, 3), (11, 2), (16, 8), (27, 3), (64, 2)])
def test_emulated_lanes_give_the_dequantized_matmul(fmt: str, m: int, warps: int) -> None:
    """32 x 512 (4 quads: 3 warps split them unevenly, 8 leave some idle; Q4_K: 2 super-blocks)
    at one row of x (x in all of B's columns), 5 (one B tile, 3 columns empty), 11 and 16 (two
    tiles), 27 (four tiles, the last partly empty) and 64 (eight)."""
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


def test_the_kernels_offsets_are_the_emulated_ones() -> None:
    """qmma.cu's `neg_offset` bf16 pairs are the offsets the emulation's `_codes` adds per format
    and nibble (low / high: the mmas of `prmt` base 0x43 / 0x45), and `step` gives the 0x43 mmas
    NL and the 0x45 ones NH: so a wrong constant or a swapped pair fails here, not only on a
    GPU."""
    src = qmma.SOURCE.read_text()
    body = src[src.index("HD unsigned neg_offset"):]
    body = body[:body.index("}")]
    words = [int(h, 16) for h in re.findall(r"0x([0-9A-F]{8})u", body)]
    assert all(w >> 16 == w & 0xFFFF for w in words)
    kernel = [float(np.array([(w & 0xFFFF) << 16], np.uint32).view(np.float32)[0])
              for w in words]  # Q4_0, Q5_0, Q6_K, Q8_0's high nibbles, in the function's order
    zeros = np.zeros((1, 64), np.uint8)
    adds = {f: {(mul, add) for _, mul, add, _, _ in _codes(f, zeros, zeros, 0, 0, 0)}
            for f in FORMATS}
    assert adds["q4_0"] == {(1, kernel[0])} and adds["q5_0"] == {(1, kernel[1])}
    assert adds["q6_k"] == {(1, kernel[2])} and adds["q8_0"] == {(1, 0.0), (16, kernel[3])}
    assert all(adds[f] == {(1, 0.0)} for f in AFFINE) and adds["int8"] == adds["q8_0"]
    calls = re.findall(r"mma<(0x4[35]), (N[LH])>", src)
    assert calls and all((base, n) in (("0x43", "NL"), ("0x45", "NH")) for base, n in calls)
    assert re.search(r"if \(affine\(F\)\) \{\s*mma_ones\(cs, xl\.x, xl\.y\);"
                     r"\s*mma_ones\(cs, xh\.x, xh\.y\);", src)


def test_the_rule() -> None:
    """Every format, N a multiple of 32 and K of 128; 4..16 rows everywhere, 2..3 where N >=
    3,072 (measured, H100); never 1 row or more than 16 (the 32- and 64-row kernels exist, but
    no GPU has run them yet)."""
    assert mma_rows("q4_0", 4, 2048, 8192) and mma_rows("q4_0", 8, 4096, 14336)
    assert mma_rows("q4_0", 2, 28672, 4096) and mma_rows("q4_0", 3, 3072, 2048)
    assert mma_rows("q4_0", 2, 4096, 4096) and mma_rows("q4_0", 2, 4096, 14336)
    assert not mma_rows("q4_0", 3, 2048, 2048) and not mma_rows("q4_0", 2, 2048, 8192)
    assert not mma_rows("q4_0", 1, 28672, 4096)
    assert all(mma_rows(f, m, 4096, 14336) for f in FORMATS for m in (9, 16))
    assert not mma_rows("q6_k", 17, 4096, 4096) and not mma_rows("q6_k", 1, 4096, 4096)
    assert all(mma_rows(f, 4, 28672, 4096) for f in FORMATS)
    assert not mma_rows("bf16", 4, 28672, 4096) and not mma_rows("q2_k", 4, 28672, 4096)
    assert not mma_rows("q4_0", 4, 28672 + 16, 4096) and not mma_rows("q4_0", 4, 4096, 4096 + 32)
    assert not mma_rows("q4_0", 4, 0, 4096) and not mma_rows("q4_0", 4, 4096, 0)
    assert [kernel_name("q4_0", m) for m in (1, 2, 8, 9, 16)] == [
        "q4_0_mma_m1", "q4_0_mma_m8", "q4_0_mma_m8", "q4_0_mma_m16", "q4_0_mma_m16"]
    assert kernel_name("q6_k", 4) == "q6_k_mma_m8"
    assert [kernel_name("q4_0", m) for m in (17, 32, 33, 64)] == [
        "q4_0_mma_m32", "q4_0_mma_m32", "q4_0_mma_m64", "q4_0_mma_m64"]
    with pytest.raises(ValueError, match="1..64 rows"):
        kernel_name("q4_0", 65)
    with pytest.raises(ValueError, match="weights, not q2_k"):
        kernel_name("q2_k", 4)
    assert kernel_name("q4_0", 16, glu=True) == "q4_0_mma_m16_glu"
    assert kernel_name("q4_0", 16, 2, glu=True) == "q4_0_mma_m16_glu"
    assert kernel_name("q8_0", 2, 2) == "q8_0_mma_m8_h2"
    assert kernel_name("q8_0", 2, split=True) == "q8_0_mma_m8_s"
    assert kernel_name("q8_0", 9, 2, True) == "q8_0_mma_m16_h2_s"
    for bad in ({"halves": 3}, {"halves": 1, "glu": True}, {"split": True, "glu": True}):
        with pytest.raises(ValueError, match="1 or 2 halves"):
            kernel_name("q4_0", 4, **bad)
    src = qmma.kernel_source("q6_k_mma_m16", 3)
    assert src.startswith("#define STAGES_N 3\n")
    assert src.endswith("KERNEL(q6_k_mma_m16, Q6_K, 2, 0, 1, 0, 0, 2)\n")
    glu = qmma.kernel_source("q4_0_mma_m8_glu", 2)
    assert glu.endswith("KERNEL(q4_0_mma_m8_glu, Q4_0, 1, 0, 2, 0, 1, 2)\n")
    both = qmma.kernel_source("q5_k_mma_m1_h2_s", 4)
    assert both.endswith("KERNEL(q5_k_mma_m1_h2_s, Q5_K, 1, 1, 2, 1, 0, 2)\n")
    with pytest.raises(ValueError, match="no tensor-core kernel is named q4_0_mma_m8_x"):
        qmma.kernel_source("q4_0_mma_m8_x", 2)
    assert kernel_name("q4_0", 8, occupancy=3) == "q4_0_mma_m8_o3"
    assert kernel_name("q8_0", 9, 1, True, occupancy=4) == "q8_0_mma_m16_s_o4"
    assert kernel_name("q4_0", 8, occupancy=qmma.OCCUPANCY) == "q4_0_mma_m8"
    assert kernel_name("q4_0", 64, occupancy=1) == "q4_0_mma_m64_o1"
    assert [qmma.occupancy_for(m) for m in (1, 16, 32, 33, 64)] == [2, 2, 2, 1, 1]
    with pytest.raises(ValueError, match="occupancy must be one of 2, 1, 3, 4, got 5"):
        kernel_name("q4_0", 8, occupancy=5)
    o3 = qmma.kernel_source("q4_0_mma_m16_glu_o3", 2)
    assert o3.endswith("KERNEL(q4_0_mma_m16_glu_o3, Q4_0, 2, 0, 2, 0, 1, 3)\n")
    with pytest.raises(ValueError, match="no tensor-core kernel is named q4_0_mma_m8_o3_o4"):
        qmma.kernel_source("q4_0_mma_m8_o3_o4", 2)


def test_splits_along_k() -> None:
    """On a 132-SM GPU only the down projections split: 8B (128 CTAs) in 2, 1B (64 CTAs) in 4;
    o and QKV (K < 2 N), gate_up and the LM head never; never a split without two quads of K for
    each warp; the rows of x do not change the count."""
    shapes = ((4096, 4096), (4096, 14336), (2048, 2048), (2048, 8192), (6144, 4096),
              (28672, 4096), (128256, 4096), (3072, 2048))
    for m in (2, 16):
        assert [qmma.k_splits(m, n, k, 132) for n, k in shapes] == [1, 2, 1, 4, 1, 1, 1, 1]
    assert qmma.k_splits(16, 64, 4096, 132, warps=4) == 4
    assert qmma.k_splits(16, 64, 1024, 132, warps=4) == 1
    assert qmma.k_splits(16, 64, 2048, 132, warps=4) == 2


def test_cta_halves() -> None:
    """On a 132-SM GPU CTAs of 64 rows only for the gate_up projections (8B 28,672 rows, 1B
    16,384: about two 64-row CTAs a SM or more); qkv, o, down, smaller shapes and N not a
    multiple of 64 (15,904) keep 32."""
    shapes = ((28672, 4096), (16384, 2048), (6144, 4096), (4096, 4096), (4096, 14336),
              (2048, 8192), (3072, 2048), (15808, 2048), (15904, 2048))
    for m in (2, 16):
        assert [qmma.cta_halves(m, n, k, 132) for n, k in shapes] == [2, 2] + [1] * 7


def test_cta_warps() -> None:
    """On a 132-SM GPU four warps only for launches of 9..16 rows over grids of two 32-row CTAs
    a SM or more without a split (the 8B and 1B LM heads, a gate/up product without the
    epilogue); 8 for qkv, o, down, the two-half launches and 8 rows or fewer."""
    shapes = ((128256, 4096), (128256, 2048), (28672, 4096), (16384, 2048), (6144, 4096),
              (4096, 4096), (4096, 14336), (2048, 8192), (3072, 2048), (8448, 4096))
    assert [qmma.cta_warps(16, n, k, 132) for n, k in shapes] == [4, 4, 4, 4] + [8] * 5 + [4]
    assert [qmma.cta_warps(9, n, k, 132) for n, k in shapes[:2]] == [4, 4]
    assert [qmma.cta_warps(8, n, k, 132) for n, k in shapes] == [8] * len(shapes)
    assert qmma.cta_warps(16, 28672, 4096, 132, halves=2) == 8
    assert qmma.cta_warps(16, 8416, 4096, 132) == 8  # 263 CTAs: under two a SM


def test_glu_epilogue_rule_and_refusals() -> None:
    """SiLU*up goes into the epilogue where the fused gate/up weight gets two halves and no
    split (8B and 1B gate_up on 132 SMs), not elsewhere; a launch asking for it with one half,
    a split or I not a multiple of 32 is refused by name."""
    assert qmma.glu_epilogue(2, 2 * 14336, 4096, 132)
    assert qmma.glu_epilogue(16, 2 * 8192, 2048, 132)
    assert not qmma.glu_epilogue(2, 2 * 1536, 576, 132)
    g = torch.Generator().manual_seed(3)
    x = torch.zeros(4, 2048, dtype=torch.bfloat16)
    w = random_quantized("q4_0", 128, 2048, g, "cpu")
    with pytest.raises(ValueError, match="glu .* two halves and one split, got halves 1"):
        qmma_matmul(x, w, glu=True, halves=1)
    with pytest.raises(ValueError, match="glu .* got halves None, splits 2"):
        qmma_matmul(x, w, glu=True, splits=2)
    with pytest.raises(ValueError, match=r"glu needs .* I % 32 == 0 .* got N = 96, 8 warps"):
        qmma_matmul(x, random_quantized("q4_0", 96, 2048, g, "cpu"), glu=True)


def test_shared_memory_of_a_launch() -> None:
    """The warps' partials (float32, rows of x padded to 1, 8 or 16), then the warps' rings: 8
    warps of 4 stages ~98 KB in Q4_0 at 8 rows, ~164 KB in Q8_0, within an H100's 227 KB;
    whatever K."""
    ring = 8 * 4 * (32 * 80 + 32 * 8)
    assert qmma.shared_bytes("q4_0", 4) == 4 * 8 * 32 * 8 + ring
    assert qmma.shared_bytes("q4_0", 1) == 4 * 8 * 32 + ring  # the partials [8][32][1]
    assert qmma.shared_bytes("q4_0", 16, warps=4, stages=2) == 4 * 4 * 32 * 16 + 4 * 2 * 2816
    assert qmma.shared_bytes("q8_0", 8) == 4 * 8 * 32 * 8 + 8 * 4 * (32 * 144 + 32 * 8)
    assert qmma.shared_bytes("q6_k", 8) == 4 * 8 * 32 * 8 + 8 * 4 * (32 * 112 + 32 * 8)
    assert qmma.shared_bytes("q5_1", 8) == 4 * 8 * 32 * 8 + 8 * 4 * (32 * 80 + 32 * 16)
    assert qmma.shared_bytes("q4_0", 17) == 4 * 8 * 32 * 32 + ring  # 32 rows (_m32)
    assert qmma.shared_bytes("q4_0", 64) == 4 * 8 * 32 * 64 + ring  # 64 rows (_m64)


def test_refusals_name_what_is_wrong() -> None:
    g = torch.Generator().manual_seed(5)
    w = random_quantized("q4_0", 64, 256, g, "cpu")
    x = torch.randn(4, 256, generator=g).to(torch.bfloat16)
    assert not qmma.qmma_runs(x, w)  # the CPU
    with pytest.raises(ValueError, match="bf16 x"):
        qmma_matmul(x.float(), w)
    with pytest.raises(ValueError, match=r"x \[M, 256\]"):
        qmma_matmul(x[:, :128], w)
    with pytest.raises(ValueError, match="weights, not q2_k"):
        qmma_matmul(x, SimpleNamespace(format="q2_k", shape=(64, 256), planes=w.planes))
    with pytest.raises(ValueError, match="N % 32"):
        qmma_matmul(x, random_quantized("q4_0", 48, 256, g, "cpu"))
    with pytest.raises(ValueError, match="warps must be 1..8"):
        qmma_matmul(x, w, warps=9)
    x2k = torch.zeros(4, 2048, dtype=torch.bfloat16)
    w2k = random_quantized("q4_0", 64, 2048, g, "cpu")
    with pytest.raises(ValueError, match=r"splits must be 1..2 .*K = 2048, 8 warps and 1 halves"):
        qmma_matmul(x2k, w2k, splits=3)
    with pytest.raises(ValueError, match=r"splits must be 1..4 .*K = 2048, 8 warps and 2 halves"):
        qmma_matmul(x2k, w2k, splits=5, halves=2)
    with pytest.raises(ValueError, match=r"halves must be 1 or 2, dividing the warps \(5\)"):
        qmma_matmul(x2k, w2k, warps=5, halves=2)
    with pytest.raises(ValueError, match=r"N / 32 \(N = 32\), got 2"):
        qmma_matmul(x2k, random_quantized("q4_0", 32, 2048, g, "cpu"), halves=2)
    unaligned = torch.empty(4 * 256 + 1, dtype=torch.bfloat16)[1:].view(4, 256)
    with pytest.raises(ValueError, match="aligned"):
        qmma_matmul(unaligned, w)
    with pytest.raises(ValueError, match="runs on one CUDA GPU: x is on cpu"):
        qmma_matmul(x, w)
    with pytest.raises(ValueError, match="runs on one CUDA GPU"):  # K = 256: no split, but 1
        qmma_matmul(x, w, splits=1)


GPU = pytest.mark.skipif(
    DEVICE == "cpu" or torch.version.cuda is None or torch.cuda.get_device_capability()[0] < 8,
    reason="the CUDA kernel needs an NVIDIA GPU of compute capability >= 8")


def _close_to_dequantized(y: torch.Tensor, x: torch.Tensor, w: QuantizedTensor) -> None:
    """y (bf16) is x @ dequantize(w).T up to its own rounding (2^-9 of the value) and float32
    sums (1e-3 of the largest value: issue 15's rule)."""
    ref = x.double() @ w.dequantize(torch.float64).T
    assert ((y.double() - ref).abs() <= ref.abs() * 2**-8 + 1e-3 * ref.abs().max()).all()


@GPU
@pytest.mark.parametrize("m", [1, 2, 3, 4, 7, 8, 9, 16, 17, 32, 45, 64])
@pytest.mark.parametrize(("fmt", "n", "k"), [
    *[(f, 64, 768 if f.endswith("_k") else 384) for f in FORMATS],
    *[(f, 3072, 2048) for f in FORMATS],
    ("q4_0", 4096, 14336), ("q4_k", 4096, 14336), ("q6_k", 4096, 14336), ("q8_0", 4096, 14336)])
def test_cuda_kernel_matches_the_dequantized_matmul(m: int, fmt: str, n: int, k: int) -> None:
    """Every row count (the kernels of 1, 8, 16, 32 and 64 rows, tiles partly empty); K of 3 / 6
    quads (8 warps: some without work) to the 8B down shape; PDL on and off give the same bits,
    as do repeated
    calls and 4 warps with a 2-deep ring against the defaults (warps add in a fixed order, but
    another warp count splits K elsewhere: close, not equal)."""
    g = torch.Generator().manual_seed(m * 7 + n)
    w = random_quantized(fmt, n, k, g)
    x = (torch.randn(m, k, generator=g) * 0.5).to(DEVICE, torch.bfloat16)
    y = qmma_matmul(x, w, pdl=False)
    assert y.shape == (m, n) and y.dtype == torch.bfloat16
    _close_to_dequantized(y, x, w)
    assert torch.equal(qmma_matmul(x, w, pdl=True), y) and torch.equal(qmma_matmul(x, w), y)
    _close_to_dequantized(qmma_matmul(x, w, warps=4, stages=2), x, w)


@GPU
@pytest.mark.parametrize("m", [1, 5, 16])
@pytest.mark.parametrize("fmt", ["q4_0", "q4_k", "q6_k", "q8_0", "q5_1"])
def test_cuda_split_k(m: int, fmt: str) -> None:
    """1..4 CTAs along K (the 8B down shape): each close to the dequantized matmul, the same
    bits call after call and with PDL on or off (the splits add in split order, whichever CTA
    comes last), the tile counters all zero after every launch, and a graph replayed with new x
    equal to the eager launch."""
    from llm.backends.torch.kernels.splitk import tile_counters

    g = torch.Generator().manual_seed(m * 5 + len(fmt))
    w = random_quantized(fmt, 4096, 14336, g)
    x = (torch.randn(m, 14336, generator=g) * 0.5).to(DEVICE, torch.bfloat16)
    for splits in (1, 2, 3, 4):
        y = qmma_matmul(x, w, splits=splits)
        _close_to_dequantized(y, x, w)
        for _ in range(3):
            assert torch.equal(qmma_matmul(x, w, splits=splits, pdl=False), y)
            assert torch.equal(qmma_matmul(x, w, splits=splits, pdl=True), y)
        torch.cuda.synchronize()
        assert not tile_counters(x.device, 128).any()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = qmma_matmul(x, w, splits=3)
    for _ in range(3):
        x.copy_((torch.randn(m, 14336, generator=g) * 0.5).to(DEVICE, torch.bfloat16))
        graph.replay()
        assert torch.equal(y, qmma_matmul(x, w, splits=3))
    torch.cuda.synchronize()
    assert not tile_counters(x.device, 128).any()


@GPU
@pytest.mark.parametrize("m", [2, 9, 16])
@pytest.mark.parametrize("fmt", ["q4_0", "q4_k", "q6_k", "q8_0", "q5_1"])
def test_cuda_two_halves(m: int, fmt: str) -> None:
    """CTAs of 64 rows (two halves of 32, four warps each) with and without split-K, on a wide
    shape (gate_up-like), a tall one (down-like) and K of two quads (fewer than a half's warps):
    each close to the dequantized matmul, the same bits call after call, the tile counters zero
    afterwards."""
    from llm.backends.torch.kernels.splitk import tile_counters

    g = torch.Generator().manual_seed(m * 7 + len(fmt))
    for n, k, splits in ((1024, 2048, 1), (512, 4096, 1), (512, 4096, 4), (128, 256, 1)):
        w = random_quantized(fmt, n, k, g)
        x = (torch.randn(m, k, generator=g) * 0.5).to(DEVICE, torch.bfloat16)
        y = qmma_matmul(x, w, splits=splits, halves=2)
        _close_to_dequantized(y, x, w)
        for _ in range(3):
            assert torch.equal(qmma_matmul(x, w, splits=splits, halves=2), y)
        torch.cuda.synchronize()
        assert not tile_counters(x.device, n // 32).any()


@GPU
@pytest.mark.parametrize("m", [2, 9, 16])
@pytest.mark.parametrize("fmt", ["q4_0", "q4_k", "q6_k", "q8_0", "q5_1"])
def test_cuda_silu_mul_epilogue(m: int, fmt: str, monkeypatch) -> None:
    """SiLU*up in the epilogue (glu) has the bits of the same launch's product then `silu_mul`
    (the same sums, the same instructions for the activation), with PDL on or off and in a
    replayed graph, for I a multiple of 64 and of 32 only (K of two quads); `qgemv_silu_mul`
    takes it exactly where `glu_epilogue` says so."""
    from llm.backends.torch.kernels import qgemv as qgemv_mod
    from llm.backends.torch.kernels.silu_mul import silu_mul

    g = torch.Generator().manual_seed(m * 11 + len(fmt))
    for n, k in ((2 * 1024, 2048), (2 * 96, 256)):
        w = random_quantized(fmt, n, k, g)
        x = (torch.randn(m, k, generator=g) * 0.5).to(DEVICE, torch.bfloat16)
        y = qmma_matmul(x, w, glu=True)
        assert y.shape == (m, n // 2)
        assert torch.equal(y, silu_mul(qmma_matmul(x, w, halves=2)))
        for pdl in (False, True):
            assert torch.equal(qmma_matmul(x, w, pdl=pdl, glu=True), y)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = qmma_matmul(x, w, glu=True)
    x.copy_((torch.randn(m, k, generator=g) * 0.5).to(DEVICE, torch.bfloat16))
    graph.replay()
    assert torch.equal(out, silu_mul(qmma_matmul(x, w, halves=2)))
    big = random_quantized(fmt, 2 * 8192, 2048, g)  # 1B's gate_up
    x = (torch.randn(m, 2048, generator=g) * 0.5).to(DEVICE, torch.bfloat16)
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    real, seen = qgemv_mod.qmma_matmul, []
    monkeypatch.setattr(qgemv_mod, "qmma_matmul",
                        lambda *a, **kw: seen.append(kw.get("glu", False)) or real(*a, **kw))
    qgemv_mod.qgemv_silu_mul(x, big)
    assert seen == [qmma.glu_epilogue(m, 2 * 8192, 2048, sms)]
    monkeypatch.setattr(qmma, "glu_epilogue", lambda *a, **kw: False)
    seen.clear()
    qgemv_mod.qgemv_silu_mul(x, big)
    assert seen == [False]


@GPU
@pytest.mark.parametrize("fmt", FORMATS)
def test_cuda_warps_of_the_rule(fmt: str) -> None:
    """Where `cta_warps` gives 4 warps (16 rows of x over a grid of two CTAs a SM), the default
    launch is the 4-warp one, bit for bit, and both the dequantized matmul; with 8 warps the same
    function (other sums, so only close); qgemv takes it."""
    g = torch.Generator().manual_seed(17 + len(fmt))
    sms = torch.cuda.get_device_properties(DEVICE).multi_processor_count
    n, k = 2 * sms * 32, 512
    w = random_quantized(fmt, n, k, g)
    for m in (9, 16):
        x = (torch.randn(m, k, generator=g) * 0.5).to(DEVICE, torch.bfloat16)
        assert qmma.cta_warps(m, n, k, sms) == qmma.NARROW_WARPS
        y = qmma_matmul(x, w)
        _close_to_dequantized(y, x, w)
        assert torch.equal(y, qmma_matmul(x, w, warps=qmma.NARROW_WARPS))
        assert torch.equal(qgemv(x, w), y)
        _close_to_dequantized(qmma_matmul(x, w, warps=qmma.WARPS), x, w)


@GPU
@pytest.mark.parametrize("fmt", ["q4_0", "q4_k"])
def test_cuda_occupancy_keeps_the_bits(fmt: str) -> None:
    """Registers fitted to 3 or 4 CTAs an SM (spills allowed) change no sum: the default
    kernel's bits at 8 and 16 rows, the epilogue's launch and split-K included; nor 2 where 64
    rows take 1 (`occupancy_for`)."""
    g = torch.Generator().manual_seed(23 + len(fmt))
    w = random_quantized(fmt, 512, 2048, g)
    for m, kw, occ in ((8, {}, 3), (8, {}, 4), (8, {"glu": True}, 3), (16, {}, 3),
                       (16, {"glu": True}, 3), (16, {"splits": 2}, 4), (64, {}, 2),
                       (40, {"splits": 2}, 2)):
        x = (torch.randn(m, 2048, generator=g) * 0.5).to(DEVICE, torch.bfloat16)
        assert torch.equal(qmma_matmul(x, w, occupancy=occ, **kw), qmma_matmul(x, w, **kw))


@GPU
def test_cuda_graph_replays_the_kernel() -> None:
    """Captured in a CUDA graph (PDL edges kept), replayed on new x: the eager bits."""
    g = torch.Generator().manual_seed(11)
    w = random_quantized("q4_0", 4096, 4096, g)
    x = torch.randn(4, 4096, generator=g).to(DEVICE, torch.bfloat16)
    qmma_matmul(x, w)  # compiled before the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = qmma_matmul(x, w)
    for _ in range(3):
        x.copy_(torch.randn(4, 4096, generator=g).to(DEVICE, torch.bfloat16))
        graph.replay()
        assert torch.equal(y, qmma_matmul(x, w))


@GPU
@pytest.mark.parametrize("fmt", FORMATS)
def test_cuda_qgemv_routes_by_the_rule(fmt: str) -> None:
    """qgemv and qgemv_silu_mul take the kernel where `mma_rows` says so (the same bits), and
    their Triton kernels elsewhere and for an x they cannot align."""
    g = torch.Generator().manual_seed(13)
    w = random_quantized(fmt, 3072, 2048, g)
    x = torch.randn(4, 2048, generator=g).to(DEVICE, torch.bfloat16)
    assert qmma.qmma_runs(x, w) and torch.equal(qgemv(x, w), qmma_matmul(x, w))
    assert torch.equal(qgemv_silu_mul(x, w), silu_mul(qmma_matmul(x, w)))
    assert not qmma.qmma_runs(x[:1], w)  # one row: the Triton kernel
    _close_to_dequantized(qgemv(x[:1], w), x[:1], w)
    unaligned = torch.empty(4 * 2048 + 1, dtype=torch.bfloat16, device=DEVICE)[1:].view(4, 2048)
    unaligned.copy_(x)
    assert not qmma.qmma_runs(unaligned, w)
    _close_to_dequantized(qgemv(unaligned, w), x, w)
    assert not qmma.qmma_runs(x, w, bias=torch.zeros(3072, device=DEVICE))


@GPU
@pytest.mark.parametrize("fmt", FORMATS)
def test_cuda_strided_planes_and_rows(fmt: str) -> None:
    """Views as the engine makes them: an LM-head chunk (`slice_rows`), a tensor-parallel shard of
    the columns (`slice_cols`: every plane's row stride longer than its width) and x rows longer
    than K (x a column slice of a wider buffer): the results of contiguous copies, bit for bit."""
    g = torch.Generator().manual_seed(17)
    w = random_quantized(fmt, 4096, 2048, g)
    buf = torch.randn(4, 2048 + 512, generator=g).to(DEVICE, torch.bfloat16)
    x = buf[:, 512:]  # row stride 2,560, 1,024 bytes in: aligned
    assert qmma.planes_aligned(x, w)
    dense = x.contiguous()
    for view in (w.slice_rows(1024, 3072), w.slice_cols(512, 1536), w):
        copy = QuantizedTensor(view.format, view.shape,
                               {k: t.contiguous() for k, t in view.planes.items()})
        xs = x[:, :view.shape[1]]
        assert torch.equal(qmma_matmul(xs, view), qmma_matmul(xs.contiguous(), copy))
    _close_to_dequantized(qmma_matmul(x, w), dense, w)
