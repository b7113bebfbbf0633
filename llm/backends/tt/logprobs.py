"""Log probabilities on the device, from the logits the sampler picks from.

`select` is the selection path of a batch in which some request uses penalties, logprobs or
structured output (the "full" path; trace.py captures it as its own trace): the whole-vocabulary
logits in fp32, the token masks (token_masks.py) and the penalties (penalties.py) added on the
device, the candidates `topk(x, 32)` that the sampler draws from (sampling.py; a greedy row is
k = 1, its candidate 0 the fp32 argmax), and the log probabilities of the processed logits divided
by the temperature (1 for greedy rows), as the torch backend and vLLM's default: the chosen
token's and the 32 best, always that many (fixed shapes, so the step fits in a trace); each
request keeps as many as it asked for on the host (`to_host`, at most MAX_LOGPROBS = 20).

log_softmax(z) = z - lse with lse = m + log(sum(exp(z - m))), m the row maximum (the first top-k
value): EXP fused into the subtraction, the row sums by a matmul with a column of ones (ttnn
0.81.1 documents no reduction op), LOG fused into the final add. The chosen token's z is the sum
of z times its one-hot row (EQZ(iota - id)), by the same matmul, as there is no gather op.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch

from llm.backends.tt.inverse_cdf import InverseCdf
from llm.backends.tt.mesh import TILE, Mesh
from llm.backends.tt.op_configs import OpConfigs
from llm.backends.tt.penalties import SlotPenalties
from llm.backends.tt.sampling import (
    DRAW_INPUTS,
    MAX_TOP_K,
    Sampler,
    filters_for,
    host_inputs,
    id_column,
)
from llm.backends.tt.thresholds import Filters, row_sums
from llm.backends.tt.token_masks import MASKED, additive_masks
from llm.engine.contract.backend import SequenceSampling
from llm.engine.contract.outputs import StepOutput, TokenLogprobs
from llm.engine.contract.structured import TokenMasks

FULL_INPUTS = ("token_mask",)  # select's per-step device inputs besides sampling and columns


@dataclass(frozen=True)
class Selected:
    """One step's choices, on the device. tokens uint32 `[1, 1, 1, 32]`; logprob fp32
    `[1, 1, 32, 32]` (column 0: the chosen token's); top_values fp32 and top_ids uint32
    `[1, 1, 32, 32]`: the 32 best, best first."""

    tokens: object
    logprob: object
    top_values: object
    top_ids: object

    def free(self, ttnn) -> None:
        """Deallocate the four tensors."""
        for t in (self.tokens, self.logprob, self.top_values, self.top_ids):
            ttnn.deallocate(t)

    @classmethod
    def allocate(cls, mesh: Mesh) -> Selected:
        """Persistent device buffers of one step's choices, for `copy_into` (a trace's outputs
        must not be allocated after another trace was captured: that trace may overwrite them).
        """
        ttnn = mesh.ttnn

        def zeros(shape, dtype, layout):
            return ttnn.from_torch(torch.zeros(shape, dtype=torch.int64 if dtype in (
                ttnn.uint32,) else torch.float32), dtype=dtype, layout=layout,
                device=mesh.device, memory_config=ttnn.DRAM_MEMORY_CONFIG,
                mesh_mapper=mesh.replicate())
        tile, rm = ttnn.TILE_LAYOUT, ttnn.ROW_MAJOR_LAYOUT
        return cls(zeros((1, 1, 1, TILE), ttnn.uint32, rm),
                   zeros((1, 1, TILE, 1), ttnn.float32, tile),
                   zeros((1, 1, TILE, MAX_TOP_K), ttnn.float32, tile),
                   zeros((1, 1, TILE, MAX_TOP_K), ttnn.uint32, tile))

    def copy_into(self, ttnn, out: Selected) -> Selected:
        """Copy these tensors into the buffers of `out` and free them (trace-safe); -> out."""
        dram = ttnn.DRAM_MEMORY_CONFIG
        for src, dst in ((self.tokens, out.tokens), (self.logprob, out.logprob),
                         (self.top_values, out.top_values), (self.top_ids, out.top_ids)):
            ttnn.to_memory_config(src, dram, output_tensor=dst)
            ttnn.deallocate(src)
        return out


class LogprobsOps:
    """The device constants the log probabilities need (ones for the row sums)."""

    def __init__(self, mesh: Mesh, cfg: OpConfigs, width: int) -> None:
        ttnn = mesh.ttnn
        self.mesh, self.kernel = mesh, cfg.kernels["hifi4"]
        self.ones = ttnn.from_torch(torch.ones(1, 1, width, TILE), dtype=ttnn.bfloat16,
                                    layout=ttnn.TILE_LAYOUT, device=mesh.device,
                                    memory_config=ttnn.DRAM_MEMORY_CONFIG,
                                    mesh_mapper=mesh.replicate())

    def row_sums(self, x):
        """fp32 `[1, 1, 32, V_pad]` -> each row's sum, fp32 `[1, 1, 32, 1]`."""
        return row_sums(self.mesh.ttnn, x, self.ones, self.kernel)

    def logprobs(self, z, top_z, top_ids, chosen_hot) -> tuple:
        """z fp32 `[1, 1, 32, V_pad]` (logits / T), its top-32 values top_z; chosen_hot: the
        one-hot rows of the chosen tokens -> (chosen logprob `[1, 1, 32, 1]`, top-32 logprobs
        `[1, 1, 32, 32]`, top_ids as given)."""
        ttnn = self.mesh.ttnn
        dram = ttnn.DRAM_MEMORY_CONFIG
        u = ttnn.UnaryOpType
        m = ttnn.slice(top_z, (0, 0, 0, 0), (1, 1, TILE, 1), memory_config=dram)  # row max
        e = ttnn.subtract(z, m, activations=[u.EXP], memory_config=dram)  # exp(z - m)
        s = self.row_sums(e)
        ttnn.deallocate(e)
        lse = ttnn.add(m, s, input_tensor_b_activations=[u.LOG], memory_config=dram)
        ttnn.deallocate(m)
        ttnn.deallocate(s)
        picked = ttnn.multiply(z, chosen_hot, memory_config=dram)
        zc = self.row_sums(picked)  # the chosen token's z
        ttnn.deallocate(picked)
        chosen = ttnn.subtract(zc, lse, memory_config=dram)
        ttnn.deallocate(zc)
        top = ttnn.subtract(top_z, lse, memory_config=dram)
        ttnn.deallocate(lse)
        return chosen, top, top_ids

    def below(self, z, chosen_hot):
        """z fp32 `[1, 1, 32, V_pad]` (padded columns -inf), chosen_hot: the one-hot rows of
        each row's token -> how many columns of each row have z below the token's, fp32
        `[1, 1, 32, 1]` (a token's rank is V_pad less it). The token's z is taken exactly, by a
        topk over z with every other column pushed down by 1e30, not by a sum."""
        ttnn = self.mesh.ttnn
        dram = ttnn.DRAM_MEMORY_CONFIG
        off = ttnn.subtract(chosen_hot, 1.0, dtype=ttnn.float32, memory_config=dram)  # 0 / -1
        pushed = ttnn.multiply(off, 1e30, memory_config=dram)
        ttnn.deallocate(off)
        only = ttnn.add(z, pushed, memory_config=dram)  # the token's z, the rest ~ -1e30
        ttnn.deallocate(pushed)
        values, ids = ttnn.topk(only, k=MAX_TOP_K, dim=-1, largest=True, sorted=True,
                                memory_config=dram)
        ttnn.deallocate(only)
        ttnn.deallocate(ids)
        zc = ttnn.slice(values, (0, 0, 0, 0), (1, 1, TILE, 1), memory_config=dram)
        ttnn.deallocate(values)
        lower = ttnn.subtract(z, zc, activations=[ttnn.UnaryOpType.LTZ], memory_config=dram)
        ttnn.deallocate(zc)
        count = self.row_sums(lower)  # 0 / 1 summed: exact
        ttnn.deallocate(lower)
        return count


def select(logits, sampler: Sampler, penalties: SlotPenalties, ops: LogprobsOps,
           inputs: Mapping, fed=None, penalize: bool = True,
           cdf: InverseCdf | None = None, filters: Filters | None = None) -> Selected:
    """The full selection path of the 32 rows (see module): logits `[1, 1, 32, V_local]` TILE
    bf16; inputs: the sampler's (SAMPLING_INPUTS), FULL_INPUTS and, with `penalize`, the penalty
    columns (penalties.COLUMNS) as device tensors; fed: the tokens the rows fed this step (uint32
    `[1, 1, 1, 32]`, counted first; None in prefill). Without `penalize` (no row of the batch
    penalizes) the penalties' passes over the logits are left out; with `cdf` the rows marked
    exact draw by inverse CDF after the `filters` searches (Sampler.finish). Trace-safe; advances
    min_left (with `penalize`)."""
    ttnn = sampler.mesh.ttnn
    dram = ttnn.DRAM_MEMORY_CONFIG
    if fed is not None and penalize:
        fed_col = id_column(ttnn, fed)
        penalties.count(fed_col, inputs["counting"])
        ttnn.deallocate(fed_col)
    full = sampler.gathered(logits)  # [1, 1, 32, V_pad]
    wide = ttnn.typecast(full, ttnn.float32, memory_config=dram)
    if full is not logits:
        ttnn.deallocate(full)
    if penalize:  # the structured-output mask after the penalties (see penalties.py)
        penalized = penalties.apply(wide, inputs)  # fp32 [1, 1, 32, V_pad]
        ttnn.deallocate(wide)
        wide = penalized
    x = ttnn.add(wide, inputs["token_mask"], memory_config=dram)  # structured output
    ttnn.deallocate(wide)
    values, ids = ttnn.topk(x, k=MAX_TOP_K, dim=-1, largest=True, sorted=True,
                            memory_config=dram)  # fp32, uint32 [1, 1, 32, 32]
    drawn = sampler.draw(values, ids, **{k: inputs[k] for k in DRAW_INPUTS})
    z = ttnn.multiply(x, inputs["inv_temp"], memory_config=dram)  # / T (1 for greedy rows)
    top_z = ttnn.multiply(values, inputs["inv_temp"], memory_config=dram)
    ttnn.deallocate(values)
    m = ttnn.slice(top_z, (0, 0, 0, 0), (1, 1, TILE, 1), memory_config=dram) \
        if cdf is not None else None
    tokens = sampler.finish(drawn, x, z, m, inputs, cdf, filters)  # exact and argmax rows
    ttnn.deallocate(x)
    if m is not None:
        ttnn.deallocate(m)
    col = id_column(ttnn, tokens)
    hot = penalties.one_hot(col)
    ttnn.deallocate(col)
    chosen, top, top_ids = ops.logprobs(z, top_z, ids, hot)
    for t in (z, top_z, hot):
        ttnn.deallocate(t)
    return Selected(tokens, chosen, top, top_ids)


def select_row(model, layouts: Mapping, logits, row: int, users: Sequence[SequenceSampling],
               slots: Sequence[int], end: int, allowed: TokenMasks | None) -> StepOutput:
    """Prefill's full selection path: `users` (in tile rows `slots`) all choose the token at
    position `end` from row `row` of the prefill logits `[1, 1, 32, V_local]` (freed), through
    `select`. model: the tt Transformer (its sampler, penalties, logprob_ops, inverse_cdf);
    layouts: the device (dtype, layout) of each input name (trace.DecodeInputs.layouts)."""
    mesh = model.mesh
    ttnn = mesh.ttnn
    dram = ttnn.DRAM_MEMORY_CONFIG
    geo = model.cfg.geo
    spread = torch.zeros(1, 1, TILE, TILE)
    spread[..., row] = 1.0  # every row of the product is logits[row]
    spread_dev = ttnn.from_torch(spread, dtype=ttnn.bfloat16, layout=ttnn.TILE_LAYOUT,
                                 device=mesh.device, memory_config=dram,
                                 mesh_mapper=mesh.replicate())
    rows = ttnn.matmul(spread_dev, logits, dtype=ttnn.bfloat16, memory_config=dram,
                       compute_kernel_config=model.cfg.kernels["hifi4"])  # [1, 1, 32, V_l]
    for t in (spread_dev, logits):
        ttnn.deallocate(t)
    penalize = any(u.params.penalized for u in users)
    host = host_inputs({s: (u.params, u.seed, end) for s, u in zip(slots, users)})
    if penalize:
        host.update(model.penalties.columns({s: end for s in slots}))
    host["token_mask"] = additive_masks(allowed, list(slots), geo.vocab, geo.vocab_padded)
    inputs = {name: ttnn.from_torch(v, dtype=layouts[name][0], layout=layouts[name][1],
                                    device=mesh.device, memory_config=dram,
                                    mesh_mapper=mesh.replicate())
              for name, v in host.items()}
    if penalize:
        model.penalties.sync()
    filters = filters_for(u.params for u in users)
    sel = select(rows, model.sampler, model.penalties, model.logprob_ops, inputs,
                 penalize=penalize, cdf=model.inverse_cdf if filters else None, filters=filters)
    ttnn.deallocate(rows)
    drawn = mesh.read(sel.tokens).reshape(-1).to(torch.int64)  # [32]
    tokens = [int(drawn[s]) for s in slots]
    wanted = [u.params.logprobs for u in users]
    logprobs = None
    if any(k is not None for k in wanted):
        logprobs = to_host(mesh, sel, slots, tokens, wanted)
    sel.free(ttnn)
    for t in inputs.values():
        ttnn.deallocate(t)
    return StepOutput(tokens, logprobs)


def _finite(v: float) -> float:
    """A masked token's logprob (about MASKED - lse) is -inf, as the torch backend gives."""
    return float("-inf") if v < MASKED / 2 else v


def to_host(mesh: Mesh, sel: Selected, rows: Sequence[int], tokens: Sequence[int],
            wanted: Sequence[int | None]) -> list[TokenLogprobs | None]:
    """The step's logprobs of tile rows `rows` (chosen `tokens`): one TokenLogprobs per row
    whose request asked (`wanted`: its k, or None)."""
    if all(k is None for k in wanted):
        return [None] * len(rows)
    lp = mesh.read(sel.logprob).float().reshape(TILE)  # [32]
    vals = mesh.read(sel.top_values).float().reshape(TILE, MAX_TOP_K)
    ids = mesh.read(sel.top_ids).to(torch.int64).reshape(TILE, MAX_TOP_K)
    out = []
    for r, tok, k in zip(rows, tokens, wanted):
        if k is None:
            out.append(None)
            continue
        top = tuple((int(i), _finite(float(v))) for i, v in zip(ids[r, :k], vals[r, :k]))
        out.append(TokenLogprobs(tok, _finite(float(lp[r])), top))
    return out


def prompt_logprobs(mesh: Mesh, tile_logits, sampler: Sampler, penalties: SlotPenalties,
                    ops: LogprobsOps, temperature: float, targets: Sequence[int], k: int,
                    first_tile: int = 0) -> list[TokenLogprobs]:
    """Logprobs of the prompt's `targets` [T] from the logits at the positions before them:
    log_softmax(logits / temperature) (1 for greedy), the k best of each, and each target's rank
    (`LogprobsOps.below`). tile_logits(t): the logits `[1, 1, 32, V_local]` of the chunk's rows
    [32 t, 32 t + 32), from `first_tile`."""
    ttnn = mesh.ttnn
    dram = ttnn.DRAM_MEMORY_CONFIG
    inv_t = 1.0 / temperature if temperature > 0 else 1.0
    out: list[TokenLogprobs] = []
    for t in range(first_tile, first_tile + (len(targets) + TILE - 1) // TILE):
        part = list(targets[(t - first_tile) * TILE:(t - first_tile + 1) * TILE])
        logits = tile_logits(t)
        full = sampler.gathered(logits)
        z = ttnn.typecast(full, ttnn.float32, memory_config=dram)
        for g in {id(full): full, id(logits): logits}.values():
            ttnn.deallocate(g)
        if inv_t != 1.0:
            scaled = ttnn.multiply(z, inv_t, memory_config=dram)
            ttnn.deallocate(z)
            z = scaled
        values, ids = ttnn.topk(z, k=MAX_TOP_K, dim=-1, largest=True, sorted=True,
                                memory_config=dram)
        col = ttnn.from_torch(torch.tensor(part + [0] * (TILE - len(part)),
                                           dtype=torch.float32).reshape(1, 1, TILE, 1),
                              dtype=ttnn.float32, layout=ttnn.TILE_LAYOUT, device=mesh.device,
                              memory_config=dram, mesh_mapper=mesh.replicate())
        hot = penalties.one_hot(col)
        sel = Selected(col, *ops.logprobs(z, values, ids, hot))
        below = ops.below(z, hot)
        width = z.shape[-1]
        lower = mesh.read(below).float().reshape(TILE).tolist()
        out += [replace(e, rank=width - int(n))
                for e, n in zip(to_host(mesh, sel, range(len(part)), part, [k] * len(part)),
                                lower)]
        for t_ in (z, values, hot, below):
            ttnn.deallocate(t_)
        sel.free(ttnn)
    return out
