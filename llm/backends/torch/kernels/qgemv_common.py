"""Pieces the quantized GEMV kernels share (kernels/qgemv.py, qgemv_words.py, qgemm_tc.py): the
format families and the planes each kernel pointer stands for, scale loads, the high code bits of
the Q5 / Q6_K `qh` planes, the per-group scaling in the order of each format's dequantize, and
where Triton can run."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import libdevice

# format family -> FMT id; int4_g<G> is Q4_1's formula with bf16 scales per G columns
FAMILIES = {"q8_0": 0, "q4_0": 1, "q4_1": 2, "q5_0": 3, "q5_1": 4, "q4_k": 5, "q5_k": 6,
            "q6_k": 7, "int8": 8}
INT4 = 9
# plane names the kernel's pointers qs, qh, d, m, sc, mn stand for, per family (None: unused)
PLANES = {"q4_k": ("qs", "qh", "d", "dmin", "scales", "mins"),
          "q5_k": ("qs", "qh", "d", "dmin", "scales", "mins"),
          "q6_k": ("qs", "qh", "d", None, "scales", None)}
DEFAULT_PLANES = ("qs", "qh", "d", "m", None, None)


@triton.jit
def mul_rn(a, b, COMPILED: tl.constexpr):
    """a * b rounded to fp32, never fused with a following add."""
    if COMPILED:
        return libdevice.mul_rn(a, b)
    return a * b


@triton.jit
def load_f32(ptr, rows, stride, idx, mask):
    """ptr[rows, idx] as float32 ([BLOCK_N, H] from rows [BLOCK_N, 1] and idx [1, H])."""
    return tl.load(ptr + rows * stride + idx, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def bit_planes(qh_ptr, rows3, s_qh, g3, half3, e3, mask, FMT: tl.constexpr):
    """Q5_* / Q6_K: the high code bits (shifted to bit 4) of columns 32g + 8*half + e ("lo") and
    those + 16 ("hi") of rows rows3, from the `qh` plane (llm.model.quant.bits), as int32 in the
    broadcast shape of the indices (the first kernel's lanes [BLOCK_N, H, 8], the tensor-core
    kernel's 16 columns [BLOCK_N, 16])."""
    if FMT == 7:  # Q6_K: byte 8g+e, bits 2s..2s+1 for column 32g+8s+e
        h = tl.load(qh_ptr + rows3 * s_qh + 8 * g3 + e3, mask=mask, other=0).to(tl.int32)
        s = 2 * half3
        return ((h >> s) & 3) << 4, ((h >> (s + 4)) & 3) << 4
    # Q5_*: byte 4g+j, bit t for column 32g+4j+t and bit 4+t for column 32g+16+4j+t; the lo
    # lane's column 8*half + e is in byte 2*half + e // 4, its hi lane's in the same byte
    b = tl.load(qh_ptr + rows3 * s_qh + 4 * g3 + 2 * half3 + e3 // 4, mask=mask,
                other=0).to(tl.int32)
    t = e3 % 4
    return ((b >> t) & 1) << 4, ((b >> (t + 4)) & 1) << 4


@triton.jit
def group_coeffs(rows2, g2, mask2, d_ptr, m_ptr, sc_ptr, mn_ptr, s_d, s_m, s_sc, s_mn,
                 FMT: tl.constexpr, GS: tl.constexpr):
    # rows2, g2: broadcastable row and 32-group indices of the sums
    """The two coefficients `scale_sums` applies to a group's sums, as float32 (loaded once
    however many rows of x share them): Q8_0 / Q4_0 / Q5_0 (f(d[g]), unused), Q4_K / Q5_K
    (f(d[s]) * f(sc[g]), f(dmin[s]) * f(mins[g])), Q6_K (f(d[s]) * f(sc) of each 16-column
    half), Q4_1 / Q5_1 / int4 (f(d), f(m)) of the group's scale block, int8 (d[n], unused)."""
    if FMT == 0 or FMT == 1 or FMT == 3:
        a = load_f32(d_ptr, rows2, s_d, g2, mask2)
        return a, a
    if FMT == 8:  # int8: one scale a row
        a = load_f32(d_ptr, rows2, s_d, 0 * g2, mask2)
        return a, a
    if FMT == 5 or FMT == 6:
        a = load_f32(d_ptr, rows2, s_d, g2 // 8, mask2) * load_f32(sc_ptr, rows2, s_sc, g2, mask2)
        c = load_f32(m_ptr, rows2, s_m, g2 // 8, mask2) * load_f32(mn_ptr, rows2, s_mn, g2,
                                                                     mask2)
        return a, c
    if FMT == 7:
        d = load_f32(d_ptr, rows2, s_d, g2 // 8, mask2)
        return (d * load_f32(sc_ptr, rows2, s_sc, 2 * g2, mask2),
                d * load_f32(sc_ptr, rows2, s_sc, 2 * g2 + 1, mask2))
    if FMT == 9:  # int4_g<GS>
        gi = (32 * g2) // GS
    else:
        gi = g2
    return load_f32(d_ptr, rows2, s_d, gi, mask2), load_f32(m_ptr, rows2, s_m, gi, mask2)


@triton.jit
def scale_sums(S, sx, a, c, FMT: tl.constexpr, COMPILED: tl.constexpr):
    """Sum over a group of x * w from S = sum x * q' (q' the code the format multiplies by its
    scale: q - 8 for Q4_0, q - 16 for Q5_0, the signed code for Q8_0, q for the rest) and sx =
    sum x (Q6_K: S, sx are the sums of x * (q - 32) over the two 16-column halves), with
    `group_coeffs`' a, c, in the order of the format's dequantize where x is one column's unit
    vector (so that one-hot x reads the exact weight back)."""
    if FMT == 0 or FMT == 1 or FMT == 3 or FMT == 8:  # f(d[g]) * q' (int8: q * d[n])
        return a * S
    if FMT == 5 or FMT == 6:  # (f(d[s]) * f(sc[g])) * q - f(dmin[s]) * f(mins[g])
        return mul_rn(a, S, COMPILED) - c * sx
    if FMT == 7:  # (f(d[s]) * f(sc)) * (q - 32), per half
        return a * S + c * sx
    return mul_rn(a, S, COMPILED) + c * sx  # Q4_1, Q5_1, int4: f(d[g]) * q + f(m[g])


@triton.jit
def group_scale(S, sx, rows2, g2, mask2, d_ptr, m_ptr, sc_ptr, mn_ptr, s_d, s_m, s_sc, s_mn,
                FMT: tl.constexpr, GS: tl.constexpr, COMPILED: tl.constexpr):
    """`scale_sums` with the group's coefficients loaded here (`group_coeffs`)."""
    a, c = group_coeffs(rows2, g2, mask2, d_ptr, m_ptr, sc_ptr, mn_ptr, s_d, s_m, s_sc, s_mn,
                        FMT, GS)
    return scale_sums(S, sx, a, c, FMT, COMPILED)


def family(fmt: str) -> tuple[int, int]:
    """(FMT id, columns per scale GS of int4_g<GS>; else 32)."""
    if fmt in FAMILIES:
        return FAMILIES[fmt], 32
    if fmt.startswith("int4_g"):
        return INT4, int(fmt[len("int4_g"):])
    raise ValueError(f"qgemv has no kernel for the format {fmt!r}")


def triton_runs(t: torch.Tensor) -> bool:
    """Whether the Triton kernel can run on t's device (a GPU, or the interpreter on the CPU)."""
    return t.device.type == "cuda" or bool(os.environ.get("TRITON_INTERPRET"))
