"""Op configs derived from the shapes: decode matmul grids divide K and N, LM head chunks respect
max_columns_per_device, prefill lengths fit the chunked matmuls; configs are built once."""

from __future__ import annotations

import math

import pytest

from llm.backends.tt.op_configs import OpConfigs, TTConfigError, _prefill_lengths
from llm.backends.tt.precision import precision
from llm.backends.tt.runner import open_mesh
from llm.model.config import ModelConfig, RuntimeConfig

SMOLLM = ModelConfig(arch="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                     num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
                     max_position_embeddings=8192, tie_word_embeddings=True)
LLAMA8B = ModelConfig(arch="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                      num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                      max_position_embeddings=8192)


@pytest.mark.parametrize("config,mesh", [(SMOLLM, (1, 1)), (SMOLLM, (1, 2)), (SMOLLM, (1, 8)),
                                         (LLAMA8B, (1, 1)), (LLAMA8B, (1, 8))])
def test_decode_matmul_grids_divide_k_and_n(config, mesh) -> None:
    m, _ = open_mesh(mesh, "emulator")
    rt = RuntimeConfig(max_batch=32, max_seq_len=4096, block_size=64)
    cfg = OpConfigs.build(m, config, rt, precision(m.ttnn, "performance", config.num_layers))
    geo = cfg.geo
    for mm in (cfg.qkv, cfg.w1, cfg.w2, *cfg.lm_head):
        kt, nt = mm.k // 32, math.ceil(mm.n / 32)
        assert kt % mm.ncores == 0 and nt % mm.ncores == 0, mm
        assert (kt // mm.ncores) % mm.program_config.in0_block_w == 0
        assert mm.program_config.per_core_N * mm.ncores >= nt
        assert mm.input_memcfg.shard_spec.shape == (32, mm.k // mm.ncores)
    assert cfg.wo.ncores == geo.n_heads  # the nlp_concat_heads_decode grid, a head per core
    assert all(mm.n <= 16384 for mm in cfg.lm_head)
    assert sum(mm.n for mm in cfg.lm_head) == geo.vocab_local
    x, y = cfg.residual_grid
    assert x <= 8 and y <= 8 and (geo.dim // 32) % (x * y) == 0
    assert cfg.norm_program_config.block_w * x * y == geo.dim // 32
    for s in cfg.prefill_lengths:
        for group, chunk in (("wqkv", cfg.qkv_chunk), ("w1", cfg.mlp_chunk)):
            pc = cfg.prefill_matmul(group, s, chunk, cfg.kernel(group, 0))
            gx, gy = pc.compute_with_storage_grid_size
            assert pc.per_core_M * gy * 32 >= min(s, chunk)
            assert s <= chunk or s % chunk == 0


def test_prefill_lengths_and_clear_errors() -> None:
    assert _prefill_lengths(8192, 1024, 2048)[-6:] == (992, 1024, 2048, 4096, 6144, 8192)
    assert _prefill_lengths(100, 1024, 2048) == (32, 64, 96, 128)
    m, _ = open_mesh((1, 2), "emulator")
    tiny = ModelConfig(arch="llama", vocab_size=64, hidden_size=96, intermediate_size=64,
                       num_layers=1, num_heads=1, num_kv_heads=1, head_dim=96,
                       max_position_embeddings=64)
    with pytest.raises(TTConfigError, match="a mesh of 2 devices exceeds the model's 1 query"):
        OpConfigs.build(m, tiny, RuntimeConfig(), precision(m.ttnn, "accuracy", 1))
