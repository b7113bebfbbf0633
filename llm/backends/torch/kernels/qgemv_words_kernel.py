"""The v2 quantized GEMV's Triton kernel (`_qgemv_w_kernel`) and its helpers; the launch,
the formats it takes and its epilogue targets are in kernels/qgemv_words.py.

Each thread owns whole halves of 32-groups of several rows of w, so x is converted once per thread
and the group scale is applied once per group sum; several rows of x (up to 4) share each decoded
code, one accumulator a row. The per-chunk arithmetic (codes to float32, x to float32, the group
sums) is kernels/qgemv_words_decode.py's; the group scales are kernels/qgemv_common.py's.
"""

from __future__ import annotations

import triton
import triton.language as tl

from llm.backends.torch.kernels.norm import add_rms_norm_row
from llm.backends.torch.kernels.pdl import wait_then_release
from llm.backends.torch.kernels.qgemv_common import group_coeffs, scale_sums
from llm.backends.torch.kernels.qgemv_words_decode import chunk_sums, decode_chunk, x_values


@triton.jit
def _rotated(a, b, c, d, XF16: tl.constexpr, COMPILED: tl.constexpr):
    """a * b + c * d as transformers' RoPE computes q * cos + rotate_half(q) * sin in bf16 / fp16:
    each product rounded to the activation dtype, their sum in float32 (returned; the caller
    rounds it). Inline PTX on the GPU: with FP fusion on, the compiler turned the expression into
    one fused multiply-add in bf16 (a single rounding of the product and sum), 1 ulp off in about
    a fifth of the values."""
    if COMPILED:
        if XF16:
            return tl.inline_asm_elementwise(
                "{ .reg .f32 p, q; .reg .b16 hp, hq; mul.rn.f32 p, $1, $2; mul.rn.f32 q, $3, $4; "
                "cvt.rn.f16.f32 hp, p; cvt.rn.f16.f32 hq, q; cvt.f32.f16 p, hp; "
                "cvt.f32.f16 q, hq; add.rn.f32 $0, p, q; }",
                "=f,f,f,f,f", [a, b, c, d], dtype=tl.float32, is_pure=True, pack=1)
        return tl.inline_asm_elementwise(
            "{ .reg .f32 p, q; .reg .b16 hp, hq; mul.rn.f32 p, $1, $2; mul.rn.f32 q, $3, $4; "
            "cvt.rn.bf16.f32 hp, p; cvt.rn.bf16.f32 hq, q; cvt.f32.bf16 p, hp; "
            "cvt.f32.bf16 q, hq; add.rn.f32 $0, p, q; }",
            "=f,f,f,f,f", [a, b, c, d], dtype=tl.float32, is_pure=True, pack=1)
    dt = tl.float16 if XF16 else tl.bfloat16
    return (a * b).to(dt).to(tl.float32) + (c * d).to(dt).to(tl.float32)


@triton.jit
def _chunk_high(qh_ptr, rows3, s_qh, g0, gl, js, n_live, NG: tl.constexpr, FMT: tl.constexpr):
    """The high code bits the code words of `_chunk_codes` need, [BLOCK_G, BLOCK_N, 4]. Q6_K:
    32-bit word 2g + j % 2 of `qh` (8 bytes a group) for code word j of group g; Q5_*: byte 4g +
    j (4 bytes a group), an index of the codes' own pattern, so the load takes their register
    layout (a per-group word shared by the 4 code words took another on Triton 3.6, and the
    decoded words went through shared memory)."""
    g3 = (g0 + gl)[:, None, None]  # [G, 1, 1]
    if FMT == 7:
        widx = tl.max_contiguous(2 * g3 + js % 2, [1, 1, 2])
    else:
        widx = tl.max_contiguous(4 * g3 + js, [1, 1, 2])
    return tl.load(qh_ptr + rows3 * s_qh + widx, mask=(g3 < NG) & n_live[None, :, None],
                   other=0)


@triton.jit
def _chunk_codes(qw_ptr, rows3, s_qw, g0, gl, js, n_live, NG: tl.constexpr, WPG: tl.constexpr):
    """Code words of 32-groups g0 .. g0 + BLOCK_G - 1 of the program's rows, [BLOCK_G, BLOCK_N,
    WPG] (zero past the last group); at most 2 words per load, as x's 64-bit words, so that
    both get one register layout."""
    g3 = (g0 + gl)[:, None, None]  # [G, 1, 1]
    widx = tl.max_contiguous(WPG * g3 + js, [1, 1, 2])
    return tl.load(qw_ptr + rows3 * s_qw + widx, mask=(g3 < NG) & n_live[None, :, None],
                   other=0)


@triton.jit
def _row_chunk(acc, xrow, xmask, a, c, l0, l1, l2, l3, h0, h1, h2, h3, FMT: tl.constexpr,
               MAGIC: tl.constexpr, XF16: tl.constexpr, COMPILED: tl.constexpr):
    """acc [G, BLOCK_N] plus one more row of x's scaled group sums of a chunk (the rows after
    the first, whose coefficients a, c the first loaded)."""
    xl0, xl1, xl2, xl3, xh0, xh1, xh2, xh3 = x_values(xrow, xmask, FMT, XF16, COMPILED)
    S, sx = chunk_sums(xl0, xl1, xl2, xl3, xh0, xh1, xh2, xh3, l0, l1, l2, l3, h0, h1, h2, h3,
                       FMT, MAGIC)
    return acc + scale_sums(S, sx, a, c, FMT, COMPILED)


@triton.jit
def _store_row(y_row, acc, b_ptr, ns, n_live, tile, N, HALF: tl.constexpr, GLU: tl.constexpr,
               HAS_BIAS: tl.constexpr):
    """One row's result: the sum of its accumulator over the groups (+ bias) stored at y_row;
    with GLU, silu(gate) * up, rounded as F.linear's output, then as kernels/silu_mul.py."""
    out = tl.sum(acc, axis=0)  # [BLOCK_N]
    if HAS_BIAS:
        out += tl.load(b_ptr + ns, mask=n_live, other=0.0).to(tl.float32)
    out_ty = y_row.dtype.element_ty
    if GLU:
        gate, up = tl.split(tl.reshape(out.to(out_ty).to(tl.float32), [HALF, 2]))  # [HALF]
        act = (gate / (1.0 + tl.exp(-gate))).to(out_ty).to(tl.float32)
        cols = tile * HALF + tl.arange(0, HALF)
        tl.store(y_row + cols, (act * up).to(out_ty), mask=cols < N)
    else:
        tl.store(y_row + ns, out.to(out_ty), mask=n_live)


@triton.jit
def _tile_rows(tile, N, UP_ROW, BLOCK_N: tl.constexpr, GLU: tl.constexpr, ROPE: tl.constexpr,
               HEAD_DIM: tl.constexpr):
    """The rows of w that row tile `tile` of `_qgemv_w_kernel` takes, and which of them exist:
    ns, n_live [BLOCK_N] (GLU, ROPE: pairs of rows, see the kernel)."""
    r = tl.arange(0, BLOCK_N)
    HALF: tl.constexpr = BLOCK_N // 2
    HD2: tl.constexpr = HEAD_DIM // 2
    if GLU:  # program row 2i + s: gate row (s = 0) or up row (s = 1) of output n0 + i
        n_live = tile * HALF + r // 2 < N
        ns = tile * HALF + r // 2 + (r % 2) * UP_ROW
    elif ROPE:  # program row 2i + s: column d + s * hd / 2 of the head of pair tile * HALF + i
        pair = tile * HALF + r // 2
        n_live = pair < N // 2
        ns = (pair // HD2) * HEAD_DIM + pair % HD2 + (r % 2) * HD2
    else:
        ns = tile * BLOCK_N + r
        n_live = ns < N
    return ns, n_live


@triton.jit
def _qgemv_w_kernel(xw_ptr, y_ptr, b_ptr, qw_ptr, qh_ptr, d_ptr, m_ptr, sc_ptr, mn_ptr, N, UP_ROW,
                    s_xw, s_y, s_qw, s_qh, s_d, s_m, s_sc, s_mn, cos_ptr, sin_ptr, blocks_ptr,
                    offsets_ptr, k_pool, v_pool, s_kp, s_kh, s_kt, nres_ptr, nw_ptr, nout_ptr,
                    nsum_ptr, cnt_ptr, eps, s_nr, s_no, s_ns, K: tl.constexpr,
                    FMT: tl.constexpr, GS: tl.constexpr, M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_G: tl.constexpr, MAGIC: tl.constexpr, PREFETCH: tl.constexpr,
                    GLU: tl.constexpr, ROPE: tl.constexpr, N_HEADS: tl.constexpr,
                    N_KV: tl.constexpr, HEAD_DIM: tl.constexpr, XF16: tl.constexpr,
                    HAS_BIAS: tl.constexpr, COMPILED: tl.constexpr, USE_GDC: tl.constexpr,
                    STAGES: tl.constexpr = 1, TILES: tl.constexpr = 1,
                    NORM: tl.constexpr = False, NORM_N: tl.constexpr = 1,
                    NBLOCK: tl.constexpr = 1):
    """y[r, n0:n0 + BLOCK_N] for n0 = tile * BLOCK_N and the M (1..4) rows r of x; with GLU,
    y[r, n0:n0 + BLOCK_N / 2] = silu(gate) * up for n0 = tile * BLOCK_N / 2, where rows UP_ROW
    + n of w are the up rows of gate row n. Program p takes the row tiles p * TILES .. p * TILES
    + TILES - 1 in turn.

    A chunk is BLOCK_G whole 32-groups of BLOCK_N rows of w: [BLOCK_G, BLOCK_N, WPG] 32-bit
    words of codes (WPG = 4 words of 4-bit codes, 8 of int8 per group), the groups as dim 0 so
    that threads spread over groups and each thread's rows of w share its x values. Word j of a
    group holds columns 4j + e (low nibbles, or the int8 bytes) and 16 + 4j + e (high nibbles),
    e = 0..3, whose x values are the 64-bit words 8g + j and 8g + 4 + j of x ([BLOCK_G, 1, WPG],
    the same register layout). Codes become float32 exactly, once for all rows of x; per group
    and row of x the sum of x times code is scaled once (`scale_sums`; Q6_K: per 16-column half;
    the scales loaded once a chunk, Q5 / Q6_K's `qh` words loaded and prefetched beside the
    codes).
    Each row of x has its own accumulator and the per-group arithmetic of a one-row launch; the
    order of the final sums follows the register layout the compiler picks, which may differ
    with M (on an H200 some shapes gave other last bits than one-row launches).

    ROPE (M = 1, the fused QKV weight of one token, see `qgemv_words(rope=)`): tile row 2i + s
    is column d (s = 0) or d + HEAD_DIM / 2 (s = 1) of a head, for pair p = UP_ROW + tile *
    BLOCK_N / 2 + i = head * HEAD_DIM / 2 + d (UP_ROW: the pair of the fused QKV that w's first
    two rows are, 0 unless w is a row block of it); the epilogue rotates the query and key pairs
    as kernels/rope_kv.py does and stores q to y, K and V into the token's page slot.

    PREFETCH: the first chunk's codes are loaded before waiting on the previous kernel (they
    depend on none; with PDL they stream during its tail), and each next chunk's codes (the
    same tile's next chunk along K, else the next tile's first) before the current chunk's
    arithmetic (two chunks of codes in registers). STAGES > 1 (without PREFETCH): Triton
    pipelines the chunk loop instead, its loads staged in shared memory by cp.async, STAGES - 1
    chunks ahead (no registers held by the chunks in flight; compiled for sm_90 with Triton
    3.9: cp.async present; at 1 the code is that of a plain loop). TILES > 1 where K is one
    chunk: the first row of x is read once into registers for all the program's tiles (each
    program of a one-tile launch reads x whole: 8B gate_up Q8_0, 7,168 programs, ~57 MB of L2
    reads beside 122 MB of codes).

    NORM (y's N = NORM_N columns a whole hidden row, not GLU / ROPE): after storing y, each
    program counts itself in cnt_ptr; the last to arrive adds y and the residual (nres_ptr) and
    RMS-normalises the sum with the weight nw_ptr as kernels/norm.py does (the same function,
    `add_rms_norm_row`): the sum into nsum_ptr, the normalised row into nout_ptr, every row of
    x; then it resets the counter. The next norm without a launch of its own."""
    WPG: tl.constexpr = 8 if FMT == 0 or FMT == 8 else 4
    NG: tl.constexpr = K // 32
    HAS_QH: tl.constexpr = FMT == 7 or FMT == 3 or FMT == 4 or FMT == 6  # high bits in `qh`
    HOIST: tl.constexpr = TILES > 1  # one chunk (the caller checks): x's first row read once
    pid = tl.program_id(0)
    HALF: tl.constexpr = BLOCK_N // 2
    HD2: tl.constexpr = HEAD_DIM // 2
    ns, n_live = _tile_rows(pid * TILES, N, UP_ROW, BLOCK_N, GLU, ROPE, HEAD_DIM)
    rows3 = ns[None, :, None]  # [1, BLOCK_N, 1]
    gl = tl.arange(0, BLOCK_G)
    js = tl.arange(0, WPG)[None, None, :]  # [1, 1, WPG]
    if PREFETCH:
        w_next = _chunk_codes(qw_ptr, rows3, s_qw, 0, gl, js, n_live, NG, WPG)
        if HAS_QH:
            h_next = _chunk_high(qh_ptr, rows3, s_qh, 0, gl, js, n_live, NG, FMT)
    wait_then_release(USE_GDC)
    if HOIST:
        gx = gl[:, None, None]  # [G, 1, 1]
        xk0, xk1, xk2, xk3, xk4, xk5, xk6, xk7 = x_values(xw_ptr + 8 * gx + js, gx < NG, FMT,
                                                           XF16, COMPILED)
    for t in tl.static_range(TILES):
        tile = pid * TILES + t
        if t > 0:
            ns, n_live = _tile_rows(tile, N, UP_ROW, BLOCK_N, GLU, ROPE, HEAD_DIM)
            rows3 = ns[None, :, None]
        rows2 = ns[None, :]
        acc0 = tl.zeros([BLOCK_G, BLOCK_N], tl.float32)
        acc1 = tl.zeros([BLOCK_G, BLOCK_N], tl.float32)
        acc2 = tl.zeros([BLOCK_G, BLOCK_N], tl.float32)
        acc3 = tl.zeros([BLOCK_G, BLOCK_N], tl.float32)
        for g0 in tl.range(0, NG, BLOCK_G, num_stages=STAGES):
            if PREFETCH:
                w = w_next
                h = w  # Q5 / Q6_K's high-bit words (unused by the other formats)
                if HAS_QH:
                    h = h_next
                if NG > BLOCK_G:  # several chunks: the next one's codes in flight
                    w_next = _chunk_codes(qw_ptr, rows3, s_qw, g0 + BLOCK_G, gl, js, n_live, NG,
                                          WPG)
                    if HAS_QH:
                        h_next = _chunk_high(qh_ptr, rows3, s_qh, g0 + BLOCK_G, gl, js, n_live,
                                             NG, FMT)
                elif t + 1 < TILES:  # one chunk: the next tile's codes in flight
                    ns1, live1 = _tile_rows(tile + 1, N, UP_ROW, BLOCK_N, GLU, ROPE, HEAD_DIM)
                    rows1 = ns1[None, :, None]
                    w_next = _chunk_codes(qw_ptr, rows1, s_qw, 0, gl, js, live1, NG, WPG)
                    if HAS_QH:
                        h_next = _chunk_high(qh_ptr, rows1, s_qh, 0, gl, js, live1, NG, FMT)
            else:
                w = _chunk_codes(qw_ptr, rows3, s_qw, g0, gl, js, n_live, NG, WPG)
                h = w
                if HAS_QH:
                    h = _chunk_high(qh_ptr, rows3, s_qh, g0, gl, js, n_live, NG, FMT)
            g1 = g0 + gl  # [G]
            g2 = g1[:, None]  # [G, 1]
            g3 = g1[:, None, None]  # [G, 1, 1]
            mask2 = (g2 < NG) & n_live[None, :]  # [G, BLOCK_N]
            xrow = xw_ptr + 8 * g3 + js  # [G, 1, WPG]
            xmask = g3 < NG
            if HOIST:
                xl0, xl1, xl2, xl3, xh0, xh1, xh2, xh3 = xk0, xk1, xk2, xk3, xk4, xk5, xk6, xk7
            else:
                xl0, xl1, xl2, xl3, xh0, xh1, xh2, xh3 = x_values(xrow, xmask, FMT, XF16,
                                                                   COMPILED)
            l0, l1, l2, l3, h0, h1, h2, h3 = decode_chunk(w, h, js, FMT, MAGIC, COMPILED)
            S, sx = chunk_sums(xl0, xl1, xl2, xl3, xh0, xh1, xh2, xh3, l0, l1, l2, l3, h0, h1,
                               h2, h3, FMT, MAGIC)
            a, c = group_coeffs(rows2, g2, mask2, d_ptr, m_ptr, sc_ptr, mn_ptr, s_d, s_m, s_sc,
                                s_mn, FMT, GS)
            acc0 += scale_sums(S, sx, a, c, FMT, COMPILED)
            if M > 1:
                acc1 = _row_chunk(acc1, xrow + s_xw, xmask, a, c, l0, l1, l2, l3, h0, h1, h2,
                                  h3, FMT, MAGIC, XF16, COMPILED)
            if M > 2:
                acc2 = _row_chunk(acc2, xrow + 2 * s_xw, xmask, a, c, l0, l1, l2, l3, h0, h1, h2,
                                  h3, FMT, MAGIC, XF16, COMPILED)
            if M > 3:
                acc3 = _row_chunk(acc3, xrow + 3 * s_xw, xmask, a, c, l0, l1, l2, l3, h0, h1, h2,
                                  h3, FMT, MAGIC, XF16, COMPILED)
        if ROPE:  # rounded as F.linear's output, then rotated as kernels/rope_kv.py
            out = tl.sum(acc0, axis=0)  # [BLOCK_N]
            if HAS_BIAS:
                out += tl.load(b_ptr + ns, mask=n_live, other=0.0).to(tl.float32)
            out_ty = y_ptr.dtype.element_ty
            f1, f2 = tl.split(tl.reshape(out.to(out_ty).to(tl.float32), [HALF, 2]))  # [HALF]
            pair = tile * HALF + tl.arange(0, HALF)
            live = pair < N // 2
            head = (pair + UP_ROW) // HD2  # ROPE: UP_ROW is the fused QKV's pair of w's row 0
            d = (pair + UP_ROW) % HD2
            c1 = tl.load(cos_ptr + d).to(tl.float32)
            c2 = tl.load(cos_ptr + d + HD2).to(tl.float32)
            s1 = tl.load(sin_ptr + d).to(tl.float32)
            s2 = tl.load(sin_ptr + d + HD2).to(tl.float32)
            o1 = _rotated(f1, c1, -f2, s1, XF16, COMPILED)
            o2 = _rotated(f2, c2, f1, s2, XF16, COMPILED)
            is_q = head < N_HEADS
            is_v = head >= N_HEADS + N_KV
            o1 = tl.where(is_v, f1, o1).to(out_ty)  # V: as computed
            o2 = tl.where(is_v, f2, o2).to(out_ty)
            q_at = y_ptr + head * HEAD_DIM + d
            tl.store(q_at, o1, mask=live & is_q)
            tl.store(q_at + HD2, o2, mask=live & is_q)
            kvh = tl.where(is_v, head - N_HEADS - N_KV, head - N_HEADS)
            slot = tl.load(blocks_ptr) * s_kp + kvh * s_kh + tl.load(offsets_ptr) * s_kt + d
            is_k = live & ~is_q & ~is_v
            tl.store(k_pool + slot, o1, mask=is_k)
            tl.store(k_pool + slot + HD2, o2, mask=is_k)
            tl.store(v_pool + slot, o1, mask=live & is_v)
            tl.store(v_pool + slot + HD2, o2, mask=live & is_v)
        else:
            _store_row(y_ptr, acc0, b_ptr, ns, n_live, tile, N, HALF, GLU, HAS_BIAS)
            if M > 1:
                _store_row(y_ptr + s_y, acc1, b_ptr, ns, n_live, tile, N, HALF, GLU, HAS_BIAS)
            if M > 2:
                _store_row(y_ptr + 2 * s_y, acc2, b_ptr, ns, n_live, tile, N, HALF, GLU,
                           HAS_BIAS)
            if M > 3:
                _store_row(y_ptr + 3 * s_y, acc3, b_ptr, ns, n_live, tile, N, HALF, GLU,
                           HAS_BIAS)
    if NORM:
        tl.debug_barrier()  # every thread's part of y is stored before the release below
        if tl.atomic_add(cnt_ptr, 1, sem="acq_rel", scope="gpu") == tl.num_programs(0) - 1:
            for r in tl.static_range(M):
                add_rms_norm_row(y_ptr + r * s_y, nres_ptr + r * s_nr, nw_ptr,
                                 nout_ptr + r * s_no, nsum_ptr + r * s_ns, eps, NORM_N, NBLOCK,
                                 True, True)
            tl.store(cnt_ptr, 0)
