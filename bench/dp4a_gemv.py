"""One row of x times Q4_0 / Q8_0 weights by integer dot products (`dp4a`), x exact as three
byte planes: an exploration outside the engine (issue 15's 8B Q4_0 batch-1 target).

Why: on an H200 the one-row Triton kernel (kernels/qgemv_words_kernel.py) is bound by its SMs,
~3.6 instructions a weight, half of them turning each code into a float32 and multiplying it by
x (docs/performance.md, "Why 8B Q4_0 at batch 1 does not follow the bandwidth"). Here a weight
costs ~1.3: a 32-bit word of codes is 8 (Q4_0) or 4 (Q8_0) bytes, and `dp4a` multiplies four
byte pairs and adds them to an int32 in one instruction.

x stays exact. `x_planes` writes each 32-group of x as integers X = x / s, with s = 2^(e - 23)
for the group's largest |x| below 2^e, so |X| < 2^23, and splits X into three bytes: X = 65536 a
+ 256 b + c, a signed, b and c unsigned (three planes of K bytes). A bf16 x is an 8-bit integer
times a power of two, so X is x / s exactly for every value at least 2^-16 of the group's
largest; smaller ones lose the bits below s (truncated toward zero). Per group and row of w
three dp4a chains sum q * a, q * b and q * c exactly in int32 (Q4_0's offset: the chains start
at -8 times the group's sums of a, b and c, which `x_planes` writes), and
T = 65536 A + (256 B + C) is rounded once to float32; the row's sum is sum_g d_g * s_g * T_g.
So the result is the dequantized product's with each group's dot product exact before one
rounding: closer to it than float32 accumulation.

`dp4a_gemv` takes x's planes (made once per x, shared by every matrix that reads that x) and the
engine's Q4_0 / Q8_0 planes as stored. Tile [BLOCK_N, BLOCK_G, words]: threads along the groups
(each thread one group's x words in registers, reused for its rows), 128-bit loads of a group's
code words. Under the interpreter dp4a is computed from the bytes (the same integers).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from llm.backends.torch.kernels.pdl import launch_options, use_pdl, wait_then_release
from llm.model.quant.tensor import QuantizedTensor

FORMATS = {"q8_0": 0, "q4_0": 1}


@triton.jit
def _x_planes_kernel(x_ptr, p_ptr, s_ptr, sum_ptr, meta_ptr, K: tl.constexpr,
                     BLOCK_G: tl.constexpr, SPLIT: tl.constexpr):
    """Planes a, b, c of BLOCK_G 32-groups of x (bytes at p_ptr + plane * K + column; SPLIT: a
    plane's first K / 2 bytes the groups' columns 0..15, 16 bytes a group, then their columns
    16..31), each group's scale s (float32) and its sums of a, b, c (int32 at sum_ptr + plane *
    K / 32 + g), and `meta` [K / 32, 4] int32: -8 times the three sums and the bits of s."""
    NG: tl.constexpr = K // 32
    g = tl.program_id(0) * BLOCK_G + tl.arange(0, BLOCK_G)
    live = g < NG
    cols = 32 * g[:, None] + tl.arange(0, 32)[None, :]  # [G, 32]
    x = tl.load(x_ptr + cols, mask=live[:, None], other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=1)  # [G]
    eb = (amax.to(tl.int32, bitcast=True) >> 23) & 255  # biased exponent: amax < 2^(eb - 126)
    eb = tl.maximum(eb, 23)  # s at least 2^-126 (a normal float)
    inv = ((276 - eb) << 23).to(tl.float32, bitcast=True)  # 2^(149 - eb) = 1 / s
    s = ((eb - 22) << 23).to(tl.float32, bitcast=True)  # 2^(eb - 149)
    s = tl.where(eb == 255, float("nan"), s)  # an inf / nan in the group: the sums are nan
    X = (x * inv[:, None]).to(tl.int32)  # exact (an integer) down to 2^-16 of amax; |X| < 2^23
    X = tl.where(eb[:, None] == 255, 0, X)
    a = X >> 16  # signed, -128..127
    b = (X >> 8) & 255
    c = X & 255
    if SPLIT:
        k = tl.arange(0, 32)[None, :]
        at = (k >= 16) * (K // 2) + 16 * g[:, None] + k % 16
    else:
        at = cols
    tl.store(p_ptr + at, a.to(tl.int8).to(tl.uint8, bitcast=True), mask=live[:, None])
    tl.store(p_ptr + K + at, b.to(tl.uint8), mask=live[:, None])
    tl.store(p_ptr + 2 * K + at, c.to(tl.uint8), mask=live[:, None])
    sa, sb, sc = tl.sum(a, axis=1), tl.sum(b, axis=1), tl.sum(c, axis=1)
    tl.store(s_ptr + g, s, mask=live)
    tl.store(sum_ptr + g, sa, mask=live)
    tl.store(sum_ptr + NG + g, sb, mask=live)
    tl.store(sum_ptr + 2 * NG + g, sc, mask=live)
    tl.store(meta_ptr + 4 * g, -8 * sa, mask=live)
    tl.store(meta_ptr + 4 * g + 1, -8 * sb, mask=live)
    tl.store(meta_ptr + 4 * g + 2, -8 * sc, mask=live)
    tl.store(meta_ptr + 4 * g + 3, s.to(tl.int32, bitcast=True), mask=live)


def x_planes(x: torch.Tensor, block_g: int = 32) -> tuple[torch.Tensor, torch.Tensor,
                                                             torch.Tensor]:
    """x [1, K] (K a multiple of 32) -> (planes uint8 [3, K], scales float32 [K / 32], sums
    int32 [3, K / 32]), see the module docstring."""
    planes, scales, sums, _ = _planes(x, block_g, split=False)
    return planes, scales, sums


def x_planes_split(x: torch.Tensor, block_g: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """x [1, K] -> (planes uint8 [3, K] with each group's columns 0..15 in a plane's first half
    and 16..31 in its second, meta int32 [K / 32, 4]): `dp4a_gemv_split`'s x."""
    planes, _, _, meta = _planes(x, block_g, split=True)
    return planes, meta


def _planes(x: torch.Tensor, block_g: int, split: bool) -> tuple[torch.Tensor, ...]:
    if x.dim() != 2 or x.shape[0] != 1 or x.shape[1] % 32:
        raise ValueError(f"x_planes takes one row of x with K a multiple of 32, got "
                         f"{tuple(x.shape)}")
    k = x.shape[1]
    x = x.contiguous()
    planes = torch.empty(3, k, dtype=torch.uint8, device=x.device)
    scales = torch.empty(k // 32, dtype=torch.float32, device=x.device)
    sums = torch.empty(3, k // 32, dtype=torch.int32, device=x.device)
    meta = torch.empty(k // 32, 4, dtype=torch.int32, device=x.device)
    _x_planes_kernel[(triton.cdiv(k // 32, block_g),)](x, planes, scales, sums, meta, K=k,
                                                       BLOCK_G=block_g, SPLIT=split)
    return planes, scales, sums, meta


@triton.jit
def _bytes_dot(a, b, c, A_SIGNED: tl.constexpr, B_SIGNED: tl.constexpr):
    """c + sum over the 4 bytes of a * b (each signed or not): dp4a by integer arithmetic (the
    interpreter's path)."""
    for e in tl.static_range(4):
        ae = (a >> (8 * e)) & 255
        be = (b >> (8 * e)) & 255
        if A_SIGNED:
            ae = tl.where(ae >= 128, ae - 256, ae)
        if B_SIGNED:
            be = tl.where(be >= 128, be - 256, be)
        c = c + ae * be
    return c


@triton.jit
def _word_q4(w, xal, xah, xbl, xbh, xcl, xch, ia, ib, ic, COMPILED: tl.constexpr):
    """One word of Q4_0 codes (low nibbles: x words *l, high nibbles: *h) into the three
    chains ia, ib, ic (x's planes a, b, c)."""
    if COMPILED:
        return tl.inline_asm_elementwise(
            "{ .reg .b32 t, u; and.b32 t, $6, 0x0F0F0F0F; shr.u32 u, $6, 4; "
            "and.b32 u, u, 0x0F0F0F0F; "
            "dp4a.u32.s32 $0, t, $7, $3; dp4a.u32.s32 $0, u, $8, $0; "
            "dp4a.u32.u32 $1, t, $9, $4; dp4a.u32.u32 $1, u, $10, $1; "
            "dp4a.u32.u32 $2, t, $11, $5; dp4a.u32.u32 $2, u, $12, $2; }",
            "=r,=r,=r,r,r,r,r,r,r,r,r,r,r", [ia, ib, ic, w, xal, xah, xbl, xbh, xcl, xch],
            dtype=(tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)
    t = w & 0x0F0F0F0F
    u = (w >> 4) & 0x0F0F0F0F
    ia = _bytes_dot(u, xah, _bytes_dot(t, xal, ia, False, True), False, True)
    ib = _bytes_dot(u, xbh, _bytes_dot(t, xbl, ib, False, False), False, False)
    ic = _bytes_dot(u, xch, _bytes_dot(t, xcl, ic, False, False), False, False)
    return ia, ib, ic


@triton.jit
def _word_q8(w, xa, xb, xc, ia, ib, ic, COMPILED: tl.constexpr):
    """One word of Q8_0 codes (4 signed bytes) into the chains ia, ib, ic."""
    if COMPILED:
        return tl.inline_asm_elementwise(
            "{ dp4a.s32.s32 $0, $6, $7, $3; dp4a.s32.u32 $1, $6, $8, $4; "
            "dp4a.s32.u32 $2, $6, $9, $5; }",
            "=r,=r,=r,r,r,r,r,r,r,r", [ia, ib, ic, w, xa, xb, xc],
            dtype=(tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)
    return (_bytes_dot(w, xa, ia, True, True), _bytes_dot(w, xb, ib, True, False),
            _bytes_dot(w, xc, ic, True, False))


@triton.jit
def _split4(v):
    """[A, B, 4] -> its 4 entries along the last dim, in order."""
    e, o = tl.split(tl.reshape(v, [v.shape[0], v.shape[1], 2, 2]))  # entries (0, 2), (1, 3)
    v0, v2 = tl.split(e)
    v1, v3 = tl.split(o)
    return v0, v1, v2, v3


@triton.jit
def _split8(v):
    """[A, B, 8] -> its 8 entries along the last dim, in order."""
    e, o = tl.split(tl.reshape(v, [v.shape[0], v.shape[1], 4, 2]))  # (0, 2, 4, 6), (1, 3, 5, 7)
    v0, v2, v4, v6 = _split4(e)
    v1, v3, v5, v7 = _split4(o)
    return v0, v1, v2, v3, v4, v5, v6, v7


@triton.jit
def _group_dots(qw_ptr, rows, s_qw, pw_ptr, g, live, n_live, init_a, init_b, init_c,
                FMT: tl.constexpr, KW: tl.constexpr, COMPILED: tl.constexpr):
    """Per row and group of the chunk: T = 65536 A + 256 B + C as float32, [BLOCK_N, G]."""
    WPG: tl.constexpr = 8 if FMT == 0 else 4
    g3 = g[None, :, None]  # [1, G, 1]
    mask3 = n_live[:, None, None] & live[None, :, None]
    js = tl.arange(0, WPG)[None, None, :]
    w = tl.load(qw_ptr + rows[:, None, None] * s_qw + WPG * g3 + js, mask=mask3, other=0)
    x8 = tl.arange(0, 8)[None, None, :]
    xmask = live[None, :, None]
    xa = tl.load(pw_ptr + 8 * g3 + x8, mask=xmask, other=0)  # [1, G, 8] words of plane a
    xb = tl.load(pw_ptr + KW + 8 * g3 + x8, mask=xmask, other=0)
    xc = tl.load(pw_ptr + 2 * KW + 8 * g3 + x8, mask=xmask, other=0)
    a0, a1, a2, a3, a4, a5, a6, a7 = _split8(xa)
    b0, b1, b2, b3, b4, b5, b6, b7 = _split8(xb)
    c0, c1, c2, c3, c4, c5, c6, c7 = _split8(xc)
    ia = init_a
    ib = init_b
    ic = init_c
    if FMT == 0:  # Q8_0: word j = columns 4j .. 4j + 3
        w0, w1, w2, w3, w4, w5, w6, w7 = _split8(w)
        ia, ib, ic = _word_q8(w0, a0, b0, c0, ia, ib, ic, COMPILED)
        ia, ib, ic = _word_q8(w1, a1, b1, c1, ia, ib, ic, COMPILED)
        ia, ib, ic = _word_q8(w2, a2, b2, c2, ia, ib, ic, COMPILED)
        ia, ib, ic = _word_q8(w3, a3, b3, c3, ia, ib, ic, COMPILED)
        ia, ib, ic = _word_q8(w4, a4, b4, c4, ia, ib, ic, COMPILED)
        ia, ib, ic = _word_q8(w5, a5, b5, c5, ia, ib, ic, COMPILED)
        ia, ib, ic = _word_q8(w6, a6, b6, c6, ia, ib, ic, COMPILED)
        ia, ib, ic = _word_q8(w7, a7, b7, c7, ia, ib, ic, COMPILED)
    else:  # Q4_0: word j = columns 4j + e (low nibbles), 16 + 4j + e (high nibbles)
        w0, w1, w2, w3 = _split4(w)
        ia, ib, ic = _word_q4(w0, a0, a4, b0, b4, c0, c4, ia, ib, ic, COMPILED)
        ia, ib, ic = _word_q4(w1, a1, a5, b1, b5, c1, c5, ia, ib, ic, COMPILED)
        ia, ib, ic = _word_q4(w2, a2, a6, b2, b6, c2, c6, ia, ib, ic, COMPILED)
        ia, ib, ic = _word_q4(w3, a3, a7, b3, b7, c3, c7, ia, ib, ic, COMPILED)
    return ia.to(tl.float32) * 65536.0 + (ib * 256 + ic).to(tl.float32)


@triton.jit
def _dp4a_gemv_kernel(pw_ptr, s_ptr, sum_ptr, y_ptr, qw_ptr, d_ptr, N, s_qw, s_d,
                      K: tl.constexpr, FMT: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_G: tl.constexpr, COMPILED: tl.constexpr, USE_GDC: tl.constexpr):
    """y[0, n0:n0 + BLOCK_N] for n0 = program * BLOCK_N: sum over groups of d * s * T."""
    NG: tl.constexpr = K // 32
    KW: tl.constexpr = K // 4  # words a plane
    ns = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_live = ns < N
    gl = tl.arange(0, BLOCK_G)
    acc = tl.zeros([BLOCK_N, BLOCK_G], tl.float32)
    wait_then_release(USE_GDC)
    for g0 in range(0, NG, BLOCK_G):
        g = g0 + gl
        live = g < NG
        if FMT == 1:  # the chains start at -8 times the group's sums of a, b, c
            init_a = -8 * tl.load(sum_ptr + g, mask=live, other=0)[None, :]
            init_b = -8 * tl.load(sum_ptr + NG + g, mask=live, other=0)[None, :]
            init_c = -8 * tl.load(sum_ptr + 2 * NG + g, mask=live, other=0)[None, :]
        else:
            init_a = tl.zeros([1, BLOCK_G], tl.int32)
            init_b = init_a
            init_c = init_a
        T = _group_dots(qw_ptr, ns, s_qw, pw_ptr, g, live, n_live, init_a, init_b, init_c,
                        FMT, KW, COMPILED)  # [BLOCK_N, G]
        d = tl.load(d_ptr + ns[:, None] * s_d + g[None, :],
                    mask=n_live[:, None] & live[None, :], other=0.0).to(tl.float32)
        s = tl.load(s_ptr + g, mask=live, other=0.0)[None, :]
        acc += T * (d * s)
    out = tl.sum(acc, axis=1)  # [BLOCK_N]
    tl.store(y_ptr + ns, out.to(y_ptr.dtype.element_ty), mask=n_live)


def _outputs(p: torch.Tensor, w: QuantizedTensor, dtype: torch.dtype
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """(y [1, N] to write, w's codes as int32 words, its scales d, compiled) for planes p of x;
    interpreted, y is float32 (the interpreter truncates float32 -> bf16)."""
    k = w.in_features
    if p.shape != (3, k):
        raise ValueError(f"x's planes are for K = {p.shape[1]}, w has {k} columns")
    compiled = not os.environ.get("TRITON_INTERPRET")
    y = torch.empty(1, w.out_features, dtype=dtype if compiled else torch.float32,
                    device=p.device)
    return y, w.planes["qs"].view(torch.uint8).view(torch.int32), w.planes["d"], compiled


def dp4a_gemv(planes: tuple[torch.Tensor, torch.Tensor, torch.Tensor], w: QuantizedTensor,
              dtype: torch.dtype = torch.bfloat16, block_n: int = 16, block_g: int = 32,
              num_warps: int = 4, pdl: bool | None = None) -> torch.Tensor:
    """x @ w.dequantize().T for x given as `x_planes(x)`, -> [1, N] in `dtype`; w Q4_0 or Q8_0."""
    if w.format not in FORMATS:
        raise ValueError(f"dp4a_gemv takes {sorted(FORMATS)}, got {w.format}")
    p, scales, sums = planes
    y, qw, d, compiled = _outputs(p, w, dtype)
    k = w.in_features
    gdc = use_pdl(p, pdl)
    _dp4a_gemv_kernel[(triton.cdiv(w.out_features, block_n),)](
        p.view(torch.int32), scales, sums, y, qw, d, w.out_features, qw.stride(0), d.stride(0),
        K=k, FMT=FORMATS[w.format], BLOCK_N=block_n, BLOCK_G=block_g, COMPILED=compiled,
        USE_GDC=gdc, num_warps=num_warps, **launch_options(gdc))
    return y.to(dtype)


@triton.jit
def _dp4a_gemv_split_kernel(xw_ptr, meta_ptr, y_ptr, qw_ptr, d_ptr, N, s_qw, s_d,
                            K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr,
                            COMPILED: tl.constexpr, USE_GDC: tl.constexpr,
                            PREFETCH: tl.constexpr = False):
    """Q4_0 with x's split planes: every [.., 4 G] load is a group's 16 bytes a thread (codes,
    each plane's low and high columns, the group's meta), so the threads spread over the
    groups alike and x's words need no exchange between them. PREFETCH: the first chunk's codes
    loaded before waiting on the previous kernel, each next chunk's before this one's
    arithmetic (two chunks of codes in registers; Triton pipelines none of these loads)."""
    NG: tl.constexpr = K // 32
    HW: tl.constexpr = K // 8  # words of a plane's half
    ns = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_live = ns < N
    ws = tl.arange(0, 4 * BLOCK_G)  # a chunk's words: group ws // 4, word ws % 4
    acc = tl.zeros([BLOCK_N, BLOCK_G], tl.float32)
    rows = qw_ptr + ns[:, None] * s_qw
    if PREFETCH:  # the codes depend on no kernel: in flight during the previous one's tail
        w_next = tl.load(rows + ws[None, :], mask=n_live[:, None] & (ws < 4 * NG)[None, :],
                         other=0)
    wait_then_release(USE_GDC)
    for g0 in range(0, NG, BLOCK_G):
        wi = 4 * g0 + ws
        live = wi < 4 * NG
        if PREFETCH:
            w = w_next
            nxt = wi + 4 * BLOCK_G
            w_next = tl.load(rows + nxt[None, :], mask=n_live[:, None] & (nxt < 4 * NG)[None, :],
                             other=0)
        else:
            w = tl.load(rows + wi[None, :], mask=n_live[:, None] & live[None, :],
                        other=0)  # [BLOCK_N, 4G]
        w0, w1, w2, w3 = _split4(tl.reshape(w, [BLOCK_N, BLOCK_G, 4]))
        xs = ()
        for p in tl.static_range(6):  # plane p // 2, half p % 2
            v = tl.load(xw_ptr + p * HW + wi, mask=live, other=0)[None, :]  # [1, 4G]
            xs = xs + _split4(tl.reshape(v, [1, BLOCK_G, 4]))
        m = tl.load(meta_ptr + wi, mask=live, other=0)[None, :]
        ia, ib, ic, s_bits = _split4(tl.reshape(m, [1, BLOCK_G, 4]))
        ia, ib, ic = _word_q4(w0, xs[0], xs[4], xs[8], xs[12], xs[16], xs[20], ia, ib, ic,
                              COMPILED)
        ia, ib, ic = _word_q4(w1, xs[1], xs[5], xs[9], xs[13], xs[17], xs[21], ia, ib, ic,
                              COMPILED)
        ia, ib, ic = _word_q4(w2, xs[2], xs[6], xs[10], xs[14], xs[18], xs[22], ia, ib, ic,
                              COMPILED)
        ia, ib, ic = _word_q4(w3, xs[3], xs[7], xs[11], xs[15], xs[19], xs[23], ia, ib, ic,
                              COMPILED)
        T = ia.to(tl.float32) * 65536.0 + (ib * 256 + ic).to(tl.float32)  # [BLOCK_N, G]
        g = g0 + tl.arange(0, BLOCK_G)
        d = tl.load(d_ptr + ns[:, None] * s_d + g[None, :],
                    mask=n_live[:, None] & (g < NG)[None, :], other=0.0).to(tl.float32)
        acc += T * (d * s_bits.to(tl.float32, bitcast=True))
    out = tl.sum(acc, axis=1)  # [BLOCK_N]
    tl.store(y_ptr + ns, out.to(y_ptr.dtype.element_ty), mask=n_live)


def dp4a_gemv_split(planes: tuple[torch.Tensor, torch.Tensor], w: QuantizedTensor,
                    dtype: torch.dtype = torch.bfloat16, block_n: int = 16, block_g: int = 32,
                    num_warps: int = 4, pdl: bool | None = None,
                    prefetch: bool = False) -> torch.Tensor:
    """x @ w.dequantize().T for x given as `x_planes_split(x)`, -> [1, N] in `dtype`; w Q4_0
    (prefetch: the kernel's PREFETCH)."""
    if w.format != "q4_0":
        raise ValueError(f"dp4a_gemv_split takes q4_0, got {w.format}")
    p, meta = planes
    y, qw, d, compiled = _outputs(p, w, dtype)
    k = w.in_features
    gdc = use_pdl(p, pdl)
    _dp4a_gemv_split_kernel[(triton.cdiv(w.out_features, block_n),)](
        p.view(torch.int32), meta, y, qw, d, w.out_features, qw.stride(0), d.stride(0), K=k,
        BLOCK_N=block_n, BLOCK_G=block_g, COMPILED=compiled, USE_GDC=gdc, PREFETCH=prefetch,
        num_warps=num_warps, **launch_options(gdc))
    return y.to(dtype)
