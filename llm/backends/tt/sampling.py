"""Temperature / top-k / top-p sampling on the device, with ttnn's sampling ops as tt_transformers
samples: `topk` (k = 32) over the gathered logits, then `manual_seed` and `sampling`. Greedy
decoding does not come here: it is the argmax fast path (lm_head.py).

Per user row of the 32-row decode tile: k, p, temp (= 1/T) and a seed, as device tensors, so the
decode trace serves any mix of requests. The candidates beyond a row's top-k are masked to -inf
before `ttnn.sampling`, whose softmax then runs over exactly the row's top-k: top-p cuts the
renormalised top-k distribution, as the torch backend does. min_p masks the candidates below
max + T ln(min_p) first (min_gap), as the torch backend drops them before top-k / top-p.

`ttnn.sampling` keeps at most 32 candidates, so a row whose filter may reach past them (top_k =
0 or > 32; `exact_row`) draws by inverse CDF over the whole vocabulary instead when the caller
passes `cdf` (inverse_cdf.py), after exact top-k / top-p thresholds (thresholds.py) as the step's
`Filters` ask. Greedy and top_k = 1 rows take the argmax of the logits (its first index on ties,
as the greedy path), not `ttnn.topk`'s first candidate, whose order among ties is arbitrary on
hardware. What stays rounded: p and 1/T of the 32-candidate path are bf16 (the op's dtype).

Seeds: the token at sequence position q of a request with seed s is drawn right after
`manual_seed` of its row's core with `seed_base(s) + q`, so it depends on (s, q) and the logits
only, never on the other rows or on the row it occupies. The decode graph advances the seeds
with `plus_one`, as it advances the positions.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping

import torch

from llm.backends.tt.inverse_cdf import InverseCdf
from llm.backends.tt.mesh import TILE, Mesh
from llm.backends.tt.op_configs import OpConfigs
from llm.backends.tt.thresholds import Filters
from llm.engine.contract.sampling_params import SamplingParams

MAX_TOP_K = 32  # ttnn.sampling's limit on k (and the candidates it can see)
TOPK_MAX_WIDTH = 65536  # the widest row ttnn.topk takes in one call
_MASKED = -1e30  # a masked candidate's value: finite in bf16, exp() underflows to 0
_NO_TOP_K = float(2 ** 24)  # bound_k of a row without top-k: no count reaches it
_NO_TOP_P = 2.0  # bound_p of a row without top-p: no mass reaches it
_NO_MIN_GAP = -1e30  # min_gap of a row without min_p: no candidate is that far below the top
_NO_MIN_LOG = -128.0  # min_log of such a row: exp(-128) is 0 in fp32 (thresholds.SPAN)
# the Sampler's per-row device inputs (inv_temp: 1/T in fp32, 1 for greedy rows; exact: 1.0 for
# rows drawn by inverse_cdf.py; greedy: 1.0 for rows taking the argmax; bound_k = top_k - 0.5 and
# bound_p = top_p for the exact rows' threshold searches, thresholds.py; min_gap = T ln(min_p)
# for the 32 candidates' raw logits, min_log = ln(min_p) for the exact rows' z = logits / T)
SAMPLING_INPUTS = ("k", "p", "temp", "rank_mask", "seeds", "inv_temp", "exact", "greedy",
                   "bound_k", "bound_p", "min_gap", "min_log")
DRAW_INPUTS = ("k", "p", "temp", "rank_mask", "seeds", "min_gap")  # Sampler.draw's


def seed_base(seed: int) -> int:
    """A request's seed (any int64) mixed into 31 bits; position q draws with base + q."""
    digest = hashlib.blake2b(int(seed).to_bytes(8, "little", signed=True), digest_size=4).digest()
    return int.from_bytes(digest, "little") & 0x7FFFFFFF


def exact_row(params: SamplingParams | None) -> bool:
    """A sampling row whose top-k is 0 (off) or past ttnn.sampling's 32 candidates: drawn by
    inverse CDF (inverse_cdf.py) after its exact filters (thresholds.py)."""
    return params is not None and not params.greedy and not 1 <= params.top_k <= MAX_TOP_K


def argmax_row(params: SamplingParams | None) -> bool:
    """A row that takes the argmax: idle or greedy (temperature 0 or top_k = 1)."""
    return params is None or params.greedy


def filters_for(params: Iterable[SamplingParams]) -> Filters | None:
    """The threshold searches a batch's exact rows need (None: no exact row)."""
    rows = [p for p in params if exact_row(p)]
    if not rows:
        return None
    return Filters(top_k=any(p.top_k > MAX_TOP_K for p in rows),
                   top_p=any(p.top_p < 1 for p in rows),
                   min_p=any(p.min_p > 0 for p in rows))


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
    inv_temp, exact, greedy, bound_k, bound_p, min_gap, min_log float [1, 1, 32, 1]."""
    k = torch.ones(TILE, dtype=torch.int64)
    p, temp = torch.ones(TILE), torch.ones(TILE)
    seeds = torch.zeros(TILE, dtype=torch.int64)
    col = {name: torch.full((1, 1, TILE, 1), v) for name, v in
           (("inv_temp", 1.0), ("exact", 0.0), ("greedy", 1.0), ("bound_k", _NO_TOP_K),
            ("bound_p", _NO_TOP_P), ("min_gap", _NO_MIN_GAP), ("min_log", _NO_MIN_LOG))}
    for r, (params, seed, position) in rows.items():
        k[r], p[r], temp[r] = row_settings(params)
        seeds[r] = seed_base(seed) + position
        col["inv_temp"][0, 0, r] = 1.0 / params.temperature if params.temperature > 0 else 1.0
        col["exact"][0, 0, r] = float(exact_row(params))
        col["greedy"][0, 0, r] = float(argmax_row(params))
        if exact_row(params) and params.top_k > MAX_TOP_K:
            col["bound_k"][0, 0, r] = params.top_k - 0.5
        if exact_row(params) and params.top_p < 1:
            col["bound_p"][0, 0, r] = float(params.top_p)
        if not argmax_row(params) and params.min_p > 0:
            col["min_log"][0, 0, r] = math.log(params.min_p)
            col["min_gap"][0, 0, r] = params.temperature * math.log(params.min_p)
    ranks = torch.arange(MAX_TOP_K)
    rank_mask = torch.where(ranks[None, :] < k[:, None], 0.0, _MASKED)[None, None]
    return {"k": k, "p": p, "temp": temp, "rank_mask": rank_mask, "seeds": seeds, **col}


def device_layouts(ttnn) -> dict[str, tuple]:
    """(dtype, layout) of each sampling input on the device (ttnn.sampling's requirements)."""
    rm = ttnn.ROW_MAJOR_LAYOUT
    tile = ttnn.TILE_LAYOUT
    return {"k": (ttnn.uint32, rm), "p": (ttnn.bfloat16, rm), "temp": (ttnn.bfloat16, rm),
            "rank_mask": (ttnn.bfloat16, tile), "seeds": (ttnn.uint32, rm),
            **{name: (ttnn.float32, tile)
               for name in ("inv_temp", "exact", "greedy", "bound_k", "bound_p", "min_gap",
                            "min_log")}}


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

    def draw(self, values, indices, *, k, p, temp, rank_mask, seeds, min_gap):
        """The candidates `topk(x, 32)` of whole-vocabulary logits x (values TILE bf16 or fp32,
        indices uint16 / uint32, best first; not freed) -> one drawn token id per row, uint32
        `[1, 1, 1, 32]` (trace-safe)."""
        ttnn = self.mesh.ttnn
        dram = ttnn.DRAM_MEMORY_CONFIG
        ranked = ttnn.add(values, rank_mask, memory_config=dram)  # ranks >= k[row] -> -inf
        kept = self._min_p(values, ranked, min_gap)
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

    def _min_p(self, values, ranked, min_gap):
        """ranked with the candidates below the row's top + min_gap masked (ranked freed)."""
        ttnn = self.mesh.ttnn
        dram = ttnn.DRAM_MEMORY_CONFIG
        top = ttnn.slice(values, (0, 0, 0, 0), (1, 1, TILE, 1), memory_config=dram)
        floor = ttnn.add(top, min_gap, dtype=ttnn.float32, memory_config=dram)  # [1, 1, 32, 1]
        below = ttnn.subtract(values, floor, activations=[ttnn.UnaryOpType.LTZ],
                              dtype=ttnn.float32, memory_config=dram)  # 1 where below
        masked = ttnn.multiply(below, _MASKED, memory_config=dram)
        kept = ttnn.add(ranked, masked, dtype=ranked.dtype, memory_config=dram)
        for t in (top, floor, below, masked, ranked):
            ttnn.deallocate(t)
        return kept

    def finish(self, drawn, x, z, m, inputs: Mapping, cdf: InverseCdf | None = None,
               filters: Filters | None = None):
        """The rows' tokens from `ttnn.sampling`'s draws (drawn uint32 `[1, 1, 1, 32]`, freed):
        with `cdf`, the rows with exact = 1 replaced by an inverse-CDF draw from their filtered
        distribution (z fp32 `[1, 1, 32, V_pad]` = x / T, m its row maxima `[1, 1, 32, 1]`,
        `filters` the searches to run); then the rows with greedy = 1 replaced by the argmax of
        x (`[1, 1, 32, V_pad]` TILE, bf16 or fp32) -> uint32 `[1, 1, 1, 32]` ROW_MAJOR."""
        ttnn = self.mesh.ttnn
        dram = ttnn.DRAM_MEMORY_CONFIG
        col = id_column(ttnn, drawn)  # fp32 [1, 1, 32, 1]
        ttnn.deallocate(drawn)
        if cdf is not None:
            u = cdf.uniform(self.cores, id_column)  # the rows' streams, right after their draws
            e = cdf.search.weights(z, m, inputs["bound_k"], inputs["bound_p"],
                                   filters or Filters(), inputs["min_log"])
            tok = cdf.draw(e, u)
            ttnn.deallocate(u)
            col = _mix(ttnn, col, tok, inputs["exact"])
        best = ttnn.argmax(x, dim=3, keepdim=True, memory_config=dram)  # uint32 [1, 1, 32, 1]
        tiled = ttnn.to_layout(best, ttnn.TILE_LAYOUT, memory_config=dram)
        ttnn.deallocate(best)
        best_col = ttnn.typecast(tiled, ttnn.float32, memory_config=dram)
        ttnn.deallocate(tiled)
        col = _mix(ttnn, col, best_col, inputs["greedy"])
        row = ttnn.transpose(col, 2, 3, memory_config=dram)  # [1, 1, 1, 32]
        ttnn.deallocate(col)
        ids = ttnn.typecast(row, ttnn.uint32, memory_config=dram)
        ttnn.deallocate(row)
        out = ttnn.to_layout(ids, ttnn.ROW_MAJOR_LAYOUT, memory_config=dram)
        ttnn.deallocate(ids)
        return out

    def __call__(self, logits, *, k, p, temp, rank_mask, seeds, inv_temp, exact, greedy,
                 bound_k, bound_p, min_gap, min_log, cdf: InverseCdf | None = None,
                 filters: Filters | None = None):
        """logits `[1, 1, 32, V_local]` TILE bf16 (this device's vocabulary slice) -> one drawn
        token id per row, uint32 `[1, 1, 1, 32]` on every device (trace-safe). With `cdf`, the
        rows with exact = 1 draw by inverse CDF after the `filters` searches (finish)."""
        ttnn = self.mesh.ttnn
        dram = ttnn.DRAM_MEMORY_CONFIG
        full = self.gathered(logits)
        values, indices = ttnn.topk(full, k=MAX_TOP_K, dim=-1, largest=True, sorted=True,
                                    memory_config=dram)  # [1, 1, 32, 32]
        drawn = self.draw(values, indices, k=k, p=p, temp=temp, rank_mask=rank_mask, seeds=seeds,
                          min_gap=min_gap)
        inputs = {"exact": exact, "greedy": greedy, "bound_k": bound_k, "bound_p": bound_p,
                  "min_log": min_log}
        z = m = None
        if cdf is not None:
            wide = ttnn.typecast(full, ttnn.float32, memory_config=dram)
            z = ttnn.multiply(wide, inv_temp, memory_config=dram)
            ttnn.deallocate(wide)
            top = ttnn.slice(values, (0, 0, 0, 0), (1, 1, TILE, 1), memory_config=dram)
            m = ttnn.multiply(top, inv_temp, dtype=ttnn.float32, memory_config=dram)
            ttnn.deallocate(top)
        out = self.finish(drawn, full, z, m, inputs, cdf, filters)
        for t in (z, m):
            if t is not None:
                ttnn.deallocate(t)
        if full is not logits:
            ttnn.deallocate(full)
        ttnn.deallocate(values)
        ttnn.deallocate(indices)
        return out


def _mix(ttnn, col, other, flag):
    """col + flag * (other - col): other's ids where flag = 1, fp32 `[1, 1, 32, 1]` (ids < 2^24
    are exact); frees col and other."""
    dram = ttnn.DRAM_MEMORY_CONFIG
    diff = ttnn.subtract(other, col, memory_config=dram)
    moved = ttnn.multiply(diff, flag, memory_config=dram)
    mixed = ttnn.add(col, moved, memory_config=dram)
    for t in (col, other, diff, moved):
        ttnn.deallocate(t)
    return mixed


def id_column(ttnn, ids):
    """uint32 ROW_MAJOR `[1, 1, 1, 32]` token ids -> fp32 `[1, 1, 32, 1]` TILE."""
    dram = ttnn.DRAM_MEMORY_CONFIG
    tiled = ttnn.to_layout(ids, ttnn.TILE_LAYOUT, memory_config=dram)
    row = ttnn.typecast(tiled, ttnn.float32, memory_config=dram)
    ttnn.deallocate(tiled)
    col = ttnn.transpose(row, 2, 3, memory_config=dram)
    ttnn.deallocate(row)
    return col
