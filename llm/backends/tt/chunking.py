"""Prefill matmuls over long sequences: `[1, 1, S, K]` is reshaped to `[1, S/chunk, chunk, K]`
so that each matmul program sees at most `chunk` rows (the 2-D program config is sized for
`chunk`, batch looped), then reshaped back."""

from __future__ import annotations

from llm.backends.tt.op_configs import OpConfigs


def linear_in_chunks(ttnn, x, weight, chunk: int, **kwargs):
    """x `[1, 1, S, K]` @ weight `[1, 1, K, N]` -> `[1, 1, S, N]`; S > chunk needs
    S % chunk == 0."""
    s, k = x.shape[-2], x.shape[-1]
    if s <= chunk:
        return ttnn.linear(x, weight, **kwargs)
    if s % chunk:
        raise ValueError(f"prefill of {s} rows is not a multiple of the {chunk}-row chunk")
    x = ttnn.reshape(x, (1, s // chunk, chunk, k))  # [1, S/chunk, chunk, K]
    out = ttnn.linear(x, weight, **kwargs)  # [1, S/chunk, chunk, N]
    return ttnn.reshape(out, (1, 1, s, out.shape[-1]))  # [1, 1, S, N]


def prefill_linear(ttnn, cfg: OpConfigs, x, weight, shape: str, chunk: int, kernel):
    """A prefill projection: x `[1, 1, S, K]` DRAM @ weight `[1, 1, K, N]` -> `[1, 1, S, N]`
    bf16 DRAM, in matmuls of at most `chunk` rows with the 2-D program config of the weight
    shape `shape` (OpConfigs.prefill_matmul) under compute-kernel config `kernel`."""
    return linear_in_chunks(ttnn, x, weight, chunk,
                            program_config=cfg.prefill_matmul(shape, x.shape[-2], chunk, kernel),
                            memory_config=ttnn.DRAM_MEMORY_CONFIG, dtype=ttnn.bfloat16,
                            compute_kernel_config=kernel)
