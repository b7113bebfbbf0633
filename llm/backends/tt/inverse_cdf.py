"""Exact sampling over the whole vocabulary on the device, by inverse CDF.

`ttnn.sampling` sees at most 32 candidates, so a row with no top-k / top-p filter, top_k > 32,
or top_p < 1 without a top-k of at most 32 would draw from its 32 most likely tokens only. Here
such a row draws from its distribution over every token instead, with documented ops only:

- e = EXP(z - m) (m the row maximum), zeroed past the row's top-k / top-p thresholds
  (thresholds.py), and its inclusive running sum c over the vocabulary in two
  levels: each block of B tokens (a row reshaped to `[blocks, B]`) times an upper-triangular
  ones matrix, plus the block offsets (the block totals times a strictly upper-triangular one);
- a uniform u in [0, 1) per row from DIGITS draws of `ttnn.sampling` over 32 equal candidates
  (5 bits each, drawn right after the row's own draw, so from the same seeded per-row stream:
  the token still depends on the request's seed and position only), t = u * c[-1];
- the token is the number of c_j below t (LTZ(c - t) summed by a matmul with a ones column),
  the first index whose running sum reaches t: a masked or padded token (e = 0) is never it.

The running sums are fp32 (the emulator computes them exactly in fp32; on hardware, fp32
matmuls run at the math fidelity's precision, which is unverified here); u has 25 bits.
"""

from __future__ import annotations

import torch

from llm.backends.tt.mesh import TILE, Mesh
from llm.backends.tt.op_configs import OpConfigs
from llm.backends.tt.thresholds import ThresholdSearch

DIGITS = 5  # 5 bits each: u has 25 bits, as many as a float32 mantissa holds


def block_size(width: int) -> int:
    """The running-sum block: the largest of 256 / 128 / 64 / 32 dividing the padded width."""
    return next(b for b in (256, 128, 64, 32) if width % b == 0)


class InverseCdf:
    """The constants of the exact whole-vocabulary draw over a padded vocabulary `width`."""

    def __init__(self, mesh: Mesh, cfg: OpConfigs, width: int, ones) -> None:
        ttnn = mesh.ttnn
        self.mesh, self.width, self.ones = mesh, width, ones  # ones: bf16 [1, 1, width, 32]
        self.kernel = cfg.kernels["hifi4"]
        self.search = ThresholdSearch(mesh, ones, self.kernel)  # the top-k / top-p filters
        self.block = b = block_size(width)
        self.blocks = nb = width // b

        def put(t: torch.Tensor, dtype, layout):
            return ttnn.from_torch(t, dtype=dtype, layout=layout, device=mesh.device,
                                   memory_config=ttnn.DRAM_MEMORY_CONFIG,
                                   mesh_mapper=mesh.replicate())
        tile, rm = ttnn.TILE_LAYOUT, ttnn.ROW_MAJOR_LAYOUT
        self.within = put(torch.triu(torch.ones(b, b))[None, None], ttnn.bfloat16, tile)
        self.before = put(torch.triu(torch.ones(nb, nb), 1)[None, None], ttnn.bfloat16, tile)
        # the digit draws: 32 equal candidates 0..31, all kept (k = 32, p = 1, 1/T = 1)
        self.flat = put(torch.zeros(1, 1, TILE, TILE), ttnn.bfloat16, tile)
        self.digit_ids = put(torch.arange(TILE).repeat(TILE, 1)[None, None], ttnn.uint32, rm)
        self.k = put(torch.full((TILE,), TILE), ttnn.uint32, rm)
        self.one = put(torch.ones(TILE), ttnn.bfloat16, rm)

    def uniform(self, cores, id_column):
        """u in [0, 1) per row, fp32 `[1, 1, 32, 1]`, from DIGITS draws of the rows' streams."""
        ttnn = self.mesh.ttnn
        dram = ttnn.DRAM_MEMORY_CONFIG
        u = None
        for i in range(DIGITS):
            d = ttnn.sampling(self.flat, self.digit_ids, self.k, self.one, self.one,
                              sub_core_grids=cores)  # uint32 [1, 1, 1, 32] in 0..31
            col = id_column(ttnn, d)
            ttnn.deallocate(d)
            scaled = ttnn.multiply(col, float(TILE ** -(i + 1)), memory_config=dram)
            ttnn.deallocate(col)
            if u is None:
                u = scaled
            else:
                total = ttnn.add(u, scaled, memory_config=dram)
                for t in (u, scaled):
                    ttnn.deallocate(t)
                u = total
        return u

    def draw(self, e, u):
        """e fp32 `[1, 1, 32, width]` (each row's unnormalised distribution, ThresholdSearch.
        weights; freed) and u uniforms, fp32 `[1, 1, 32, 1]` -> the drawn token of each row,
        fp32 `[1, 1, 32, 1]`."""
        ttnn = self.mesh.ttnn
        dram = ttnn.DRAM_MEMORY_CONFIG
        b, nb = self.block, self.blocks
        # a reshape may be a view of its input: only the reshaped names are freed
        rows = ttnn.reshape(e, (1, 1, TILE * nb, b))  # each row as nb blocks of b tokens
        inside = ttnn.matmul(rows, self.within, dtype=ttnn.float32, memory_config=dram,
                             compute_kernel_config=self.kernel)  # running sums within each block
        ttnn.deallocate(rows)
        last = ttnn.slice(inside, (0, 0, 0, b - 1), (1, 1, TILE * nb, b), memory_config=dram)
        totals = ttnn.reshape(last, (1, 1, TILE, nb))  # [1, 1, 32, nb] block totals
        offsets = ttnn.matmul(totals, self.before, dtype=ttnn.float32, memory_config=dram,
                              compute_kernel_config=self.kernel)  # sums of the blocks before each
        end = ttnn.add(ttnn.slice(offsets, (0, 0, 0, nb - 1), (1, 1, TILE, nb),
                                  memory_config=dram),
                       ttnn.slice(totals, (0, 0, 0, nb - 1), (1, 1, TILE, nb),
                                  memory_config=dram), memory_config=dram)  # row totals
        ttnn.deallocate(totals)
        off_col = ttnn.reshape(offsets, (1, 1, TILE * nb, 1))
        running = ttnn.add(inside, off_col, memory_config=dram)  # [1, 1, 32 nb, b]
        for t in (inside, off_col):
            ttnn.deallocate(t)
        c = ttnn.reshape(running, (1, 1, TILE, self.width))
        target = ttnn.multiply(end, u, memory_config=dram)
        ttnn.deallocate(end)
        below = ttnn.subtract(c, target, activations=[ttnn.UnaryOpType.LTZ],
                              dtype=ttnn.bfloat16, memory_config=dram)  # 1 where c_j < t
        for t in (c, target):
            ttnn.deallocate(t)
        counts = ttnn.matmul(below, self.ones, dtype=ttnn.float32, memory_config=dram,
                             compute_kernel_config=self.kernel)  # [1, 1, 32, 32], equal columns
        ttnn.deallocate(below)
        token = ttnn.slice(counts, (0, 0, 0, 0), (1, 1, TILE, 1), memory_config=dram)
        ttnn.deallocate(counts)
        return token
