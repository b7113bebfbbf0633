"""Traced decode: persistent device inputs, one compile run, one capture, then per step only
`copy_host_to_device_tensor` of inputs that changed and `execute_trace`.

The decode graph advances positions (and sampling seeds) and feeds the drawn tokens back on the
device, so while the same users keep decoding the host writes nothing between replays: it keeps a
mirror of what the device inputs hold after each step and copies only the inputs whose wanted
values differ (a user joining or leaving, a new page-table row). Outputs (the next tokens) are
read after each replay.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from llm.backends.tt.logprobs import FULL_INPUTS, Selected, to_host
from llm.backends.tt.mesh import TILE, Mesh
from llm.backends.tt.model import Transformer
from llm.backends.tt.penalties import COLUMNS, full_path, neutral_columns
from llm.backends.tt.sampling import (
    SAMPLING_INPUTS,
    device_layouts,
    filters_for,
    host_inputs,
)
from llm.backends.tt.thresholds import Filters
from llm.backends.tt.token_masks import additive_masks
from llm.engine.contract.backend import SequenceSampling
from llm.engine.contract.outputs import TokenLogprobs
from llm.engine.contract.structured import TokenMasks


class DecodeInputs:
    """The persistent decode input/output tensors on the device and their host mirrors: the
    graph inputs (tokens, rot_idxs, cur_pos, page_table), the sampling inputs (sampling.py;
    written only for steps that sample) and the full path's (logprobs.FULL_INPUTS and
    penalties.COLUMNS: written only for its steps). width: the padded vocabulary."""

    def __init__(self, mesh: Mesh, batch: int, blocks_per_seq: int, width: int) -> None:
        ttnn = mesh.ttnn
        self.mesh = mesh
        rm = ttnn.ROW_MAJOR_LAYOUT
        self.host = {
            "tokens": torch.zeros(1, 1, 1, TILE, dtype=torch.int64),
            "rot_idxs": torch.zeros(1, TILE, dtype=torch.int64),
            "cur_pos": torch.full((batch,), -1, dtype=torch.int64),
            "page_table": torch.zeros(batch, blocks_per_seq, dtype=torch.int64),
            **host_inputs({}),
            **neutral_columns(),
            "token_mask": torch.zeros(1, 1, TILE, width),
        }
        tile = ttnn.TILE_LAYOUT
        self.layouts = {"tokens": (ttnn.uint32, rm), "rot_idxs": (ttnn.uint32, rm),
                        "cur_pos": (ttnn.int32, rm), "page_table": (ttnn.int32, rm),
                        **device_layouts(ttnn),
                        **{name: (ttnn.float32, tile) for name in COLUMNS},
                        "token_mask": (ttnn.bfloat16, tile)}
        self.dev = {name: ttnn.from_torch(v, dtype=self.layouts[name][0],
                                          layout=self.layouts[name][1], device=mesh.device,
                                          memory_config=ttnn.DRAM_MEMORY_CONFIG,
                                          mesh_mapper=mesh.replicate())
                    for name, v in self.host.items()}
        self.next_tokens = ttnn.from_torch(torch.zeros(1, 1, TILE, dtype=torch.int64),
                                           dtype=ttnn.uint32, layout=rm,
                                           device=mesh.device,
                                           memory_config=ttnn.DRAM_MEMORY_CONFIG,
                                           mesh_mapper=mesh.replicate())
        self.selected = Selected.allocate(mesh)  # the full path's outputs (logprobs.select)
        self.host_writes = 0  # copy_host_to_device_tensor calls so far

    def sampling(self, features: str | None = None) -> dict:
        """The sampling inputs on the device (with `features` the full path's too: "logprobs"
        or "penalties"), by the names Transformer.decode takes."""
        names = SAMPLING_INPUTS + (FULL_INPUTS if features else ()) + (
            COLUMNS if features == "penalties" else ())
        return {name: self.dev[name] for name in names}

    def write(self, wanted: dict[str, torch.Tensor], force: bool = False) -> None:
        """Copy each wanted input whose values differ from what the device holds."""
        ttnn = self.mesh.ttnn
        for name, value in wanted.items():
            if not force and torch.equal(value, self.host[name]):
                continue
            dtype, layout = self.layouts[name]
            host = ttnn.from_torch(value, dtype=dtype, layout=layout,
                                   mesh_mapper=self.mesh.replicate())
            ttnn.copy_host_to_device_tensor(host, self.dev[name])
            self.host[name] = value.clone()
            self.host_writes += 1

    def advance(self, next_tokens: torch.Tensor, sampled: bool = False,
                penalized: bool = False) -> None:
        """Mirror what the decode graph did on the device: tokens fed back, positions + 1 (and
        the seeds + 1 after a sampling step, min_left - 1 after a penalizing one)."""
        self.host["tokens"] = next_tokens.reshape(1, 1, 1, TILE).clone()
        if penalized:
            self.host["min_left"] = self.host["min_left"] - 1
        pos = self.host["cur_pos"]
        self.host["cur_pos"] = torch.where(pos >= 0, pos + 1, pos)
        self.host["rot_idxs"] = self.host["rot_idxs"] + 1
        if sampled:
            self.host["seeds"] = self.host["seeds"] + 1


class DecodeRunner:
    """Runs decode steps of `model`, traced (default) or eagerly: one trace per mode, "greedy"
    (the argmax fast path, when no row samples), "sample" (any mix of sampling and greedy rows),
    "logprobs" (some row asks for logprobs or has token masks: logprobs.select) and "penalties"
    (that path with the penalties, where some row uses penalties, logit_bias or min_tokens), each
    with "+exact" where some row samples with top_k = 0 or > 32 (inverse_cdf.py; "+exact+topk" /
    "+exact+topp" with the threshold searches such rows need, thresholds.py), each captured the
    first time a step needs it."""

    def __init__(self, model: Transformer, traced: bool = True) -> None:
        self.model = model
        self.mesh = model.mesh
        self.traced = traced
        geo = model.cfg.geo
        self.batch = geo.batch
        self.max_pos = model.rope.length - 1
        self.inputs = DecodeInputs(model.mesh, geo.batch, model.cache.blocks_per_seq,
                                   geo.vocab_padded)
        self.traces: dict[str, int] = {}  # mode -> trace id
        self.mode = "greedy"  # of the latest step
        self.steps = 0

    @property
    def trace_id(self):
        """The trace of the latest step's mode (None before it was captured)."""
        return self.traces.get(self.mode)

    def wanted(self, rows: Sequence[int], tokens: Sequence[int], positions: Sequence[int],
               page_rows: Sequence[Sequence[int]],
               sampling: Sequence[SequenceSampling] | None = None,
               features: str | None = None,
               allowed: TokenMasks | None = None) -> dict[str, torch.Tensor]:
        """The decode inputs for these user rows (other rows idle, position -1), as host
        tensors to pass to `DecodeInputs.write`; with `sampling` (one per row) the sampling
        inputs too (a row's draw is keyed by the position of the token it draws, position + 1),
        with `features` the full path's (1/T, the additive token masks; for "penalties" the
        penalty columns)."""
        host = self.inputs.host
        tok = host["tokens"].clone()
        # idle rows keep counting up on the device; restart them before they leave the table
        rot = torch.where(host["rot_idxs"] <= self.max_pos, host["rot_idxs"], 0)
        pos = torch.full((self.batch,), -1, dtype=torch.int64)
        table = host["page_table"].clone()
        for r, t, p, pr in zip(rows, tokens, positions, page_rows):
            tok[0, 0, 0, r] = t
            rot[0, r] = p
            pos[r] = p
            table[r] = torch.tensor(list(pr), dtype=torch.int64)
        out = {"tokens": tok, "rot_idxs": rot, "cur_pos": pos, "page_table": table}
        if sampling is not None:
            out.update(host_inputs({r: (s.params, s.seed, p + 1)
                                    for r, p, s in zip(rows, positions, sampling)}))
            idle = torch.ones(TILE, dtype=torch.bool)
            idle[list(rows)] = False
            # an idle row's seed is never used: keep what the device holds (no write)
            out["seeds"] = torch.where(idle, host["seeds"], out["seeds"])
        if features == "penalties":
            out.update(self.model.penalties.columns({r: p + 1 for r, p in zip(rows, positions)},
                                                    previous=host))
        if features:
            geo = self.model.cfg.geo
            out["token_mask"] = additive_masks(allowed, list(rows), geo.vocab, geo.vocab_padded)
        return out

    def run_graph(self, sample: bool = False, features: str | None = None,
                  exact: Filters | None = None):
        """Run (or, inside a capture, record) the decode graph on the persistent inputs;
        returns the full path's Selected (the persistent DecodeInputs.selected; else the
        logits). exact: the inverse-CDF draw's threshold searches (None: no such draw)."""
        d = self.inputs.dev
        return self.model.decode(d["tokens"], d["rot_idxs"], d["cur_pos"], d["page_table"],
                                 self.inputs.next_tokens,
                                 sampling=self.inputs.sampling(features) if sample else None,
                                 features=features, selected=self.inputs.selected,
                                 exact=exact)

    def step(self, rows: Sequence[int], tokens: Sequence[int], positions: Sequence[int],
             page_rows: Sequence[Sequence[int]],
             sampling: Sequence[SequenceSampling] | None = None,
             allowed: TokenMasks | None = None
             ) -> tuple[list[int], list[TokenLogprobs | None] | None]:
        """Decode one token for each user row: greedy for all rows unless some row's
        SequenceSampling samples, the full path where some row needs it (penalties.full_path);
        returns the next token of each row and, where some request asked, their logprobs."""
        ttnn, dev = self.mesh.ttnn, self.mesh.device
        full = sampling is not None and full_path(sampling, allowed is not None)
        if full and self.model.penalties is None:
            raise ValueError("tt backend: logprobs, penalties and structured output need a "
                             "padded vocabulary of at most 65536 (one ttnn.topk)")
        penalize = full and any(s.params.penalized for s in sampling)
        features = "penalties" if penalize else "logprobs" if full else None
        sample = full or (sampling is not None and any(not s.params.greedy for s in sampling))
        exact = filters_for(s.params for s in sampling) if sample else None
        self.mode = (features or ("sample" if sample else "greedy")) + (
            exact.suffix if exact else "")
        wanted = self.wanted(rows, tokens, positions, page_rows,
                             sampling if sample else None, features, allowed)
        self.inputs.write(wanted)
        penalties = self.model.penalties
        if penalize:
            penalties.sync()
        fed = self.inputs.host["tokens"].reshape(-1)  # what the rows feed this step
        if self.traced and self.mode not in self.traces:
            self.run_graph(sample, features, exact)  # compile run, undone by the rewrites
            self._restore(wanted, penalize)
            tid = ttnn.begin_trace_capture(dev, cq_id=0)
            self.run_graph(sample, features, exact)
            ttnn.end_trace_capture(dev, tid, cq_id=0)
            self.traces[self.mode] = tid
            self._restore(wanted, penalize)  # capture may have executed (emulator)
        if self.traced:
            ttnn.execute_trace(dev, self.traces[self.mode], cq_id=0, blocking=False)
        else:
            self.run_graph(sample, features, exact)
        out = self.mesh.read(self.inputs.next_tokens).reshape(-1).to(torch.int64)  # [32]
        next_tokens = [int(out[r]) for r in rows]
        logprobs = None
        if full:
            if penalize:
                penalties.count_mirror(fed, rows)
            wanted_k = [s.params.logprobs for s in sampling]
            if any(k is not None for k in wanted_k):
                logprobs = to_host(self.mesh, self.inputs.selected, rows, next_tokens,
                                   wanted_k)
        self.inputs.advance(out, sample, penalize)
        self.steps += 1
        return next_tokens, logprobs

    def _restore(self, wanted: dict[str, torch.Tensor], penalize: bool) -> None:
        """Rewrite what a compile run or a capture changed on the device: the inputs, and the
        token counts of the penalties path."""
        self.inputs.write(wanted, force=True)
        if penalize:
            self.model.penalties.sync(force=True)

    def release(self) -> None:
        """Release the captured traces (a later step captures again)."""
        for tid in self.traces.values():
            self.mesh.ttnn.release_trace(self.mesh.device, tid)
        self.traces = {}
