"""The quantized GEMM for batches above the one-row kernel's rows (up to 16): Q8_0 / Q4_0 weights
dequantized in registers, one tensor-core dot chain over K.

A step's 32-groups become their exact float32 values (code times scale, as
`QuantizedTensor.dequantize(float32)`), each written as a sum of bf16 matrices, every piece the
rounding of what the pieces before it leave: two pieces hold a Q4_0 weight exactly (at most 14
significant bits), three a Q8_0 one (at most 18). The tensor cores multiply bf16 exactly into
float32, so the pieces' products with x, summed into one float32 accumulator that stays in the
tensor cores over the whole K loop, give dequantize-then-matmul up to accumulation order. The
tensor-core kernel before it (kernels/qgemm_tc.py) multiplied each group's exact codes and scaled
the group's sum after its dot: a chain of short dots with a round trip through registers per
group (docs/performance.md, "Batches of 16 on bf16 weights dequantized in registers"). `pieces=1`
(the bench's comparison only) multiplies the weights rounded once to bf16 instead: the values
the prefill path hands to cuBLAS. Split-K as kernels/splitk.py.

Byte i of a group's 16 Q4_0 bytes holds column i in its low nibble and 16 + i in its high one, so
a step's low nibbles meet x's columns 32g + i and its high nibbles 32g + 16 + i: two dot chains a
step over the same codes. Q8_0 is read as the same two halves of each group.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from llm.backends.torch.kernels.pdl import launch_options, use_pdl, wait_then_release
from llm.backends.torch.kernels.qgemv_common import family
from llm.backends.torch.kernels.splitk import split_groups, split_sum, tile_counters
from llm.model.quant.tensor import QuantizedTensor

EXACT_PIECES = {"q8_0": 3, "q4_0": 2}  # bf16 pieces that hold a weight exactly


@triton.jit
def _bf16(v, COMPILED: tl.constexpr):
    """float32 v rounded to bfloat16 (to nearest, ties to even). Compiled: the cast. The
    interpreter truncates float32 -> bfloat16 and its tl.dot misreads bfloat16 operands, so there
    the rounding is done on the bits and the value stays float32."""
    if COMPILED:  # (one return: the branches' types differ)
        out = v.to(tl.bfloat16)
    else:
        bits = v.to(tl.uint32, bitcast=True)
        out = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
    return out


@triton.jit
def _pieces_dot(acc, w, xv, PIECES: tl.constexpr, COMPILED: tl.constexpr):
    """acc + w @ xv with w (float32) as the sum of PIECES bf16 matrices, each the rounding of
    what the pieces before it leave (the remainder is exact in float32)."""
    rest = w
    for i in tl.static_range(PIECES):
        piece = _bf16(rest, COMPILED)
        acc = tl.dot(piece, xv, acc)
        if i + 1 < PIECES:
            rest = rest - piece.to(tl.float32)
    return acc


@triton.jit
def _scaled(c, d3, OFF: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr):
    """Codes c (int32 0..255, [BLOCK_N, GROUPS * 16]) less OFF, times their group's scale d3
    (float32 [BLOCK_N, GROUPS, 1]): exact in float32 (at most 8 x 11 significant bits)."""
    f = (c | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + OFF)  # 2^23 + c - 2^23 - OFF
    return tl.reshape(tl.reshape(f, [BLOCK_N, GROUPS, 16]) * d3, [BLOCK_N, GROUPS * 16])


@triton.jit
def _qgemm_dq_kernel(x_ptr, y_ptr, b_ptr, qs_ptr, d_ptr, p_ptr, cnt_ptr, M, N, stride_x,
                     stride_y, s_qs, s_d, K: tl.constexpr, FMT: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr,
                     STAGES: tl.constexpr, SPLITS: tl.constexpr, SPLIT_G: tl.constexpr,
                     K_TAIL: tl.constexpr, PIECES: tl.constexpr, HAS_BIAS: tl.constexpr,
                     COMPILED: tl.constexpr, USE_GDC: tl.constexpr):
    """y[:, n0:n0 + BLOCK_N] (n0 = program * BLOCK_N) for up to BLOCK_M (>= 16) rows of x:
    GROUPS 32-groups a step dequantized in registers and multiplied on the tensor cores into one
    float32 accumulator, as PIECES bf16 matrices (`_pieces_dot`). K_TAIL: the program's groups
    are not whole steps (masked loads). SPLITS > 1: program (pid, s) sums groups s * SPLIT_G up
    to the next split's first; the tile's last program adds the partials in split order
    (kernels/splitk.py)."""
    NG: tl.constexpr = K // 32
    pid = tl.program_id(0)
    if SPLITS == 1:
        g_lo = 0
        g_hi = NG
    else:
        g_lo = tl.program_id(1) * SPLIT_G
        g_hi = tl.minimum(g_lo + SPLIT_G, NG)
    ns = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_live = ns < N
    rows = ns[:, None]  # [BLOCK_N, 1]
    jb = tl.arange(0, GROUPS * 16)  # a step's half-group lanes: group jb // 16, lane jb % 16
    kl = 32 * (jb // 16) + jb % 16  # the column lane jb's low half meets, from the step's first
    gi = tl.arange(0, GROUPS)
    ms = tl.arange(0, BLOCK_M)
    xmask = (ms < M)[None, :]  # [1, BLOCK_M]
    x_lo = x_ptr + ms[None, :] * stride_x + kl[:, None]  # [GROUPS * 16, BLOCK_M]
    if FMT == 0:
        c_lo = qs_ptr + rows * s_qs + kl[None, :]  # int8 codes: byte = column
    else:
        c_lo = qs_ptr + rows * s_qs + jb[None, :]  # 16 bytes a group: both halves' nibbles
    d_at = d_ptr + rows * s_d + gi[None, :]
    wait_then_release(USE_GDC)
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    for g0 in tl.range(g_lo, g_hi, GROUPS, num_stages=STAGES):
        if K_TAIL:
            lane_in = (g0 + jb // 16) < g_hi  # [GROUPS * 16]
            cmask = n_live[:, None] & lane_in[None, :]
            dmask = n_live[:, None] & ((g0 + gi) < g_hi)[None, :]
            xm = xmask & lane_in[:, None]
        else:
            cmask = n_live[:, None]
            dmask = n_live[:, None]
            xm = xmask
        d3 = tl.reshape(tl.load(d_at + g0, mask=dmask, other=0.0).to(tl.float32),
                        [BLOCK_N, GROUPS, 1])
        if FMT == 0:  # int8 codes: columns 32g + i and 32g + 16 + i, read as c + 128
            b0 = tl.load(c_lo + 32 * g0, mask=cmask, other=0).to(tl.int32) + 128
            b1 = tl.load(c_lo + 32 * g0 + 16, mask=cmask, other=0).to(tl.int32) + 128
            w0 = _scaled(b0, d3, 128.0, BLOCK_N, GROUPS)
            w1 = _scaled(b1, d3, 128.0, BLOCK_N, GROUPS)
        else:  # Q4_0: (q - 8) * d
            b = tl.load(c_lo + 16 * g0, mask=cmask, other=0).to(tl.int32)
            w0 = _scaled(b & 15, d3, 8.0, BLOCK_N, GROUPS)
            w1 = _scaled(b >> 4, d3, 8.0, BLOCK_N, GROUPS)
        x0 = tl.load(x_lo + 32 * g0, mask=xm, other=0.0)
        x1 = tl.load(x_lo + 32 * g0 + 16, mask=xm, other=0.0)
        if not COMPILED:
            x0 = x0.to(tl.float32)
            x1 = x1.to(tl.float32)
        acc = _pieces_dot(acc, w0, x0, PIECES, COMPILED)
        acc = _pieces_dot(acc, w1, x1, PIECES, COMPILED)
    live = xmask & n_live[:, None]
    if SPLITS == 1:
        out = acc
    else:
        out, live = split_sum(acc, p_ptr, cnt_ptr, ms[None, :] * N + rows, live, pid,
                              tl.program_id(1), SPLITS, M * N)
    if HAS_BIAS:
        out += tl.load(b_ptr + ns, mask=n_live, other=0.0).to(tl.float32)[:, None]
    tl.store(y_ptr + ms[None, :] * stride_y + rows, out.to(y_ptr.dtype.element_ty), mask=live)


def dq_kernel_runs(x: torch.Tensor, w: QuantizedTensor) -> bool:
    """Whether `qgemm_dq` can take x and w: bf16 activations, Q8_0 or Q4_0 weights."""
    return x.dtype == torch.bfloat16 and w.format in EXACT_PIECES and w.in_features % 32 == 0


def qgemm_dq(x: torch.Tensor, w: QuantizedTensor, bias: torch.Tensor | None = None,
             block_n: int = 64, num_warps: int = 4, num_stages: int = 3, groups: int = 4,
             pdl: bool | None = None, split_k: int = 1, out_dtype: torch.dtype | None = None,
             pieces: int | None = None) -> torch.Tensor:
    """x [M, K] (bf16, M <= 16) @ w.dequantize(float32).T (+ bias) with float32 accumulation ->
    [M, N] in out_dtype (default x's). groups: 32-groups a loop step; split_k: at most this many
    programs along K (kernels/splitk.py), their partials added in a fixed order, so a result has
    the same bits on every call; pieces: bf16 matrices a weight is split into (default: as many
    as hold it exactly; 1: rounded to bf16, for comparisons)."""
    if not dq_kernel_runs(x, w):
        raise ValueError(f"qgemm_dq takes bf16 x and Q8_0 / Q4_0 weights with whole 32-groups, "
                         f"got {x.dtype} x and {w.format} {tuple(w.shape)}")
    pieces = EXACT_PIECES[w.format] if pieces is None else pieces
    if not 1 <= pieces <= EXACT_PIECES[w.format]:
        raise ValueError(f"qgemm_dq: pieces must be 1..{EXACT_PIECES[w.format]} for "
                         f"{w.format}, got {pieces}")
    if x.shape[0] > 16:
        raise ValueError(f"qgemm_dq handles at most 16 rows of x, got {x.shape[0]}")
    fmt, _ = family(w.format)
    m, k = x.shape
    n = w.out_features
    x = x if x.stride(1) == 1 else x.contiguous()
    qs, d = (p if p.stride(1) == 1 else p.contiguous() for p in (w.planes["qs"], w.planes["d"]))
    y = torch.empty(m, n, dtype=out_dtype or x.dtype, device=x.device)
    tiles = triton.cdiv(n, block_n)
    split_g, splits = split_groups(k // 32, split_k)
    if splits > 1:
        partials = torch.empty(splits, m, n, dtype=torch.float32, device=x.device)
        counters = tile_counters(x.device, tiles)
    else:
        partials = counters = y  # not read
    gdc = use_pdl(x, pdl)
    _qgemm_dq_kernel[(tiles, splits)](
        x, y, bias if bias is not None else x, qs, d, partials, counters, m, n, x.stride(0),
        y.stride(0), qs.stride(0), d.stride(0), K=k, FMT=fmt,
        BLOCK_M=max(16, triton.next_power_of_2(m)), BLOCK_N=block_n, GROUPS=groups,
        STAGES=num_stages, SPLITS=splits, SPLIT_G=split_g,
        K_TAIL=bool(split_g % groups or (k // 32) % groups), PIECES=pieces,
        HAS_BIAS=bias is not None, COMPILED=not os.environ.get("TRITON_INTERPRET"),
        USE_GDC=gdc, num_warps=num_warps, num_stages=num_stages, **launch_options(gdc))
    return y
