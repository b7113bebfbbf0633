"""The penalties of llm.backends.torch.penalties fused into one pass over the logits, in Triton.

In torch the penalized logits take a dozen elementwise passes over [B, V] (gathers of the slot
rows, masks, two where's, the count terms); here each program reads one BLOCK of one row's logits
and of its slot's bias / stop / count / prompt rows once and writes the float32 result once. Same
order and semantics as SlotPenalties.apply (bias, min_tokens mask, repetition, frequency and
presence); the arithmetic may round differently in the last bit (fused multiply-adds).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _penalties_kernel(logits_ptr, out_ptr, slots_ptr, sample_pos_ptr, bias_ptr, stop_ptr,
                      counts_ptr, in_prompt_ptr, min_pos_ptr, presence_ptr, frequency_ptr,
                      repetition_ptr, n_cols, stride_logits, stride_state, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    slot = tl.load(slots_ptr + row)
    state = slot * stride_state + cols
    x = tl.load(logits_ptr + row * stride_logits + cols, mask=mask, other=0.0).to(tl.float32)
    x += tl.load(bias_ptr + state, mask=mask, other=0.0)
    early = tl.load(sample_pos_ptr + row) < tl.load(min_pos_ptr + slot)
    stop = tl.load(stop_ptr + state, mask=mask, other=0) != 0
    x = tl.where(stop & early, float("-inf"), x)
    counts = tl.load(counts_ptr + state, mask=mask, other=0)
    seen = counts > 0
    hit = seen | (tl.load(in_prompt_ptr + state, mask=mask, other=0) != 0)
    rep = tl.load(repetition_ptr + slot)
    x = tl.where(hit, tl.where(x > 0, x / rep, x * rep), x)
    x = x - tl.load(frequency_ptr + slot) * counts.to(tl.float32)
    x = x - tl.load(presence_ptr + slot) * seen.to(tl.float32)
    tl.store(out_ptr + row * n_cols + cols, x, mask=mask)


def fused_penalties(logits: torch.Tensor, slots: torch.Tensor, sample_pos: torch.Tensor,
                    bias: torch.Tensor, stop: torch.Tensor, counts: torch.Tensor,
                    in_prompt: torch.Tensor, min_pos: torch.Tensor, presence: torch.Tensor,
                    frequency: torch.Tensor, repetition: torch.Tensor,
                    block: int = 4096) -> torch.Tensor:
    """Penalized logits [B, V] f32 from logits [B, V] (contiguous rows), rows `slots` [B] of the
    per-slot state ([slots, V] bias f32, stop bool, counts i32, in_prompt bool; [slots] min_pos
    i64, presence / frequency / repetition f32), choosing tokens at `sample_pos` [B]."""
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"fused_penalties needs [B, V] logits with contiguous rows, got shape "
                         f"{tuple(logits.shape)} strides {logits.stride()}")
    b, v = logits.shape
    for t in (bias, stop, counts, in_prompt):
        if t.shape[1] != v or not t.is_contiguous():
            raise ValueError(f"per-slot state must be contiguous [slots, {v}], got "
                             f"{tuple(t.shape)}")
    out = torch.empty(b, v, dtype=torch.float32, device=logits.device)
    grid = (b, triton.cdiv(v, block))
    _penalties_kernel[grid](logits, out, slots, sample_pos, bias, stop, counts, in_prompt,
                            min_pos, presence, frequency, repetition, v, logits.stride(0),
                            bias.stride(0), BLOCK=block)
    return out
