"""Fused RoPE + paged KV-cache write in Triton, for decode.

From the fused QKV projection's output it rotates the query heads (written to a new tensor) and the
key heads, and stores rotated K and plain V straight into each token's page slot: one kernel instead
of the ~14 of the torch path (gathers, rotate-half, two scatters). Rounding follows transformers:
q * cos and rotate_half(q) * sin are each rounded to the dtype before their sum is.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llm.backends.torch.kernels.pdl import launch_options, use_pdl, wait_then_release


@triton.jit
def _rope_kv_kernel(qkv_ptr, cos_ptr, sin_ptr, blocks_ptr, offsets_ptr, q_ptr, k_pool, v_pool,
                    k_out_ptr, stride_qkv, stride_cs, stride_qn, stride_qh, stride_kp, stride_kh,
                    stride_kt, stride_kon, stride_koh, N_HEADS: tl.constexpr, N_KV: tl.constexpr,
                    HEAD_DIM: tl.constexpr, K_OUT: tl.constexpr, USE_GDC: tl.constexpr):
    n = tl.program_id(0)
    h = tl.program_id(1)  # 0..N_HEADS-1: query heads; then N_KV key/value heads
    half = tl.arange(0, HEAD_DIM // 2)
    wait_then_release(USE_GDC)
    c1 = tl.load(cos_ptr + n * stride_cs + half).to(tl.float32)
    c2 = tl.load(cos_ptr + n * stride_cs + HEAD_DIM // 2 + half).to(tl.float32)
    s1 = tl.load(sin_ptr + n * stride_cs + half).to(tl.float32)
    s2 = tl.load(sin_ptr + n * stride_cs + HEAD_DIM // 2 + half).to(tl.float32)
    src = qkv_ptr + n * stride_qkv + h * HEAD_DIM  # q heads, then k heads (contiguous in qkv)
    x1 = tl.load(src + half)
    x2 = tl.load(src + HEAD_DIM // 2 + half)
    dt = x1.dtype
    f1 = x1.to(tl.float32)
    f2 = x2.to(tl.float32)
    o1 = ((f1 * c1).to(dt).to(tl.float32) + (-f2 * s1).to(dt).to(tl.float32)).to(dt)
    o2 = ((f2 * c2).to(dt).to(tl.float32) + (f1 * s2).to(dt).to(tl.float32)).to(dt)
    if h < N_HEADS:
        dst = q_ptr + n * stride_qn + h * stride_qh
        tl.store(dst + half, o1)
        tl.store(dst + HEAD_DIM // 2 + half, o2)
    else:
        kvh = h - N_HEADS
        slot = tl.load(blocks_ptr + n) * stride_kp + kvh * stride_kh + \
            tl.load(offsets_ptr + n) * stride_kt
        tl.store(k_pool + slot + half, o1)
        tl.store(k_pool + slot + HEAD_DIM // 2 + half, o2)
        if K_OUT:  # prefill also attends over the chunk's own rotated keys
            ko = k_out_ptr + n * stride_kon + kvh * stride_koh
            tl.store(ko + half, o1)
            tl.store(ko + HEAD_DIM // 2 + half, o2)
        vsrc = qkv_ptr + n * stride_qkv + (N_HEADS + N_KV + kvh) * HEAD_DIM
        tl.store(v_pool + slot + half, tl.load(vsrc + half))
        tl.store(v_pool + slot + HEAD_DIM // 2 + half, tl.load(vsrc + HEAD_DIM // 2 + half))


def rope_and_cache(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, blocks: torch.Tensor,
                   offsets: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                   n_heads: int, return_k: bool = False, pdl: bool | None = None):
    """qkv [N, (nh + 2 n_kv) * hd]; cos/sin [N, hd]; blocks/offsets [N] -> rotated q [N, nh, hd]
    (and, with return_k, rotated k [N, n_kv, hd] too).

    K (rotated) and V of each token are written to k_pool/v_pool [num_blocks, n_kv, block, hd].
    pdl: see kernels/pdl.py (default: where supported).
    """
    gdc = use_pdl(qkv, pdl)
    n = qkv.shape[0]
    _, n_kv, _, hd = k_pool.shape
    q = torch.empty(n, n_heads, hd, dtype=qkv.dtype, device=qkv.device)
    k = torch.empty(n, n_kv, hd, dtype=qkv.dtype, device=qkv.device) if return_k else q
    _rope_kv_kernel[(n, n_heads + n_kv)](
        qkv, cos, sin, blocks, offsets, q, k_pool, v_pool, k, qkv.stride(0), cos.stride(0),
        q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1), k_pool.stride(2),
        k.stride(0), k.stride(1), N_HEADS=n_heads, N_KV=n_kv, HEAD_DIM=hd, K_OUT=return_k,
        USE_GDC=gdc, **launch_options(gdc))
    return (q, k) if return_k else q
