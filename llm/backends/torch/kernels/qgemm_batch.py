"""Calls of 17..64 rows on the codes: one pass over a quantized matrix for all the rows.

The small-batch kernels stop at 16 rows of x (qmma's `_m8` / `_m16`, the Triton GEMVs); longer
prompt chunks dequantize the matrix into a dense copy for the call and multiply it by cuBLAS
(kernels/dequant.py). Between the two, a server's decode batch of 17..64 sequences (or a prompt
chunk that short, e.g. a prefill graph's bucket of 32 or 64) would write and read a dense copy of
every matrix on every call. Here it takes the Triton tensor-core kernel with x padded to 32 or 64
rows (kernels/qgemm_tc.py), which reads the codes once, or the CUDA one with four or eight B tiles
(`qmma`'s `_m32` / `_m64`: each weight fragment decoded once for 32 or 64 rows of x) where
`qmma.mma_rows` takes those rows (not yet: not run on a GPU).
docs/performance.md, "Decode batches above 16 on the codes".
"""

from __future__ import annotations

import torch

from llm.backends.torch.kernels.qgemm_tc import qgemm_tc, tc_kernel_runs
from llm.backends.torch.kernels.qgemv_common import triton_runs
from llm.backends.torch.kernels.qgemv_config import TC_BATCH_MAX_ROWS, qgemm_tc_config
from llm.backends.torch.kernels.qmma import qmma_matmul, qmma_runs
from llm.model.quant.tensor import QuantizedTensor

# formats whose compiled kernel has run at 17, 33 and 64 rows against the dequantized product on a
# GPU (H100, 2026-12-07, tests/torch_backend/test_qgemm_batch.py). Not yet: int8 (Q8_0's code
# path, a scale a row) and the Q5 formats, whose byte-permute path (`qgemm_tc.q5_permutes`) was
# only ever checked at 16 padded rows; they dequantize per call until a GPU has run them.
BATCH_FORMATS = ("q8_0", "q4_0", "q4_1", "q4_k", "q6_k", "int4_g128")


def batch_kernel_takes(x: torch.Tensor, w: QuantizedTensor) -> bool:
    """Whether `qgemm_batch` takes x [M, K] and w: more rows than the small batches' 16 and at
    most TC_BATCH_MAX_ROWS, bf16 on a GPU (or the interpreter), one of BATCH_FORMATS."""
    return (x.dim() == 2 and 16 < x.shape[0] <= TC_BATCH_MAX_ROWS and triton_runs(x)
            and w.format in BATCH_FORMATS and tc_kernel_runs(x, w))


def qgemm_batch(x: torch.Tensor, w: QuantizedTensor, bias: torch.Tensor | None = None,
                pdl: bool | None = None) -> torch.Tensor:
    """x [M, K] (bf16, 16 < M <= TC_BATCH_MAX_ROWS) @ w.dequantize().T (+ bias) -> [M, N]: the
    CUDA tensor-core kernel where `qmma_runs` (its rule `mma_rows`, no bias, aligned planes, its
    shared memory fits), else the Triton one with the small batches' launch rule
    (`qgemm_tc_config`, the same at every M)."""
    if not batch_kernel_takes(x, w):
        raise ValueError(f"qgemm_batch takes bf16 x [17..{TC_BATCH_MAX_ROWS}, K] and a format of "
                         f"the tensor-core kernels; got {tuple(x.shape)} {x.dtype}, {w.format}")
    x = x if x.stride(1) == 1 else x.contiguous()
    if qmma_runs(x, w, bias, pdl):
        return qmma_matmul(x, w, pdl)
    tc = qgemm_tc_config(x.shape[0], w.out_features, w.in_features)
    return qgemm_tc(x, w, bias, tc.block_n, tc.num_warps, tc.num_stages, pdl=pdl,
                    split_k=tc.split_k)
