"""Quantized linear layers on the CPU: `prepare_cpu` once at load, then `CpuQuantLinear(x)`.

Four ways to apply a `QuantizedTensor` W [N, K] to activations x [M, K]:

- `int4pack`: torch's int4 kernel `aten._weight_int4pack_mm_for_cpu` on the rewrite of
  `llm.backends.torch.quant.int4_groups` (Q4_0, Q4_1, int4_g<G>, Q4_K; Q5_0, Q5_1, Q5_K and Q8_0
  as two 4-bit parts). Packed by `aten._convert_weight_to_int4pack_for_cpu` (N a multiple of 16:
  other N are padded with zero rows), one scale and zero per group in x's dtype.
- `int8pack`: `aten._weight_int8pack_mm`, int8 codes times one scale per row (format `int8`).
- `native` (float32 activations, when the C kernels are given): cpu_kernels.c on the rewrite of
  `llm.backends.torch.quant.code_groups` (every GGUF format, Q6_K included, and int8 / int4).
- `dense`: W dequantized once to x's dtype and `F.linear` (what the engine did before), for Q6_K
  with bf16 compute and for float32 / float16 activations without the C kernels.

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
`dense` bf16 rounds each weight by at most u * |w|. Measured on the default model by
`python -m llm.backends.torch.quant.cpu_exactness`, max |w' - w| over max |w| of the weight's
32-group (`dense` bf16 in brackets): Q4_1 layers 4.1e-3 (3.5e-3), Q8_0 embedding 3.9e-3
(3.6e-3). Relative to |w| itself: Q8_0 3.9e-3 (3.9e-3; w' = bf16(d) * q), Q4_1 up to 23 (3.9e-3)
on weights near 0, as the zero's rounding is absolute: still 2^-8 of the group's range, 1/17 of
the format's own step. int8pack: w' = q * bf16(d), |w' - w| <= u * |w|. The kernels accumulate
in float32 and round the output to bf16 once.

Timings (`python -m llm.backends.torch.quant.cpu_bench [--sweep]`): 2-core Intel Xeon (AVX-512
with bf16, fp16 and VNNI, no AMX; L2 2 x 2 MB, L3 260 MB shared), torch 2.13 CPU, 2026-12-03. The
machine was shared with other jobs (load 2-6 on 2 cores): every entry is the best of three runs of
best-of-5, and 2-thread entries are the noisier. ms per call; fp32 / bf16 / fp16 are `F.linear`
on the dequantized weight, `q` is `prepare_cpu(w, bfloat16)` (int4pack: the Q4_1 layers, the Q8_0
LM head as two 4-bit parts). The same int4 kernel with float32 / float16 x (its scalar loop): qkv
M=1 5.6 / 9.2 ms, M=16 65 / 113 ms.

                              1 thread                       2 threads
  shape     N x K      M    fp32    bf16    fp16       q    fp32    bf16    fp16       q
  qkv       1728x576    1   0.192   0.192   0.205   0.066   0.068   0.096   0.111   0.048
  qkv       1728x576    4   0.340   0.283   0.328   0.140   0.268   0.175   0.174   0.084
  qkv       1728x576   16   0.557   0.607   0.415   0.525   0.264   0.325   0.270   0.288
  qkv       1728x576  128   1.855   3.158   1.997   4.264   1.106   2.205   1.337   2.558
  gate_up   3072x576    1   0.329   0.361   0.318   0.119   0.234   0.262   0.218   0.069
  gate_up   3072x576    4   0.609   0.488   0.533   0.244   0.396   0.334   0.400   0.156
  gate_up   3072x576   16   0.973   1.075   0.780   0.909   0.799   0.633   0.562   0.571
  gate_up   3072x576  128   3.315   6.242   3.243   7.345   2.345   3.765   2.901   4.581
  down      576x1536    1   0.147   0.149   0.163   0.068   0.045   0.112   0.094   0.042
  down      576x1536    4   0.292   0.227   0.298   0.115   0.083   0.156   0.187   0.067
  down      576x1536   16   0.458   0.486   0.377   0.437   0.654   0.270   0.361   0.324
  down      576x1536  128   1.826   2.954   1.660   3.632   1.015   1.878   1.156   1.951
  o          576x576    1   0.034   0.059   0.060   0.028   0.018   0.044   0.035   0.022
  o          576x576    4   0.040   0.093   0.107   0.048   0.071   0.059   0.073   0.028
  o          576x576   16   0.113   0.204   0.175   0.185   0.092   0.106   0.133   0.094
  o          576x576  128   0.707   1.181   0.629   1.431   0.325   0.552   0.408   0.704
  lm_head  49152x576    1   9.997   8.873   9.382   3.652   5.402   2.911   3.027   2.137
  lm_head  49152x576    4  19.289   9.916  11.640   7.507  10.006   5.810   4.501   3.610
  lm_head  49152x576   16  21.586  19.772  15.368  33.194  11.080   9.472   7.460  14.646
  lm_head  49152x576  128  59.557  93.835  53.946   255.4  29.322  89.290  51.010   135.2

Sum at M = 1, 30 * (qkv + gate_up + down + o) + lm_head, ms per step (warm caches):
  fp32  1 thread  31.1 ms ( 32/s), 2 threads  16.4 ms ( 61/s)
  bf16  1 thread  31.7 ms ( 32/s), 2 threads  18.3 ms ( 55/s)
  fp16  1 thread  31.8 ms ( 31/s), 2 threads  16.8 ms ( 60/s)
  q     1 thread  12.1 ms ( 83/s), 2 threads   7.6 ms (132/s)

`--sweep`, the same step over 30 distinct layers (cold caches, as in the model), ms per step
(steps/s = decode tok/s at batch 1 from the linears alone, an upper bound):
  threads   M     fp32     bf16     fp16        q
        1   1     50.9     61.9     60.0     18.7   (53 vs 20 steps/s)
        1   4    106.4     65.7     78.3     29.7
        1  16    117.6    116.2     85.9     95.5
        2   1     32.3     30.1     28.8     10.7   (93 vs 35 steps/s)
        2   4     55.4     41.4     44.1     15.7
        2  16     68.4     57.8     57.2     56.9

Per call `q` beats the best dense dtype by 0.8-3.2x at M = 1 (the small o and down projections
least), by 0.8-2.1x at M = 4, is about even at M = 16 (the LM head 1.5-2x slower) and 2-4x slower
than fp32 `F.linear` at M = 128: the kernel dequantizes the weights again for every 4 rows of x,
and bf16 `F.linear` is slow too without AMX, so prefill is better served by dense fp32 weights
where memory allows. Over a whole decode step with cold caches `q` is 2.7x faster than the best
dense dtype on 1 thread and on 2 (93 steps/s for the linears alone; llama.cpp: 83-119 tok/s on
these cores, everything included).

Bytes read per weight: one-part formats 5.0 bits (codes and a bf16 scale and zero per 32;
int4_g128 4.25), two-part formats 10.0, int8 8.02, dense bf16 16. On a [3072, 768] weight
(1 thread, warm caches, M = 1) one-part formats take 0.16-0.25 ms against 0.39-0.53 dense, two-part
formats 0.43-0.50 against 0.40-0.48 (even; they win where the dense weight is not cache-resident:
the Q8_0 LM head above), int8 0.26, Q6_K (dense) 0.41-0.54.

float32 activations with `compute_dtype=torch.bfloat16` add the two casts: 0.002-0.03 ms per call
at M = 1 (qkv 0.077 -> 0.095, gate_up 0.133 -> 0.159, LM head 4.36 -> 4.48 ms; ~1.5 ms per step).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llm.backends.torch.quant.code_groups import to_code_groups
from llm.backends.torch.quant.int4_groups import Int4Groups, to_int4_groups
from llm.backends.torch.quant.native import NativeKernels
from llm.model.quant.tensor import QuantizedTensor

KERNEL_DTYPE = torch.bfloat16  # the only activation dtype torch's CPU kernels vectorize
ACT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
N_ALIGN = 16  # the int4 packing needs N % 16 == 0
PACK_ROWS = 4096  # rows packed per call (a multiple of the kernel's 64-row blocks)
NATIVE_MAX_ROWS = 16  # larger float32 batches dequantize the layer and run F.linear (measured)
# torch 2.13's _weight_int8pack_mm reads past its rows unless K is a multiple of 16 (wrong sums
# at K = 8, 24, 40, 344; a crash at some): other widths stay dense
INT8PACK_K = 16
KIND_NAMES = {"native": "the C kernels", "int4pack": "torch's int4 kernel",
              "int8pack": "torch's int8 kernel", "dense": "dequantized (dense)"}


def describe_kinds(kinds: dict[str, int]) -> str:
    """How the quantized matrices run on the CPU, e.g. "quantized matrices by the C kernels", or
    "quantized blocks: 12 by the C kernels, 2 dequantized (dense)" where they differ (a block: a
    matrix, an LM head chunk or a part of a fused projection in another format)."""
    if not kinds:
        return ""
    if len(kinds) == 1:
        return f"quantized matrices by {KIND_NAMES[next(iter(kinds))]}"
    return "quantized blocks: " + ", ".join(f"{n} by {KIND_NAMES[k]}" if k != "dense"
                                            else f"{n} {KIND_NAMES[k]}"
                                            for k, n in sorted(kinds.items(),
                                                               key=lambda kn: (kn[0] == "dense",
                                                                               kn[0])))


@dataclass(frozen=True, eq=False)
class CpuQuantLinear:
    """x [M, K] (dtype `dtype`) -> x @ W.T [M, N] (+ bias), W prepared by `prepare_cpu`.

    kind `native` (float32 activations, cpu_kernels.c): `weight` the codes of a `CodeGroups`
    (`bits` 4, 6 or 8), `scales` and `zero` [N, K/32] (float16 or float32); up to NATIVE_MAX_ROWS
    rows of x by the kernel, more by F.linear on the layer dequantized for the call.
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
    zero: torch.Tensor | None = None
    bits: int = 0
    kernels: NativeKernels | None = None

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes this layer reads per call (weights and scales)."""
        tensors = [t for t in (self.weight, self.scales, self.zero) if t is not None]
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
        if self.kind == "native":
            return self._native(x.contiguous(), bias)
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

    def rows(self, ids: torch.Tensor) -> torch.Tensor | None:
        """Rows `ids` (int64 [n]) of W in `dtype` [n, K] (embedding lookups), for the layers
        that keep codes (`native`); None for the others (their caller dequantizes rows)."""
        if self.kind != "native":
            return None
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.out_features):
            raise IndexError(f"token ids must be in [0, {self.out_features}), got "
                             f"{int(ids.min())}..{int(ids.max())}")
        return self.kernels.take(self.bits, self.weight, self.scales, self.zero, ids,
                                 self.in_features)

    def _native(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        k, n = self.kernels, self.out_features
        if x.shape[0] > NATIVE_MAX_ROWS:
            out = k.scratch("dequant", n * self.in_features).view(n, self.in_features)
            w = k.dequant(self.bits, self.weight, self.scales, self.zero, n, self.in_features, out)
            return F.linear(x, w, bias)
        y = k.matmul(self.bits, x, self.weight, self.scales, self.zero, n)  # [M, N]
        return y if bias is None else y + bias


def prepare_cpu(w: QuantizedTensor, act_dtype: torch.dtype,
                compute_dtype: torch.dtype | None = None,
                kernels: NativeKernels | None = None) -> CpuQuantLinear:
    """The fastest CPU layer for `w` with activations of `act_dtype` (float32, bfloat16 or
    float16): a torch int4/int8 kernel for bfloat16 when the format maps onto one; for float32,
    the C kernels (`kernels`, native.py) when given and the format maps onto them
    (code_groups.py); else the weights dequantized once to `act_dtype` (module docstring).

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
    if compute == torch.float32 and kernels is not None:
        groups = to_code_groups(w)
        if groups is not None:
            return CpuQuantLinear("native", w.format, w.shape, act_dtype, groups.codes,
                                  groups.scale, zero=groups.zero, bits=groups.bits,
                                  kernels=kernels)
    if compute == KERNEL_DTYPE:
        if w.format == "int8" and w.shape[1] % INT8PACK_K == 0:
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
