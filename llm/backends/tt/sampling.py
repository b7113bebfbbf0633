"""Temperature / top-k / top-p sampling on the device, with ttnn's sampling ops as tt_transformers
samples: `topk` (k = 32) over the gathered logits, then `manual_seed` and `sampling`. Greedy
decoding does not come here: it is the argmax fast path (lm_head.py).

Per user row of the 32-row decode tile: k, p, temp (= 1/T) and a seed, as device tensors, so the
decode trace serves any mix of requests (a greedy row is k = 1). The candidates beyond a row's
top-k are masked to -inf before `ttnn.sampling`, whose softmax then runs over exactly the row's
top-k: top-p cuts the renormalised top-k distribution, as the torch backend does.

A row with no filter at all (top_k = 0, top_p = 1) draws exactly from the whole vocabulary
instead (`whole_vocabulary`, by inverse CDF: inverse_cdf.py) when the caller passes `cdf`.
What cannot be exact: `ttnn.sampling` keeps at most 32 candidates, so top_k > 32, or top_k = 0
with top_p < 1, samples from the 32 most likely tokens (tt_transformers' max_top_k is 32 too),
and p and 1/T are bf16 (the op's dtype).

Seeds: the token at sequence position q of a request with seed s is drawn right after
`manual_seed` of its row's core with `seed_base(s) + q`, so it depends on (s, q) and the logits
only, never on the other rows or on the row it occupies. The decode graph advances the seeds
with `plus_one`, as it advances the positions.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch

from llm.backends.tt.inverse_cdf import InverseCdf
from llm.backends.tt.mesh import TILE, Mesh
from llm.backends.tt.op_configs import OpConfigs
from llm.engine.contract.sampling_params import SamplingParams

MAX_TOP_K = 32  # ttnn.sampling's limit on k (and the candidates it can see)
TOPK_MAX_WIDTH = 65536  # the widest row ttnn.topk takes in one call
_MASKED = -1e30  # a masked candidate's value: finite in bf16, exp() underflows to 0
# the Sampler's per-row device inputs (inv_temp: 1/T in fp32, 1 for greedy rows; exact: 1.0 for
# rows drawn from the whole vocabulary by inverse_cdf.py)
SAMPLING_INPUTS = ("k", "p", "temp", "rank_mask", "seeds", "inv_temp", "exact")


def seed_base(seed: int) -> int:
    """A request's seed (any int64) mixed into 31 bits; position q draws with base + q."""
    digest = hashlib.blake2b(int(seed).to_bytes(8, "little", signed=True), digest_size=4).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


def whole_vocabulary(params: SamplingParams | None) -> bool:
    """A row that samples with no top-k / top-p filter: drawn exactly by inverse_cdf.py."""
    return params is not None and not params.greedy and params.top_k == 0 and params.top_p == 1


def row_settings(params: SamplingParams | None) -> tuple[int, float, float]:
    """(k, p, 1/T) of one row; a greedy or idle row draws its top candidate (k = 1)."""
    if params is None or params.greedy:
        return 1, 1.0, 1.0
    k = params.top_k if 1 <= params.top_k <= MAX_TOP_K else MAX_TOP_K
    return k, float(params.top_p), 1.0 / params.temperature


def host_inputs(rows: Mapping[int, tuple[SamplingParams, int, int]]) -> dict[str, torch.Tensor]:
    """The sampling inputs of the 32 rows as host tensors: rows maps a row to (params, seed,
    position of the token it draws); other rows are greedy. k, seeds int64 [32]; p, temp float
    [32]; rank_mask float [1, 1, 32, 32] (0 for the row's first k candidates, -inf after);
    inv_temp, exact float [1, 1, 32, 1]."""
    k = torch.ones(TILE, dtype=torch.int64)
    p, temp = torch.ones(TILE), torch.ones(TILE)
    seeds = torch.zeros(TILE, dtype=torch.int64)
    inv_temp, exact = torch.ones(1, 1, TILE, 1), torch.zeros(1, 1, TILE, 1)
    for r, (params, seed, position) in rows.items():
        k[r], p[r], temp[r] = row_settings(params)
        seeds[r] = seed_base(seed) + position
        inv_temp[0, 0, r] = 1.0 / params.temperature if params.temperature > 0 else 1.0
        exact[0, 0, r] = float(whole_vocabulary(params))
    ranks = torch.arange(MAX_TOP_K)
    rank_mask = torch.where(ranks[None, :] < k[:, None], 0.0, _MASKED)[None, None]
    return {"k": k, "p": p, "temp": temp, "rank_mask": rank_mask, "seeds": seeds,
            "inv_temp": inv_temp, "exact": exact}


def device_layouts(ttnn) -> dict[str, tuple]:
    """(dtype, layout) of each sampling input on the device (ttnn.sampling's requirements)."""
    rm = ttnn.ROW_MAJOR_LAYOUT
    tile = ttnn.TILE_LAYOUT
    return {"k": (ttnn.uint32, rm), "p": (ttnn.bfloat16, rm), "temp": (ttnn.bfloat16, rm),
            "rank_mask": (ttnn.bfloat16, tile), "seeds": (ttnn.uint32, rm),
            "inv_temp": (ttnn.float32, tile), "exact": (ttnn.float32, tile)}


class Sampler:
    """The on-device sampling of the 32 rows of a logits tile."""

    def __init__(self, mesh: Mesh, cfg: OpConfigs) -> None:
        ttnn = mesh.ttnn
        self.mesh, geo = mesh, cfg.geo
        self.supported = geo.vocab_padded <= TOPK_MAX_WIDTH
        # the 32 cores the rows draw on (row u on core u), for manual_seed and sampling alike
        self.cores = ttnn.num_cores_to_corerangeset(
            TILE, mesh.device.compute_with_storage_grid_size(), row_wise=True)
        self.user_ids = ttnn.from_torch(torch.arange(TILE), dtype=ttnn.uint32,
                                        layout=ttnn.ROW_MAJOR_LAYOUT, device=mesh.device,
                                        memory_config=ttnn.DRAM_MEMORY_CONFIG,
                                        mesh_mapper=mesh.replicate())
        self.vocab_mask = None  # the padded vocabulary columns can never be drawn
        if geo.vocab_padded != geo.vocab:
            row = torch.zeros(1, 1, 1, geo.vocab_padded)
            row[..., geo.vocab:] = _MASKED
            self.vocab_mask = ttnn.from_torch(row, dtype=ttnn.bfloat16, layout=ttnn.TILE_LAYOUT,
                                              device=mesh.device,
                                              memory_config=ttnn.DRAM_MEMORY_CONFIG,
                                              mesh_mapper=mesh.replicate())

    def put(self, host: Mapping[str, torch.Tensor]) -> dict:
        """Host sampling inputs (host_inputs) as device tensors, replicated."""
        ttnn, mesh = self.mesh.ttnn, self.mesh
        layouts = device_layouts(ttnn)
        return {name: ttnn.from_torch(v, dtype=layouts[name][0], layout=layouts[name][1],
                                      device=mesh.device, memory_config=ttnn.DRAM_MEMORY_CONFIG,
                                      mesh_mapper=mesh.replicate())
                for name, v in host.items()}

    def gathered(self, logits):
        """logits `[1, 1, 32, V_local]` TILE (this device's vocabulary slice) -> the whole padded
        vocabulary `[1, 1, 32, V_pad]` on every device, padded columns at -inf (a new tensor
        unless the mesh is one device and nothing is padded)."""
        if not self.supported:
            raise ValueError(f"tt backend: sampling needs a padded vocabulary of at most "
                             f"{TOPK_MAX_WIDTH} (one ttnn.topk)")
        ttnn = self.mesh.ttnn
        dram = ttnn.DRAM_MEMORY_CONFIG
        full = self.mesh.all_gather(logits, 3, dram)  # [1, 1, 32, V_pad]
        if self.vocab_mask is not None:
            masked = ttnn.add(full, self.vocab_mask, memory_config=dram)
            if full is not logits:
                ttnn.deallocate(full)
            full = masked
        return full

    def draw(self, values, indices, *, k, p, temp, rank_mask, seeds):
        """The candidates `topk(x, 32)` of whole-vocabulary logits x (values TILE bf16 or fp32,
        indices uint16 / uint32, best first; not freed) -> one drawn token id per row, uint32
        `[1, 1, 1, 32]` (trace-safe)."""
        ttnn = self.mesh.ttnn
        dram = ttnn.DRAM_MEMORY_CONFIG
        kept = ttnn.add(values, rank_mask, memory_config=dram)  # ranks >= k[row] -> -inf
        if kept.dtype != ttnn.bfloat16:  # ttnn.sampling takes bf16 values
            narrow = ttnn.typecast(kept, ttnn.bfloat16, memory_config=dram)
            ttnn.deallocate(kept)
            kept = narrow
        wide = ttnn.typecast(indices, ttnn.uint32, memory_config=dram) \
            if indices.dtype != ttnn.uint32 else indices
        ids = ttnn.untilize(wide, memory_config=dram)  # uint32 ROW_MAJOR [1, 1, 32, 32]
        if wide is not indices:
            ttnn.deallocate(wide)
        ttnn.manual_seed(seeds, user_ids=self.user_ids, sub_core_grids=self.cores)
        out = ttnn.sampling(kept, ids, k, p, temp, sub_core_grids=self.cores)  # [1, 1, 1, 32]
        ttnn.deallocate(kept)
        ttnn.deallocate(ids)
        return out

    def whole_vocabulary(self, drawn, z, m, exact, cdf: InverseCdf):
        """Replace the draws of the rows with exact = 1 by an inverse-CDF draw from softmax(z)
        over the whole vocabulary (inverse_cdf.py): drawn uint32 `[1, 1, 1, 32]` (freed), z fp32
        `[1, 1, 32, V_pad]`, m its row maxima `[1, 1, 32, 1]` -> uint32 `[1, 1, 1, 32]`."""
        ttnn = self.mesh.ttnn
        dram = ttnn.DRAM_MEMORY_CONFIG
        u = cdf.uniform(self.cores, id_column)  # the rows' streams, right after their draws
        tok = cdf.draw(z, m, u)
        col = id_column(ttnn, drawn)
        ttnn.deallocate(drawn)
        diff = ttnn.subtract(tok, col, memory_config=dram)
        moved = ttnn.multiply(diff, exact, memory_config=dram)
        mixed = ttnn.add(col, moved, memory_config=dram)  # ids < 2^24: exact in fp32
        for t in (u, tok, col, diff, moved):
            ttnn.deallocate(t)
        row = ttnn.transpose(mixed, 2, 3, memory_config=dram)  # [1, 1, 1, 32]
        ttnn.deallocate(mixed)
        ids = ttnn.typecast(row, ttnn.uint32, memory_config=dram)
        ttnn.deallocate(row)
        out = ttnn.to_layout(ids, ttnn.ROW_MAJOR_LAYOUT, memory_config=dram)
        ttnn.deallocate(ids)
        return out

    def __call__(self, logits, *, k, p, temp, rank_mask, seeds, inv_temp, exact,
                 cdf: InverseCdf | None = None):
        """logits `[1, 1, 32, V_local]` TILE bf16 (this device's vocabulary slice) -> one drawn
        token id per row, uint32 `[1, 1, 1, 32]` on every device (trace-safe). With `cdf`, the
        rows with exact = 1 draw from the whole vocabulary (whole_vocabulary)."""
        ttnn = self.mesh.ttnn
        dram = ttnn.DRAM_MEMORY_CONFIG
        full = self.gathered(logits)
        values, indices = ttnn.topk(full, k=MAX_TOP_K, dim=-1, largest=True, sorted=True,
                                    memory_config=dram)  # [1, 1, 32, 32]
        out = self.draw(values, indices, k=k, p=p, temp=temp, rank_mask=rank_mask, seeds=seeds)
        if cdf is not None:
            wide = ttnn.typecast(full, ttnn.float32, memory_config=dram)
            z = ttnn.multiply(wide, inv_temp, memory_config=dram)
            top = ttnn.slice(values, (0, 0, 0, 0), (1, 1, TILE, 1), memory_config=dram)
            m = ttnn.multiply(top, inv_temp, dtype=ttnn.float32, memory_config=dram)
            out = self.whole_vocabulary(out, z, m, exact, cdf)
            for t in (wide, z, top, m):
                ttnn.deallocate(t)
        if full is not logits:
            ttnn.deallocate(full)
        ttnn.deallocate(values)
        ttnn.deallocate(indices)
        return out


def id_column(ttnn, ids):
    """uint32 ROW_MAJOR `[1, 1, 1, 32]` token ids -> fp32 `[1, 1, 32, 1]` TILE."""
    dram = ttnn.DRAM_MEMORY_CONFIG
    tiled = ttnn.to_layout(ids, ttnn.TILE_LAYOUT, memory_config=dram)
    row = ttnn.typecast(tiled, ttnn.float32, memory_config=dram)
    ttnn.deallocate(tiled)
    col = ttnn.transpose(row, 2, 3, memory_config=dram)
    ttnn.deallocate(row)
    return col
