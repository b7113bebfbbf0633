"""Quantized linear layers on the CPU: `prepare_cpu` once at load, then `CpuQuantLinear(x)`.

Three ways to apply a `QuantizedTensor` W [N, K] to activations x [M, K]:

- `int4pack`: torch's int4 kernel `aten._weight_int4pack_mm_for_cpu` on the rewrite of
  `llm.backends.torch.quant.int4_groups` (Q4_0, Q4_1, int4_g<G>, Q4_K; Q5_0, Q5_1, Q5_K and Q8_0
  as two 4-bit parts). Packed by `aten._convert_weight_to_int4pack_for_cpu` (N a multiple of 16:
  other N are padded with zero rows), one scale and zero per group in x's dtype.
- `int8pack`: `aten._weight_int8pack_mm`, int8 codes times one scale per row (format `int8`).
- `dense`: W dequantized once to x's dtype and `F.linear` (what the engine did before), for Q6_K
  and for float32 / float16 activations.

Both torch kernels are vectorized (AVX-512 / AVX2) for bfloat16 activations only; for float32 and
float16 they run a scalar loop, 10-100x slower than `F.linear` (measured below), so only
bfloat16 activations take them (or float32 activations cast to bf16 around the call:
`compute_dtype`). On AVX-512 the int4 kernel computes each weight as
fma(c - 8, s, z) in float32 from bf16 s and z, accumulates x*w in float32 and rounds the result
to bf16.

Exactness. `dense` float32 is ggml's dequantization bit for bit. With scale and zero in float32
the int4 rewrite is too (Q4_0, Q4_1, Q8_0, Q4_K; see `int4_groups` for the one-rounding caveats),
but the kernel is fast only in bf16, where s and z are rounded to bf16 (unit roundoff u = 2^-8):
each weight moves by at most u * (|c - 8| |s| + |z|), i.e. about u times its group's range, where
`dense` bf16 rounds each weight by at most u * |w|. Measured on the default model, max |w' - w|
over max |w| of the weight's 32-group (the default model's tensors; `dense` bf16 in brackets):
Q4_1 layers 4.1e-3 (3.5e-3), Q8_0 embedding 3.9e-3 (3.6e-3); relative to |w| itself Q8_0 3.9e-3
(3.9e-3: w' = bf16(d) * q), Q4_1 unbounded near w = 0 (the zero's rounding is absolute; it is
still 2^-8 of the group range, 1/17 of the format's own step). int8pack: w' = q * bf16(d),
|w' - w| <= u * |w|. The kernels accumulate in float32 and round the output to bf16 once.

Timings (`python -m llm.backends.torch.quant.cpu_bench`): 2-core Intel Xeon (AVX-512 with bf16,
fp16 and VNNI, no AMX), torch 2.13 CPU, 2026-12-03; the machine was shared with other jobs (load
3-6 on 2 cores), so each entry is the best of two runs of best-of-5, and the 2-thread column is the
noisier one. ms per call; fp32 / bf16 / fp16 are `F.linear` on the dequantized weight, `q` is
`prepare_cpu(w, bfloat16)` (int4pack: Q4_1 layers, the Q8_0 LM head as two 4-bit parts). For
comparison the same int4 kernel with float32 / float16 x (scalar loop): qkv M=1 5.6 / 9.2 ms,
M=16 65 / 113 ms.

                              1 thread                       2 threads
  shape     N x K      M    fp32    bf16    fp16       q    fp32    bf16    fp16       q
  qkv       1728x576    1   0.203   0.206   0.205   0.066   0.068   0.180   0.206   0.049
  qkv       1728x576    4   0.340   0.283   0.328   0.140   0.653   0.578   0.349   0.290
  qkv       1728x576   16   0.557   0.607   0.521   0.538   1.011   0.953   0.963   1.049
  qkv       1728x576  128   2.050   3.424   2.227   4.264   1.106   6.157   1.337   6.296
  gate_up   3072x576    1   0.338   0.361   0.360   0.119   0.575   0.618   0.614   0.069
  gate_up   3072x576    4   0.609   0.488   0.553   0.247   0.943   0.928   0.685   0.339
  gate_up   3072x576   16   0.973   1.075   0.780   1.008   1.888   1.840   1.943   1.146
  gate_up   3072x576  128   3.315   6.242   3.243   7.345   6.111   7.808   6.371   7.968
  down      576x1536    1   0.147   0.149   0.163   0.068   0.045   0.283   0.287   0.049
  down      576x1536    4   0.322   0.227   0.323   0.131   0.083   0.363   0.367   0.067
  down      576x1536   16   0.541   0.593   0.430   0.473   1.060   0.270   0.946   0.881
  down      576x1536  128   1.826   3.115   1.660   3.688   1.015   6.417   1.156   5.935
  o          576x576    1   0.034   0.076   0.068   0.031   0.018   0.044   0.035   0.022
  o          576x576    4   0.059   0.096   0.117   0.053   0.072   0.075   0.079   0.028
  o          576x576   16   0.113   0.204   0.175   0.185   0.092   0.106   0.140   0.109
  o          576x576  128   0.707   1.181   0.787   1.431   0.370   0.680   0.448   0.755
  lm_head  49152x576    1  10.832   8.873   9.382   3.652  15.214  14.231  14.953   7.960
  lm_head  49152x576    4  19.289   9.916  11.640   9.093  25.998  14.885  15.938  10.947
  lm_head  49152x576   16  21.586  20.047  15.368  33.194  28.986  23.708  15.972  31.596
  lm_head  49152x576  128  84.227   124.7  55.902   255.4  73.299   104.0  63.970   268.4

Decode estimate at batch 1, linears only: 30 * (qkv + gate_up + down + o) + lm_head at M = 1
  fp32  1 thread  32.5 ms =  31 tok/s, 2 threads  36.4 ms =  27 tok/s
  bf16  1 thread  32.6 ms =  31 tok/s, 2 threads  48.0 ms =  21 tok/s
  fp16  1 thread  33.3 ms =  30 tok/s, 2 threads  49.2 ms =  20 tok/s
  q     1 thread  12.2 ms =  82 tok/s, 2 threads  13.6 ms =  73 tok/s

`q` beats the best dense dtype by 2.2-3.1x per call at M = 1 (1.1x for the small o projection;
2.7x for a whole decode step), by 1.1-2x at M = 4, is about even at M = 16 (the LM head 1.5x
slower) and 2-4x slower than fp32 `F.linear` at M = 128 (the kernel dequantizes the weights again
for every 4 rows of x; bf16 `F.linear` is slow too without AMX): prefill is better served by dense
fp32 weights where memory allows. (llama.cpp: 83-119 tok/s on these cores, everything included.)
float32 activations with `compute_dtype=torch.bfloat16` add the two casts: 0.002-0.03 ms per call
at M = 1 (qkv 0.077 -> 0.095, gate_up 0.133 -> 0.159, LM head 4.36 -> 4.48 ms; ~1.5 ms per step).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llm.backends.torch.quant.int4_groups import Int4Groups, to_int4_groups
from llm.model.quant.tensor import QuantizedTensor

KERNEL_DTYPE = torch.bfloat16  # the only activation dtype torch's CPU kernels vectorize
ACT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
N_ALIGN = 16  # the int4 packing needs N % 16 == 0
PACK_ROWS = 4096  # rows packed per call (a multiple of the kernel's 64-row blocks)


@dataclass(frozen=True, eq=False)
class CpuQuantLinear:
    """x [M, K] (dtype `dtype`) -> x @ W.T [M, N] (+ bias), W prepared by `prepare_cpu`.

    kind `int4pack`: `weight` the packed codes uint8 [N', copies*K/2] (N' = N rounded up to 16),
    `scales` [copies*K/group, N', 2] (scale, zero); `int8pack`: `weight` int8 [N, K], `scales`
    [N]; `dense`: `weight` [N, K] in `dtype`, `scales` None. `compute_dtype` (default `dtype`)
    is the dtype the kernel runs in: float32 x is cast to bfloat16 and the result back.
    """

    kind: str
    format: str
    shape: tuple[int, int]
    dtype: torch.dtype
    weight: torch.Tensor
    scales: torch.Tensor | None = None
    group: int = 0
    copies: int = 1
    compute_dtype: torch.dtype | None = None

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes this layer reads per call (weights and scales)."""
        tensors = [self.weight] + ([self.scales] if self.scales is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [M, K] -> [M, N] in `dtype` (a column slice if N was padded); bias [N] in `dtype`."""
        if x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(
                f"expected activations [M, {self.in_features}] for the {self.format} "
                f"[{self.out_features}, {self.in_features}] weight, got {tuple(x.shape)}"
            )
        if x.dtype != self.dtype:
            raise TypeError(f"this {self.kind} layer was prepared for {self.dtype}, x is {x.dtype}")
        if bias is not None and (bias.shape != (self.out_features,) or bias.dtype != self.dtype):
            raise ValueError(
                f"bias must be [{self.out_features}] {self.dtype}, got {bias.dtype} "
                f"{tuple(bias.shape)}"
            )
        if self.kind == "dense":
            return F.linear(x, self.weight, bias)
        x = x.to(self.compute_dtype or self.dtype).contiguous()
        if self.kind == "int8pack":
            y = torch.ops.aten._weight_int8pack_mm(x, self.weight, self.scales)
        else:
            xs = x if self.copies == 1 else x.repeat(1, self.copies)  # [M, copies*K]
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(xs, self.weight, self.group,
                                                            self.scales)  # [M, N']
            if y.shape[1] != self.out_features:
                y = y[:, : self.out_features]
        y = y.to(self.dtype)
        return y if bias is None else y + bias


def prepare_cpu(w: QuantizedTensor, act_dtype: torch.dtype,
                compute_dtype: torch.dtype | None = None) -> CpuQuantLinear:
    """The fastest CPU layer for `w` with activations of `act_dtype` (float32, bfloat16 or
    float16): a torch int4/int8 kernel for bfloat16 when the format maps onto one, else the
    weights dequantized once to `act_dtype` (see the module docstring).

    `compute_dtype=torch.bfloat16` with float32 activations runs the kernels in bf16 (x rounded to
    bf16 on the way in, the result widened to float32, bias added in float32): the fast path for a
    float32 model; formats without a kernel stay dense in float32.
    """
    if not isinstance(w, QuantizedTensor):
        raise TypeError(f"prepare_cpu needs a QuantizedTensor, got {type(w).__name__}")
    if act_dtype not in ACT_DTYPES:
        raise TypeError(f"activation dtype must be one of {ACT_DTYPES}, got {act_dtype}")
    compute = act_dtype if compute_dtype is None else compute_dtype
    if compute != act_dtype and (act_dtype, compute) != (torch.float32, KERNEL_DTYPE):
        raise TypeError(f"compute dtype {compute} with activations {act_dtype}: only bf16 "
                        "compute for float32 activations is supported")
    if compute == KERNEL_DTYPE:
        if w.format == "int8":
            qs, d = w.planes["qs"].cpu().contiguous(), w.planes["d"].cpu().reshape(-1)
            return CpuQuantLinear("int8pack", w.format, w.shape, act_dtype, qs, d.to(compute),
                                  compute_dtype=compute)
        groups = to_int4_groups(w)
        if groups is not None:
            return _int4pack(w, groups, act_dtype, compute)
    dense = w.dequantize(act_dtype).cpu().contiguous()
    return CpuQuantLinear("dense", w.format, w.shape, act_dtype, dense)


def pack_int4(codes: torch.Tensor, rows: int = PACK_ROWS) -> torch.Tensor:
    """uint8 codes 0..15 [N, K] (N % 16 == 0) -> the int4 kernel's packed uint8 [N, K/2].

    The packing works on blocks of 64 rows, so `rows` (a multiple of 64) at a time give the same
    bytes as one call while the int32 copy the packer needs stays small.
    """
    if rows % 64:
        raise ValueError(f"rows per packing call must be a multiple of 64, got {rows}")
    pack = torch.ops.aten._convert_weight_to_int4pack_for_cpu
    return torch.cat([pack(codes[i:i + rows].to(torch.int32), 1)
                      for i in range(0, codes.shape[0], rows)])


def _int4pack(w: QuantizedTensor, groups: Int4Groups, act_dtype: torch.dtype,
              compute: torch.dtype) -> CpuQuantLinear:
    """Pack `groups` (an `Int4Groups`) for the int4 kernel, padding N to a multiple of 16."""
    codes, scale, zero = groups.codes, groups.scale, groups.zero
    pad = -w.out_features % N_ALIGN
    if pad:  # zero rows: code 8, scale 0, zero 0
        codes = torch.cat((codes, torch.full((pad, codes.shape[1]), 8, dtype=codes.dtype)))
        scale = torch.cat((scale, scale.new_zeros(pad, scale.shape[1])))
        zero = torch.cat((zero, zero.new_zeros(pad, zero.shape[1])))
    packed = pack_int4(codes)
    scales = torch.stack((scale.T, zero.T), dim=-1).to(compute).contiguous()  # [K'/G, N', 2]
    return CpuQuantLinear("int4pack", w.format, w.shape, act_dtype, packed, scales,
                          groups.group, groups.copies, compute)
