"""Exact top-k (k > 32) and top-p filters on the device, by bisection on a threshold per row.

`ttnn.sampling` sees at most 32 candidates, so a row with top_k > 32, or with top_p < 1 and no
top-k of at most 32, is drawn by inverse CDF (inverse_cdf.py) from its filtered distribution
instead. The filter is a threshold per row: the kept tokens are those with z > lo, z the logits
/ T (fp32, as the torch backend filters them), found with documented ops only:

- top-k: the invariant count(z > lo) >= k > count(z > hi), from lo = m - SPAN, hi = m (m the row
  maximum); each pass counts z > mid (GTZ(z - mid), summed by a ones matmul; counts are exact
  integers) and moves lo or hi to mid. Tokens more than SPAN below the maximum have
  exp(z - m) = 0 in fp32 (in the torch backend's softmax too), so dropping them changes nothing.
- top-p over the top-k kept (the torch backend's order: top-k, then top-p on the renormalised
  top-k): torch keeps a token iff the mass of the strictly better tokens is below p, so the
  invariant is mass(z > lo) >= p * S > mass(z > hi), S the kept mass, from lo = the top-k
  threshold, hi = m; each pass sums exp(z - m) over z > mid: GTZ(z - mid) times the rows'
  exp(z - m) transposed, one matmul whose diagonal holds each row's mass.

After PASSES passes hi - lo <= SPAN * 2^-PASSES = 2^-25: every token at or above the boundary
token is kept, and a token below it is kept too only if its z is within 2^-25 of the boundary's
(fp32 spacing is 2^-25 at |z| = 0.25, so for boundaries with |z| >= 0.25 lo and hi end as
neighbouring floats and the set is exactly torch's; nearer 0 a near-tie within 3e-8 may be
kept). Exact ties at the boundary keep every tied token (torch keeps the first ones of its sort
order), and top-p compares masses summed in fp32 (torch's cumsum is fp32 as well), so a token
whose preceding mass is within float rounding of p may fall on either side.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llm.backends.tt.mesh import TILE, Mesh

PASSES = 32  # bisection passes per filter
SPAN = 128.0  # the search starts at m - SPAN: exp(-SPAN) is 0 in fp32


def row_sums(ttnn, x, ones, kernel):
    """`[1, 1, 32, width]` -> each row's sum, fp32 `[1, 1, 32, 1]`, by a matmul with ones (bf16
    `[1, 1, width, 32]`) under the compute kernel config `kernel`."""
    dram = ttnn.DRAM_MEMORY_CONFIG
    s = ttnn.matmul(x, ones, dtype=ttnn.float32, memory_config=dram,
                    compute_kernel_config=kernel)  # [1, 1, 32, 32], equal columns
    col = ttnn.slice(s, (0, 0, 0, 0), (1, 1, TILE, 1), memory_config=dram)
    ttnn.deallocate(s)
    return col


@dataclass(frozen=True)
class Filters:
    """Which filters a step's exact draw runs (the trace variant): top_k where some row has top_k
    > 32, top_p where some exact row has top_p < 1, min_p where some exact row has min_p > 0."""

    top_k: bool = False
    top_p: bool = False
    min_p: bool = False

    @property
    def suffix(self) -> str:
        """The trace mode's suffix: "+exact", then "+minp", "+topk", "+topp" as run."""
        return ("+exact" + ("+minp" if self.min_p else "") + ("+topk" if self.top_k else "")
                + ("+topp" if self.top_p else ""))


class ThresholdSearch:
    """The bisections over rows of a padded vocabulary; ones: bf16 `[1, 1, width, 32]`."""

    def __init__(self, mesh: Mesh, ones, kernel) -> None:
        ttnn = mesh.ttnn
        self.mesh, self.ones, self.kernel = mesh, ones, kernel

        def put(t: torch.Tensor):
            return ttnn.from_torch(t[None, None], dtype=ttnn.bfloat16, layout=ttnn.TILE_LAYOUT,
                                   device=mesh.device, memory_config=ttnn.DRAM_MEMORY_CONFIG,
                                   mesh_mapper=mesh.replicate())
        self.eye = put(torch.eye(TILE))  # picks the diagonal of a [32, 32] product
        self.ones_tile = put(torch.ones(TILE, TILE))

    def _row_sums(self, x):
        return row_sums(self.mesh.ttnn, x, self.ones, self.kernel)

    def _move(self, lo, hi, mid, ge, lt):
        """lo, hi <- mid, hi where ge = 1, lo, mid where lt = 1 (ge + lt = 1; products by 0 / 1
        and sums with 0 are exact). Frees lo, hi, mid, ge, lt."""
        ttnn = self.mesh.ttnn
        dram = ttnn.DRAM_MEMORY_CONFIG
        parts = [ttnn.multiply(a, b, memory_config=dram)
                 for a, b in ((mid, ge), (lo, lt), (hi, ge), (mid, lt))]
        new_lo = ttnn.add(parts[0], parts[1], memory_config=dram)
        new_hi = ttnn.add(parts[2], parts[3], memory_config=dram)
        for t in (lo, hi, mid, ge, lt, *parts):
            ttnn.deallocate(t)
        return new_lo, new_hi

    def _mid(self, lo, hi):
        ttnn = self.mesh.ttnn
        dram = ttnn.DRAM_MEMORY_CONFIG
        s = ttnn.add(lo, hi, memory_config=dram)
        mid = ttnn.multiply(s, 0.5, memory_config=dram)
        ttnn.deallocate(s)
        return mid

    def top_k(self, z, m, bound_k):
        """z fp32 `[1, 1, 32, width]`, m its row maxima, bound_k = k - 0.5 per row (2^24 for a
        row without top-k), fp32 `[1, 1, 32, 1]` -> lo: the rows' top-k threshold (keep z > lo),
        fp32 `[1, 1, 32, 1]`."""
        ttnn = self.mesh.ttnn
        dram = ttnn.DRAM_MEMORY_CONFIG
        u = ttnn.UnaryOpType
        lo = ttnn.subtract(m, SPAN, memory_config=dram)
        hi = ttnn.multiply(m, 1.0, memory_config=dram)
        for _ in range(PASSES):
            mid = self._mid(lo, hi)
            above = ttnn.subtract(z, mid, activations=[u.GTZ], dtype=ttnn.bfloat16,
                                  memory_config=dram)  # 1 where z > mid
            count = self._row_sums(above)
            ttnn.deallocate(above)
            ge = ttnn.subtract(count, bound_k, activations=[u.GTZ], memory_config=dram)
            lt = ttnn.subtract(count, bound_k, activations=[u.LTZ], memory_config=dram)
            ttnn.deallocate(count)
            lo, hi = self._move(lo, hi, mid, ge, lt)
        ttnn.deallocate(hi)
        return lo

    def top_p(self, z, m, e, lo, bound_p):
        """z fp32 `[1, 1, 32, width]`, e = exp(z - m) over the top-k kept (0 elsewhere), lo the
        top-k threshold (freed), bound_p = p per row (2 for a row without top-p), fp32
        `[1, 1, 32, 1]` -> the top-p threshold (keep z > it), fp32 `[1, 1, 32, 1]`."""
        ttnn = self.mesh.ttnn
        dram = ttnn.DRAM_MEMORY_CONFIG
        u = ttnn.UnaryOpType
        total = self._row_sums(e)
        target = ttnn.multiply(total, bound_p, memory_config=dram)  # p * S
        ttnn.deallocate(total)
        e_t = ttnn.transpose(e, 2, 3, memory_config=dram)  # [1, 1, width, 32]
        hi = ttnn.multiply(m, 1.0, memory_config=dram)
        for _ in range(PASSES):
            mid = self._mid(lo, hi)
            above = ttnn.subtract(z, mid, activations=[u.GTZ], dtype=ttnn.bfloat16,
                                  memory_config=dram)  # 1 where z > mid
            cross = ttnn.matmul(above, e_t, dtype=ttnn.float32, memory_config=dram,
                                compute_kernel_config=self.kernel)  # [1, 1, 32, 32]
            ttnn.deallocate(above)
            diag = ttnn.multiply(cross, self.eye, memory_config=dram)  # row r: its own mass
            ttnn.deallocate(cross)
            s = row_sums(ttnn, diag, self.ones_tile, self.kernel)
            ttnn.deallocate(diag)
            lt = ttnn.subtract(s, target, activations=[u.LTZ], memory_config=dram)  # s < p S
            ttnn.deallocate(s)
            ge = ttnn.subtract(lt, 0.5, activations=[u.LTZ], memory_config=dram)  # 1 - lt
            lo, hi = self._move(lo, hi, mid, ge, lt)
        for t in (target, e_t, hi):
            ttnn.deallocate(t)
        return lo

    def weights(self, z, m, bound_k, bound_p, filters: Filters, min_log=None):
        """z fp32 `[1, 1, 32, width]` (logits / T, masked entries -1e30), m its row maxima ->
        exp(z - m) over each row's kept tokens, 0 elsewhere, fp32 `[1, 1, 32, width]`: the
        unnormalised distribution inverse_cdf.py draws from. min_p first (the tokens with
        z < m + min_log dropped; min_log fp32 `[1, 1, 32, 1]`, needed with filters.min_p), then
        top-k, then top-p over what is left (the torch backend's order)."""
        ttnn = self.mesh.ttnn
        dram = ttnn.DRAM_MEMORY_CONFIG
        u = ttnn.UnaryOpType
        e = ttnn.subtract(z, m, activations=[u.EXP], memory_config=dram)
        if filters.min_p:
            e = self._drop_below(e, z, m, min_log)
        lo = None
        if filters.top_k:
            lo = self.top_k(z, m, bound_k)
            e = self._keep(e, z, lo)
        if filters.top_p:
            start = lo if lo is not None else ttnn.subtract(m, SPAN, memory_config=dram)
            lo = self.top_p(z, m, e, start, bound_p)
            e = self._keep(e, z, lo)
        if lo is not None:
            ttnn.deallocate(lo)
        return e

    def _drop_below(self, e, z, m, min_log):
        """e with the entries where z < m + min_log zeroed (e freed; e - e * below is exact)."""
        ttnn = self.mesh.ttnn
        dram = ttnn.DRAM_MEMORY_CONFIG
        floor = ttnn.add(m, min_log, memory_config=dram)  # [1, 1, 32, 1]
        below = ttnn.subtract(z, floor, activations=[ttnn.UnaryOpType.LTZ], memory_config=dram)
        dropped = ttnn.multiply(e, below, memory_config=dram)
        kept = ttnn.subtract(e, dropped, memory_config=dram)
        for t in (floor, below, dropped, e):
            ttnn.deallocate(t)
        return kept

    def _keep(self, e, z, lo):
        """e with the entries where z <= lo zeroed (e freed)."""
        ttnn = self.mesh.ttnn
        dram = ttnn.DRAM_MEMORY_CONFIG
        keep = ttnn.subtract(z, lo, activations=[ttnn.UnaryOpType.GTZ], memory_config=dram)
        kept = ttnn.multiply(e, keep, memory_config=dram)
        for t in (e, keep):
            ttnn.deallocate(t)
        return kept
