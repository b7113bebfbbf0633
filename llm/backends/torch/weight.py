"""Weights of the torch backend that stay quantized as stored, and the calls that use them.

A checkpoint loaded with weights="stored" (a GGUF's blocks) or "int8" / "int4" / "int4_mix" holds
`llm.model.quant.QuantizedTensor` matrices. The backend keeps each one as a `QuantLinear` on its
device and applies it through `linear`, the one entry point every projection uses; plain tensors go
to `F.linear` as before. On CUDA the stored planes are all it holds: decode-sized batches run the
Triton GEMV that dequantizes in registers, prompts dequantize-then-matmul. On the CPU each layer is
prepared once (backends/torch/quant/cpu.py): torch's int4 / int8 kernels for bf16 activations, a
dense copy in the activation dtype (dequantized exactly) otherwise; embedding rows are dequantized
per lookup from the planes."""

from __future__ import annotations

from itertools import accumulate

import torch
import torch.nn.functional as F

from llm.backends.torch.quant.cpu import CpuQuantLinear, prepare_cpu
from llm.backends.torch.quant.native import NativeKernels
from llm.model.quant.state import Weight
from llm.model.quant.tensor import QuantizedTensor, cat_rows
from llm.model.rope import head_row_index

QGEMV_MAX_ROWS = 16  # the Triton quantized GEMV's batch limit (kernels/qgemv.py MAX_M)
TC_BATCH_ROWS = 64  # the tensor-core kernel's (kernels/qgemv_config.py TC_BATCH_MAX_ROWS)


class QuantLinear:
    """A quantized [N, K] weight on the backend's device, applied as x @ W^T."""

    def __init__(self, weight: QuantizedTensor, dtype: torch.dtype,
                 kernels: NativeKernels | None = None) -> None:
        """kernels: the C kernels for float32 activations on the CPU (None: torch ops only)."""
        self.weight = weight
        self.dtype = dtype  # the activations' dtype: dequantized values are rounded to it
        self.kernels = kernels
        self.shape = torch.Size(weight.shape)
        self._cpu: CpuQuantLinear | None = None  # prepared on first use (fusions come first)

    @property
    def nbytes(self) -> int:
        """Bytes one pass over the matrix reads: on the CPU once prepared, what its prepared
        layer holds (torch's packed int4 / int8 layout, or a dense copy), else the stored planes
        (what the GPU kernel and embedding lookups read)."""
        return self._cpu.nbytes if self._cpu is not None else self.weight.nbytes

    @property
    def cpu_kind(self) -> str | None:
        """The prepared CPU layer's kind (`CpuQuantLinear.kind`), None before `prepare` / on
        CUDA."""
        return self._cpu.kind if self._cpu is not None else None

    def prepare(self) -> None:
        """Build the CPU layer now (at load) rather than in the first request; no-op on CUDA."""
        if self.weight.device.type == "cpu":
            self.cpu()

    def cpu(self) -> CpuQuantLinear:
        """The CPU layer (backends/torch/quant/cpu.py): torch's int4 / int8 kernels for bf16
        activations where the format maps onto them, else the matrix dequantized once."""
        if self._cpu is None:
            self._cpu = prepare_cpu(self.weight, self.dtype, kernels=self.kernels)
        return self._cpu

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., K] -> [..., N]: on the CPU by its prepared layer; on CUDA, decode-sized batches
        by the Triton GEMV that dequantizes in registers (kernels/qgemv.py), batches of
        17..TC_BATCH_ROWS by a tensor-core kernel on the codes (kernels/qgemm_batch.py, bf16 and its
        formats), prompts by dequantize-then-matmul (one Triton pass into a dense copy for the call,
        kernels/dequant.py, then cuBLAS)."""
        if not x.is_cuda:
            y = self.cpu()(x.reshape(-1, self.shape[1]), bias)  # [M, N]
            return y.reshape(*x.shape[:-1], self.shape[0])
        if self.decodes(x):
            from llm.backends.torch.kernels.qgemv import qgemv

            return qgemv(x, self.weight, bias)
        if x.dim() == 2 and QGEMV_MAX_ROWS < x.shape[0] <= TC_BATCH_ROWS:
            from llm.backends.torch.kernels.qgemm_batch import batch_kernel_takes, qgemm_batch

            if batch_kernel_takes(x, self.weight):
                return qgemm_batch(x, self.weight, bias)
        from llm.backends.torch.kernels.dequant import dequantize_dense

        return F.linear(x, dequantize_dense(self.weight, x.dtype), bias)

    def decodes(self, x: torch.Tensor) -> bool:
        """Whether x goes through the Triton GEMV that dequantizes in registers: a decode-sized
        batch [M <= 16, K] on CUDA."""
        return x.is_cuda and x.dim() == 2 and x.shape[0] <= QGEMV_MAX_ROWS

    def rows(self, tokens: torch.Tensor) -> torch.Tensor:
        """Embedding lookup: the dequantized rows of `tokens` [...] -> [..., K] (on CUDA one
        Triton launch, kernels/dequant.py)."""
        flat = tokens.reshape(-1)  # [T]
        out = self._cpu.rows(flat) if self._cpu is not None else None  # the C kernels' codes
        if out is None and flat.is_cuda:
            from llm.backends.torch.kernels.dequant import dequantize_dense

            out = dequantize_dense(self.weight, self.dtype, rows=flat)  # [T, K]
        if out is None:
            out = self.weight.take_rows(flat).dequantize(torch.float32).to(self.dtype)  # [T, K]
        return out.reshape(*tokens.shape, self.shape[1])

    def split_rows(self, size: int) -> list[QuantLinear]:
        """Consecutive row blocks of at most `size` rows (e.g. LM head chunks)."""
        n = self.shape[0]
        return [QuantLinear(self.weight.slice_rows(lo, min(lo + size, n)), self.dtype,
                            self.kernels) for lo in range(0, n, size)]


def on_device(w: Weight, device: torch.device, dtype: torch.dtype,
              kernels: NativeKernels | None = None) -> torch.Tensor | QuantLinear:
    """A checkpoint weight as the backend holds it: a float tensor cast to `dtype`, or a
    quantized one kept as stored on `device` (applied by `kernels` where given, on the CPU)."""
    if isinstance(w, QuantizedTensor):
        return QuantLinear(w.to(device).contiguous(), dtype, kernels)
    return w.to(device=device, dtype=dtype)


class RowBlocks:
    """A fused projection (q/k/v, gate/up) whose row blocks are quantized in different formats,
    as Q4_K_M / Q5_K_M files store attn_v in Q6_K in half the layers and attn_q / attn_k in Q4_K
    / Q5_K: each block stays as stored (consecutive parts of one format fused into one block)
    and is applied by its own kernel, the outputs side by side, [..., N] as one matrix gives."""

    def __init__(self, blocks: list[QuantLinear]) -> None:
        if len(blocks) < 2 or len({b.shape[1] for b in blocks}) != 1:
            raise ValueError("RowBlocks takes two or more quantized blocks of one in_features")
        self.blocks = blocks
        self.dtype = blocks[0].dtype
        # the first row of each block, then the row count
        self.starts = list(accumulate((b.shape[0] for b in blocks), initial=0))
        self.shape = torch.Size((self.starts[-1], blocks[0].shape[1]))

    @property
    def nbytes(self) -> int:
        """Bytes one pass over the blocks reads (see `QuantLinear.nbytes`)."""
        return sum(b.nbytes for b in self.blocks)

    def prepare(self) -> None:
        """Each block's `QuantLinear.prepare`."""
        for b in self.blocks:
            b.prepare()

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., K] -> [..., N]: each block's `QuantLinear` on x (with its slice of the bias),
        concatenated."""
        return torch.cat([b(x, None if bias is None else bias[lo:hi]) for b, lo, hi in
                          zip(self.blocks, self.starts[:-1], self.starts[1:], strict=True)], dim=-1)


def blocks_of(w: torch.Tensor | QuantLinear | RowBlocks) -> list:
    """A projection's row blocks: a `RowBlocks`' blocks, or the weight itself alone."""
    return w.blocks if isinstance(w, RowBlocks) else [w]


def linear(x: torch.Tensor, w: torch.Tensor | QuantLinear | RowBlocks,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ w^T (+ bias) for a dense or a quantized weight -> [..., N]."""
    if isinstance(w, (QuantLinear, RowBlocks)):
        return w(x, bias)
    return F.linear(x, w, bias)


def stack_rows(parts: list[torch.Tensor | QuantLinear]
               ) -> torch.Tensor | QuantLinear | RowBlocks:
    """Fuse projections by stacking their rows (q/k/v, gate/up). Quantized parts stay as stored:
    one `QuantLinear` where they share a format, else `RowBlocks` (consecutive parts of one
    format fused); a mix of dense and quantized parts is dequantized to one dense matrix in the
    activation dtype."""
    if all(isinstance(p, torch.Tensor) for p in parts):
        return torch.cat(parts, dim=0)  # type: ignore[arg-type]
    quant = [p for p in parts if isinstance(p, QuantLinear)]
    if len(quant) == len(parts):
        runs: list[list[QuantLinear]] = []
        for q in quant:
            if runs and runs[-1][0].weight.format == q.weight.format:
                runs[-1].append(q)
            else:
                runs.append([q])
        blocks = [QuantLinear(cat_rows([q.weight for q in run]), run[0].dtype, run[0].kernels)
                  if len(run) > 1 else run[0] for run in runs]
        return blocks[0] if len(blocks) == 1 else RowBlocks(blocks)
    dtype = quant[0].dtype
    return torch.cat([p.weight.dequantize(torch.float32).to(dtype) if isinstance(p, QuantLinear)
                      else p for p in parts], dim=0)


def head_rows(w: torch.Tensor | QuantLinear, heads: int, order: torch.Tensor | None
              ) -> torch.Tensor | QuantLinear:
    """The rows of a per-head projection (or bias, or a [head_dim] gain with heads 1) reordered
    within each head by `order` [head_dim] (None: as they are)."""
    if order is None:
        return w
    index = head_row_index(heads, order)  # [heads * hd]
    if isinstance(w, QuantLinear):
        return QuantLinear(w.weight.take_rows(index), w.dtype, w.kernels)
    return w[index.to(w.device)]


def nbytes(w: torch.Tensor | QuantLinear | RowBlocks) -> int:
    """Bytes a weight occupies on the device."""
    return w.nbytes if isinstance(w, (QuantLinear, RowBlocks)) else w.numel() * w.element_size()


def is_dense(w: object) -> bool:
    """True for a plain tensor (what the fused Triton GEMVs take)."""
    return isinstance(w, torch.Tensor)
