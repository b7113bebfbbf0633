"""Rotary embedding setup for `rotary_embedding_llama`: cos/sin tables in Meta's interleaved
order and the 32x32 transformation matrices (prefill: one; decode: one per user, height-sharded).

The tables are computed with the same inverse frequencies (RoPE scaling included) as the torch
backend; Q/K weight rows are permuted to the interleaved order at conversion (weights.py), so
rotating adjacent pairs here equals HF's rotate-half RoPE on the original rows.
"""

from __future__ import annotations

import torch

from llm.backends.tt.mesh import TILE, Mesh
from llm.backends.tt.op_configs import OpConfigs
from llm.model.config import ModelConfig
from llm.model.rope import cos_sin, has_long_table


def interleaved_tables(config: ModelConfig, length: int, long: bool = False
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin `[length, head_dim]` fp32 with each frequency repeated for its pair:
    [c0, c0, c1, c1, ...]; `long` as in `llm.model.rope.cos_sin` (LongRoPE)."""
    cos, sin = cos_sin(config, length, long)  # [L, hd/2]
    return cos.repeat_interleave(2, -1), sin.repeat_interleave(2, -1)


def transformation_matrix() -> torch.Tensor:
    """T `[32, 32]` with (x @ T)[2k] = -x[2k+1] and (x @ T)[2k+1] = x[2k]."""
    t = torch.zeros(TILE, TILE)
    idx = torch.arange(0, TILE, 2)
    t[idx, idx + 1] = 1.0
    t[idx + 1, idx] = -1.0
    return t


class RotarySetup:
    """Device-resident cos/sin tables and transformation matrices, built once. With LongRoPE a
    second pair of prefill tables holds the long factors, for a prefill reaching past
    original_max_position_embeddings; decode gathers from the single-step tables (long rows from
    there on), as transformers rotates."""

    def __init__(self, mesh: Mesh, config: ModelConfig, cfg: OpConfigs, length: int) -> None:
        ttnn = mesh.ttnn
        self.mesh, self.cfg = mesh, cfg
        self.batch = cfg.geo.batch
        self.length = length
        cos, sin = interleaved_tables(config, length)
        rep = mesh.replicate()

        def put(x, layout, mem=None):
            return ttnn.from_torch(x, dtype=ttnn.bfloat16, layout=layout, device=mesh.device,
                                   memory_config=mem or ttnn.DRAM_MEMORY_CONFIG, mesh_mapper=rep)

        self.cos_prefill = put(cos[None, None], ttnn.TILE_LAYOUT)  # [1, 1, L, hd]
        self.sin_prefill = put(sin[None, None], ttnn.TILE_LAYOUT)
        self.scaling = config.rope_scaling
        self.long_prefill = None
        if has_long_table(config):
            cos_long, sin_long = interleaved_tables(config, length, long=True)
            self.long_prefill = (put(cos_long[None, None], ttnn.TILE_LAYOUT),
                                 put(sin_long[None, None], ttnn.TILE_LAYOUT))
        self.cos_rows = put(cos[None, None], ttnn.ROW_MAJOR_LAYOUT)  # embedding tables
        self.sin_rows = put(sin[None, None], ttnn.ROW_MAJOR_LAYOUT)
        tm = transformation_matrix()
        self.trans_prefill = put(tm[None, None], ttnn.TILE_LAYOUT)  # [1, 1, 32, 32]
        self.trans_decode = put(tm.repeat(1, 1, self.batch, 1), ttnn.TILE_LAYOUT,
                                cfg.trans_mat_memcfg)  # [1, 1, 32 B, 32] one per user core

    def rotate(self, q, k, rot, decode: bool):
        """q, k heads rotated by rot = (cos, sin) from `prefill` or `decode` with that mode's
        transformation matrix -> (q_rot, k_rot) of the same shapes; q and k are kept."""
        rope = self.mesh.ttnn.experimental.rotary_embedding_llama
        cos, sin = rot
        trans = self.trans_decode if decode else self.trans_prefill
        return (rope(q, cos, sin, trans, is_decode_mode=decode),
                rope(k, cos, sin, trans, is_decode_mode=decode))

    def prefill(self, seq_len: int, start: int = 0, end: int | None = None):
        """cos, sin `[1, 1, seq_len, hd]` for positions start .. start + seq_len - 1; `end`: one
        past the chunk's last real (unpadded) position, which picks LongRoPE's factors (default
        start + seq_len)."""
        if start + seq_len > self.length:
            raise ValueError(f"prefill of positions [{start}, {start + seq_len}) exceeds the RoPE "
                             f"table ({self.length})")
        ttnn = self.mesh.ttnn
        hd = self.cfg.geo.head_dim
        tables = (self.cos_prefill, self.sin_prefill)
        end = start + seq_len if end is None else end
        if self.long_prefill is not None and self.scaling.uses_long(end):
            tables = self.long_prefill
        return tuple(ttnn.slice(t, (0, 0, start, 0), (1, 1, start + seq_len, hd))
                     for t in tables)

    def decode(self, rot_idxs):
        """rot_idxs uint32 `[1, 32]` (user positions, padded) -> cos, sin `[1, B, 1, hd]`,
        height-sharded one user per core, gathered on the device."""
        ttnn = self.mesh.ttnn
        hd = self.cfg.geo.head_dim
        out = []
        for table in (self.cos_rows, self.sin_rows):
            r = ttnn.embedding(rot_idxs, table, layout=ttnn.TILE_LAYOUT)  # [1, 32, hd]
            r = ttnn.transpose(ttnn.unsqueeze_to_4D(r), 1, 2)  # [1, 32, 1, hd]
            r = ttnn.slice(r, (0, 0, 0, 0), (1, self.batch, 1, hd))  # [1, B, 1, hd]
            out.append(ttnn.interleaved_to_sharded(r, self.cfg.user_height_memcfg))
        return tuple(out)
