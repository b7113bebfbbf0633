"""The words kernel's arithmetic on one chunk (kernels/qgemv_words_kernel.py): 32-bit words of
codes to float32 codes, x's 64-bit words to float32 values, and their per-group sums.

Codes become float32 2^23 + q, or with MAGIC 0.5 + q / 256 (8-bit codes: 2^15 + 128 + q; all
exact, and so are their products with x, except 8-bit codes times an fp16 x (16 + 11 significant
bits, rounded to float32's 24); MAGIC trades the per-code unbiasing for one sum of x per group
and row of x, shared by the rows of w), by byte permutes where
compiled (`_codes4`, `_codes8`, `_bytes4`); Q5_* and Q6_K first OR in their high bits from `qh`
(`_codes5`, `_codes6`). `decode_chunk` picks the format's path, `x_values` converts one row of
x, and `chunk_sums` forms what `scale_sums` scales: per group and row of w, the sum of x times
the codes less the format's bias, and the sum of x.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _x_words(xw_ptr, idx, mask, XF16: tl.constexpr, COMPILED: tl.constexpr):
    """64-bit words of x (4 bf16 / fp16 values each) at idx -> the 4 values as float32."""
    v = tl.load(xw_ptr + idx, mask=mask, other=0)
    if COMPILED:
        if XF16:
            return tl.inline_asm_elementwise(
                "{ .reg .b32 a, b; .reg .b16 h0, h1, h2, h3; mov.b64 {a, b}, $4; "
                "mov.b32 {h0, h1}, a; mov.b32 {h2, h3}, b; cvt.f32.f16 $0, h0; "
                "cvt.f32.f16 $1, h1; cvt.f32.f16 $2, h2; cvt.f32.f16 $3, h3; }",
                "=r,=r,=r,=r,l", [v], dtype=(tl.float32,) * 4, is_pure=True, pack=1)
        return tl.inline_asm_elementwise(
            "{ .reg .b32 a, b; mov.b64 {a, b}, $4; shl.b32 $0, a, 16; "
            "and.b32 $1, a, 0xFFFF0000; shl.b32 $2, b, 16; and.b32 $3, b, 0xFFFF0000; }",
            "=r,=r,=r,=r,l", [v], dtype=(tl.float32,) * 4, is_pure=True, pack=1)
    out = ()
    for e in tl.static_range(4):
        bits = ((v >> (16 * e)) & 0xFFFF).to(tl.uint32)
        if XF16:
            out = out + (bits.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32),)
        else:
            out = out + ((bits << 16).to(tl.float32, bitcast=True),)
    return out


@triton.jit
def _codes4(w, MAGIC: tl.constexpr, COMPILED: tl.constexpr):
    """A 32-bit word of 4-bit codes (bytes b0..b3: low nibbles lo_e, high nibbles hi_e) ->
    (lo_0..lo_3, hi_0..hi_3) as float32 2^23 + q (exact), or with MAGIC 0.5 + q / 256 (exact)."""
    if COMPILED:
        if MAGIC:
            return tl.inline_asm_elementwise(
                "{ .reg .b32 t, u; and.b32 t, $8, 0x0F0F0F0F; shr.u32 u, $8, 4; "
                "and.b32 u, u, 0x0F0F0F0F; "
                "prmt.b32 $0, t, 0x3F000000, 0x7044; prmt.b32 $1, t, 0x3F000000, 0x7144; "
                "prmt.b32 $2, t, 0x3F000000, 0x7244; prmt.b32 $3, t, 0x3F000000, 0x7344; "
                "prmt.b32 $4, u, 0x3F000000, 0x7044; prmt.b32 $5, u, 0x3F000000, 0x7144; "
                "prmt.b32 $6, u, 0x3F000000, 0x7244; prmt.b32 $7, u, 0x3F000000, 0x7344; }",
                "=r,=r,=r,=r,=r,=r,=r,=r,r", [w], dtype=(tl.float32,) * 8, is_pure=True, pack=1)
        return tl.inline_asm_elementwise(
            "{ .reg .b32 t, u; and.b32 t, $8, 0x0F0F0F0F; shr.u32 u, $8, 4; "
            "and.b32 u, u, 0x0F0F0F0F; "
            "prmt.b32 $0, t, 0x4B000000, 0x7540; prmt.b32 $1, t, 0x4B000000, 0x7541; "
            "prmt.b32 $2, t, 0x4B000000, 0x7542; prmt.b32 $3, t, 0x4B000000, 0x7543; "
            "prmt.b32 $4, u, 0x4B000000, 0x7540; prmt.b32 $5, u, 0x4B000000, 0x7541; "
            "prmt.b32 $6, u, 0x4B000000, 0x7542; prmt.b32 $7, u, 0x4B000000, 0x7543; }",
            "=r,=r,=r,=r,=r,=r,=r,=r,r", [w], dtype=(tl.float32,) * 8, is_pure=True, pack=1)
    out = ()
    for s in tl.static_range(2):
        for e in tl.static_range(4):
            q = ((w >> (8 * e + 4 * s)) & 15).to(tl.float32)
            if MAGIC:
                out = out + (0.5 + q / 256.0,)
            else:
                out = out + (q + 8388608.0,)
    return out


@triton.jit
def _codes8(w, MAGIC: tl.constexpr, COMPILED: tl.constexpr):
    """A 32-bit word of 4 int8 codes c_e -> float32 2^23 + 128 + c_e, or with MAGIC 2^15 + 128
    + c_e (both exact; the latter times a bf16 x is exact too, 8 + 16 significant bits, times an
    fp16 x rounded once, 11 + 16)."""
    if COMPILED:
        if MAGIC:
            return tl.inline_asm_elementwise(
                "{ .reg .b32 t; xor.b32 t, $4, 0x80808080; "
                "prmt.b32 $0, t, 0x47000000, 0x7504; prmt.b32 $1, t, 0x47000000, 0x7514; "
                "prmt.b32 $2, t, 0x47000000, 0x7524; prmt.b32 $3, t, 0x47000000, 0x7534; }",
                "=r,=r,=r,=r,r", [w], dtype=(tl.float32,) * 4, is_pure=True, pack=1)
        return tl.inline_asm_elementwise(
            "{ .reg .b32 t; xor.b32 t, $4, 0x80808080; "
            "prmt.b32 $0, t, 0x4B000000, 0x7540; prmt.b32 $1, t, 0x4B000000, 0x7541; "
            "prmt.b32 $2, t, 0x4B000000, 0x7542; prmt.b32 $3, t, 0x4B000000, 0x7543; }",
            "=r,=r,=r,=r,r", [w], dtype=(tl.float32,) * 4, is_pure=True, pack=1)
    out = ()
    for e in tl.static_range(4):
        c = (((w >> (8 * e)) & 255) ^ 128).to(tl.float32)
        out = out + (c + (32768.0 if MAGIC else 8388608.0),)
    return out


@triton.jit
def _bytes4(t, MAGIC: tl.constexpr, COMPILED: tl.constexpr):
    """A 32-bit word of 4 byte codes c_e < 128 -> float32 2^23 + c_e (exact), or with MAGIC
    0.5 + c_e / 256 (exact)."""
    if COMPILED:
        if MAGIC:
            return tl.inline_asm_elementwise(
                "{ prmt.b32 $0, $4, 0x3F000000, 0x7044; prmt.b32 $1, $4, 0x3F000000, 0x7144; "
                "prmt.b32 $2, $4, 0x3F000000, 0x7244; prmt.b32 $3, $4, 0x3F000000, 0x7344; }",
                "=r,=r,=r,=r,r", [t], dtype=(tl.float32,) * 4, is_pure=True, pack=1)
        return tl.inline_asm_elementwise(
            "{ prmt.b32 $0, $4, 0x4B000000, 0x7540; prmt.b32 $1, $4, 0x4B000000, 0x7541; "
            "prmt.b32 $2, $4, 0x4B000000, 0x7542; prmt.b32 $3, $4, 0x4B000000, 0x7543; }",
            "=r,=r,=r,=r,r", [t], dtype=(tl.float32,) * 4, is_pure=True, pack=1)
    out = ()
    for e in tl.static_range(4):
        c = ((t >> (8 * e)) & 255).to(tl.float32)
        if MAGIC:
            out = out + (0.5 + c / 256.0,)
        else:
            out = out + (c + 8388608.0,)
    return out


@triton.jit
def _codes6(w, h, js, MAGIC: tl.constexpr, COMPILED: tl.constexpr):
    """Q6_K: word j of a group's 4-bit codes w and the group's 2-bit word h = qh word j % 2 ->
    (lo_0..lo_3, hi_0..hi_3), the 6-bit codes q of columns 4j + e and 16 + 4j + e as float32
    2^23 + q, or with MAGIC 0.5 + q / 256 (exact). Byte e of h holds bits 4-5 of the codes of
    columns 8s + 4(j % 2) + e in bits 2s, 2s + 1 (s = 0..3): s = j // 2 for lo, 2 + j // 2 for
    hi."""
    hq = h >> (2 * (js // 2))  # [.., WPG]: lo's bits at 0-1, hi's at 4-5 of each byte
    lo = (w & 0x0F0F0F0F) | ((hq << 4) & 0x30303030)
    hi = ((w >> 4) & 0x0F0F0F0F) | (hq & 0x30303030)
    l0, l1, l2, l3 = _bytes4(lo, MAGIC, COMPILED)
    h0, h1, h2, h3 = _bytes4(hi, MAGIC, COMPILED)
    return l0, l1, l2, l3, h0, h1, h2, h3


@triton.jit
def _codes5(w, h, MAGIC: tl.constexpr, COMPILED: tl.constexpr):
    """Q5_0 / Q5_1 / Q5_K: word j of a group's 4-bit codes w and byte j of its `qh` bits h
    (llm.model.quant.bits: bit e = bit 4 of column 4j + e, bit 4 + e of column 16 + 4j + e) ->
    (lo_0..lo_3, hi_0..hi_3), the 5-bit codes q of columns 4j + e and 16 + 4j + e as float32
    2^23 + q, or with MAGIC 0.5 + q / 256 (exact). A nibble of h moves to bit 4 of bytes 0..3
    by one multiply (bit e by 4 + 7e places: the four shifted copies do not overlap, so nothing
    carries)."""
    b = h.to(tl.int32)
    lo_bits = (b & 15) * 0x02040810  # bit e at 8e + 4
    hi_bits = (b >> 4) * 0x02040810
    lo = (w & 0x0F0F0F0F) | (lo_bits & 0x10101010)
    hi = ((w >> 4) & 0x0F0F0F0F) | (hi_bits & 0x10101010)
    l0, l1, l2, l3 = _bytes4(lo, MAGIC, COMPILED)
    h0, h1, h2, h3 = _bytes4(hi, MAGIC, COMPILED)
    return l0, l1, l2, l3, h0, h1, h2, h3


@triton.jit
def decode_chunk(w, h, js, FMT: tl.constexpr, MAGIC: tl.constexpr, COMPILED: tl.constexpr):
    """A chunk's code words w (and Q5 / Q6_K's high bits h) -> 8 float32 tensors [G, BLOCK_N,
    WPG], the codes each row of x multiplies: Q8_0 words j: columns 4j + e, c - 128, or with
    MAGIC 2^15 + c (the last four repeat the first, unused); the rest: columns 4j + e (lo) and
    16 + 4j + e (hi), as the code q' less the format's bias (Q4_0 8, Q5_0 16, Q6_K 32), or with
    MAGIC 0.5 + q / 256 (see `chunk_sums`)."""
    if FMT == 0 or FMT == 8:  # int8 codes: word j = columns 4j .. 4j + 3
        c0, c1, c2, c3 = _codes8(w, MAGIC, COMPILED)
        if not MAGIC:  # with MAGIC, 2^15 + 128 + c: `chunk_sums` takes the offset off
            off: tl.constexpr = 8388736.0  # 2^23 + 128
            c0, c1, c2, c3 = c0 - off, c1 - off, c2 - off, c3 - off
        return c0, c1, c2, c3, c0, c1, c2, c3
    if FMT == 7:  # Q6_K: 6-bit codes
        l0, l1, l2, l3, h0, h1, h2, h3 = _codes6(w, h, js, MAGIC, COMPILED)
        off6: tl.constexpr = 8388640.0  # 2^23 + 32
    elif FMT == 3 or FMT == 4 or FMT == 6:  # Q5_*: 5-bit codes
        l0, l1, l2, l3, h0, h1, h2, h3 = _codes5(w, h, MAGIC, COMPILED)
        if FMT == 3:
            off6: tl.constexpr = 8388624.0  # 2^23 + 16
        else:
            off6: tl.constexpr = 8388608.0  # 2^23
    else:
        l0, l1, l2, l3, h0, h1, h2, h3 = _codes4(w, MAGIC, COMPILED)
        if FMT == 1:
            off6: tl.constexpr = 8388616.0  # 2^23 + 8
        else:
            off6: tl.constexpr = 8388608.0  # 2^23
    if not MAGIC:  # codes 2^23 + q: unbias each (exact)
        l0, l1, l2, l3 = l0 - off6, l1 - off6, l2 - off6, l3 - off6
        h0, h1, h2, h3 = h0 - off6, h1 - off6, h2 - off6, h3 - off6
    return l0, l1, l2, l3, h0, h1, h2, h3


@triton.jit
def x_values(xrow, xmask, FMT: tl.constexpr, XF16: tl.constexpr, COMPILED: tl.constexpr):
    """One row of x at a chunk's groups as 8 float32 tensors [G, 1, WPG]: the values of x's
    64-bit words 8g + j (lo) and 8g + 4 + j (hi) of group g (Q8_0: the words 8g + j only,
    returned twice). xrow: the row's words at [G, 1, WPG] offsets."""
    xl0, xl1, xl2, xl3 = _x_words(xrow, 0, xmask, XF16, COMPILED)
    if FMT == 0 or FMT == 8:
        xh0, xh1, xh2, xh3 = xl0, xl1, xl2, xl3
    else:
        xh0, xh1, xh2, xh3 = _x_words(xrow + 4, 0, xmask, XF16, COMPILED)
    return xl0, xl1, xl2, xl3, xh0, xh1, xh2, xh3


@triton.jit
def chunk_sums(xl0, xl1, xl2, xl3, xh0, xh1, xh2, xh3, l0, l1, l2, l3, h0, h1, h2, h3,
          FMT: tl.constexpr, MAGIC: tl.constexpr):
    """One row of x (`x_values`) against a chunk's decoded codes (`decode_chunk`): per group and row
    of w, (S, sx) for `scale_sums`, [G, BLOCK_N] and [G, 1] (Q6_K: the two halves' sums, [G,
    BLOCK_N] each)."""
    if FMT == 0 or FMT == 8:  # (one return statement: the branches' results differ in shape)
        S = tl.sum(xl0 * l0 + xl1 * l1 + xl2 * l2 + xl3 * l3, axis=2)  # [G, BLOCK_N]
        sx = S  # Q8_0 has no offset: unused
        if MAGIC:  # codes 2^15 + 128 + c: sum x * c = S - (2^15 + 128) * sum x
            S = S - 32896.0 * tl.sum(xl0 + xl1 + xl2 + xl3, axis=2)
    elif FMT == 7:
        S = tl.sum(xl0 * l0 + xl1 * l1 + xl2 * l2 + xl3 * l3, axis=2)  # [G, BLOCK_N]: lo half
        sx = tl.sum(xh0 * h0 + xh1 * h1 + xh2 * h2 + xh3 * h3, axis=2)  # hi half
        if MAGIC:  # codes 0.5 + q / 256: sum x * (q - 32) = 256 * S - 160 * sum x
            S = 256.0 * S - 160.0 * tl.sum(xl0 + xl1 + xl2 + xl3, axis=2)
            sx = 256.0 * sx - 160.0 * tl.sum(xh0 + xh1 + xh2 + xh3, axis=2)
    else:
        S = tl.sum(xl0 * l0 + xl1 * l1 + xl2 * l2 + xl3 * l3 + xh0 * h0 + xh1 * h1
                   + xh2 * h2 + xh3 * h3, axis=2)  # [G, BLOCK_N]
        sx = tl.sum(xl0 + xl1 + xl2 + xl3 + xh0 + xh1 + xh2 + xh3, axis=2)  # [G, 1]
        if MAGIC:  # codes 0.5 + q / 256: sum x * q' = 256 * S - (128 + bias) * sum x
            if FMT == 1:
                S = 256.0 * S - 136.0 * sx
            elif FMT == 3:
                S = 256.0 * S - 144.0 * sx
            else:
                S = 256.0 * S - 128.0 * sx
    return S, sx
