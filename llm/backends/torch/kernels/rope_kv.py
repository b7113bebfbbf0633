"""Fused RoPE + paged KV-cache write in Triton, for decode and prefill.

From the fused QKV projection's output it rotates the query heads (written to a new tensor) and the
key heads, and stores rotated K and plain V straight into each token's page slot: one kernel instead
of the ~14 of the torch path (gathers, rotate-half, two scatters). Rounding follows transformers:
q * cos and rotate_half(q) * sin are each rounded to the dtype before their sum is. Compiled
without FP fusion: with it, the compiler made one bf16 fused multiply-add of a product and the
sum (a single rounding), 1 ulp off transformers in about a fifth of the values on an H200.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llm.backends.torch.kernels.pdl import launch_options, use_pdl, wait_then_release


@triton.jit
def _rope_kv_kernel(qkv_ptr, cos_ptr, sin_ptr, blocks_ptr, offsets_ptr, q_ptr, k_pool, v_pool,
                    k_out_ptr, n_tokens, stride_qkv, stride_cs, stride_qn, stride_qh, stride_kp,
                    stride_kh, stride_kt, stride_kon, stride_koh, N_HEADS: tl.constexpr,
                    N_KV: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr,
                    K_OUT: tl.constexpr, USE_GDC: tl.constexpr):
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # [T] this program's tokens
    h = tl.program_id(1)  # 0..N_HEADS-1: query heads; then N_KV key/value heads
    half = tl.arange(0, HEAD_DIM // 2)[None, :]  # [1, hd/2]
    live = tok < n_tokens
    t = tok.to(tl.int64)[:, None]  # [T, 1]; 64-bit: long prompts of wide models pass 2**31
    m = live[:, None]
    wait_then_release(USE_GDC)
    cs = cos_ptr + t * stride_cs + half
    c1 = tl.load(cs, mask=m).to(tl.float32)  # [T, hd/2]
    c2 = tl.load(cs + HEAD_DIM // 2, mask=m).to(tl.float32)
    sn = sin_ptr + t * stride_cs + half
    s1 = tl.load(sn, mask=m).to(tl.float32)
    s2 = tl.load(sn + HEAD_DIM // 2, mask=m).to(tl.float32)
    src = qkv_ptr + t * stride_qkv + h * HEAD_DIM + half  # q heads, then k heads, contiguous
    x1 = tl.load(src, mask=m)
    x2 = tl.load(src + HEAD_DIM // 2, mask=m)
    dt = x1.dtype
    f1 = x1.to(tl.float32)
    f2 = x2.to(tl.float32)
    o1 = ((f1 * c1).to(dt).to(tl.float32) + (-f2 * s1).to(dt).to(tl.float32)).to(dt)
    o2 = ((f2 * c2).to(dt).to(tl.float32) + (f1 * s2).to(dt).to(tl.float32)).to(dt)
    if h < N_HEADS:
        dst = q_ptr + t * stride_qn + h * stride_qh + half
        tl.store(dst, o1, mask=m)
        tl.store(dst + HEAD_DIM // 2, o2, mask=m)
    else:
        kvh = h - N_HEADS
        page = tl.load(blocks_ptr + tok, mask=live, other=0)
        offset = tl.load(offsets_ptr + tok, mask=live, other=0)
        slot = (page * stride_kp + kvh * stride_kh + offset * stride_kt)[:, None] + half
        tl.store(k_pool + slot, o1, mask=m)
        tl.store(k_pool + slot + HEAD_DIM // 2, o2, mask=m)
        if K_OUT:  # prefill also attends over the chunk's own rotated keys
            ko = k_out_ptr + t * stride_kon + kvh * stride_koh + half
            tl.store(ko, o1, mask=m)
            tl.store(ko + HEAD_DIM // 2, o2, mask=m)
        vsrc = qkv_ptr + t * stride_qkv + (N_HEADS + N_KV + kvh) * HEAD_DIM + half
        tl.store(v_pool + slot, tl.load(vsrc, mask=m), mask=m)
        tl.store(v_pool + slot + HEAD_DIM // 2, tl.load(vsrc + HEAD_DIM // 2, mask=m), mask=m)


def tokens_per_program(n: int) -> int:
    """Tokens one program rotates (per head): one in decode-sized calls, where a program per token
    and head spreads a small batch over the GPU; 32 for prompts, where one program per token and
    head made the kernel launch-bound (2048 tokens: ~100 us on an H200 for ~10 us of traffic)."""
    return 1 if n <= 128 else 32


def rope_and_cache(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, blocks: torch.Tensor,
                   offsets: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                   n_heads: int, return_k: bool = False, pdl: bool | None = None,
                   block_t: int | None = None):
    """qkv [N, (nh + 2 n_kv) * hd]; cos/sin [N, hd]; blocks/offsets [N] -> rotated q [N, nh, hd]
    (and, with return_k, rotated k [N, n_kv, hd] too).

    K (rotated) and V of each token are written to k_pool/v_pool [num_blocks, n_kv, block, hd].
    pdl: see kernels/pdl.py (default: where supported). block_t: tokens per program (a power of
    two; default `tokens_per_program`).
    """
    gdc = use_pdl(qkv, pdl)
    n = qkv.shape[0]
    _, n_kv, _, hd = k_pool.shape
    block_t = tokens_per_program(n) if block_t is None else block_t
    if block_t < 1 or block_t & (block_t - 1):
        raise ValueError(f"block_t (tokens per program) must be a power of two, got {block_t}")
    q = torch.empty(n, n_heads, hd, dtype=qkv.dtype, device=qkv.device)
    k = torch.empty(n, n_kv, hd, dtype=qkv.dtype, device=qkv.device) if return_k else q
    _rope_kv_kernel[(triton.cdiv(n, block_t), n_heads + n_kv)](
        qkv, cos, sin, blocks, offsets, q, k_pool, v_pool, k, n, qkv.stride(0), cos.stride(0),
        q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1), k_pool.stride(2),
        k.stride(0), k.stride(1), N_HEADS=n_heads, N_KV=n_kv, HEAD_DIM=hd, BLOCK_T=block_t,
        K_OUT=return_k, USE_GDC=gdc, enable_fp_fusion=False, **launch_options(gdc))
    return (q, k) if return_k else q
