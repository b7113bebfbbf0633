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

from llm.backends.tt.mesh import TILE, Mesh
from llm.backends.tt.model import Transformer
from llm.backends.tt.sampling import SAMPLING_INPUTS, device_layouts, host_inputs
from llm.engine.contract.backend import SequenceSampling


class DecodeInputs:
    """The persistent decode input/output tensors on the device and their host mirrors: the
    graph inputs (tokens, rot_idxs, cur_pos, page_table) and the sampling inputs (sampling.py;
    written only for steps that sample)."""

    def __init__(self, mesh: Mesh, batch: int, blocks_per_seq: int) -> None:
        ttnn = mesh.ttnn
        self.mesh = mesh
        rm = ttnn.ROW_MAJOR_LAYOUT
        self.host = {
            "tokens": torch.zeros(1, 1, 1, TILE, dtype=torch.int64),
            "rot_idxs": torch.zeros(1, TILE, dtype=torch.int64),
            "cur_pos": torch.full((batch,), -1, dtype=torch.int64),
            "page_table": torch.zeros(batch, blocks_per_seq, dtype=torch.int64),
            **host_inputs({}),
        }
        self.layouts = {"tokens": (ttnn.uint32, rm), "rot_idxs": (ttnn.uint32, rm),
                        "cur_pos": (ttnn.int32, rm), "page_table": (ttnn.int32, rm),
                        **device_layouts(ttnn)}
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
        self.host_writes = 0  # copy_host_to_device_tensor calls so far

    def sampling(self) -> dict:
        """The sampling inputs on the device, by the names Transformer.decode takes."""
        return {name: self.dev[name] for name in SAMPLING_INPUTS}

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

    def advance(self, next_tokens: torch.Tensor, sampled: bool = False) -> None:
        """Mirror what the decode graph did on the device: tokens fed back, positions + 1 (and
        the seeds + 1 after a sampling step)."""
        self.host["tokens"] = next_tokens.reshape(1, 1, 1, TILE).clone()
        pos = self.host["cur_pos"]
        self.host["cur_pos"] = torch.where(pos >= 0, pos + 1, pos)
        self.host["rot_idxs"] = self.host["rot_idxs"] + 1
        if sampled:
            self.host["seeds"] = self.host["seeds"] + 1


class DecodeRunner:
    """Runs decode steps of `model`, traced (default) or eagerly: one trace per mode, "greedy"
    (the argmax fast path, when no row samples) and "sample" (any mix of sampling and greedy
    rows), each captured the first time a step needs it."""

    def __init__(self, model: Transformer, traced: bool = True) -> None:
        self.model = model
        self.mesh = model.mesh
        self.traced = traced
        geo = model.cfg.geo
        self.batch = geo.batch
        self.max_pos = model.rope.length - 1
        self.inputs = DecodeInputs(model.mesh, geo.batch, model.cache.blocks_per_seq)
        self.traces: dict[str, int] = {}  # mode -> trace id
        self.mode = "greedy"  # of the latest step
        self.steps = 0

    @property
    def trace_id(self):
        """The trace of the latest step's mode (None before it was captured)."""
        return self.traces.get(self.mode)

    def wanted(self, rows: Sequence[int], tokens: Sequence[int], positions: Sequence[int],
               page_rows: Sequence[Sequence[int]],
               sampling: Sequence[SequenceSampling] | None = None) -> dict[str, torch.Tensor]:
        """The decode inputs for these user rows (other rows idle, position -1), as host
        tensors to pass to `DecodeInputs.write`; with `sampling` (one per row) the sampling
        inputs too (a row's draw is keyed by the position of the token it draws, position + 1)."""
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
        return out

    def run_graph(self, sample: bool = False) -> None:
        """Run (or, inside a capture, record) the decode graph on the persistent inputs."""
        d = self.inputs.dev
        self.model.decode(d["tokens"], d["rot_idxs"], d["cur_pos"], d["page_table"],
                          self.inputs.next_tokens,
                          sampling=self.inputs.sampling() if sample else None)

    def step(self, rows: Sequence[int], tokens: Sequence[int], positions: Sequence[int],
             page_rows: Sequence[Sequence[int]],
             sampling: Sequence[SequenceSampling] | None = None) -> list[int]:
        """Decode one token for each user row: greedy for all rows unless some row's
        SequenceSampling samples; returns the next token of each row."""
        ttnn, dev = self.mesh.ttnn, self.mesh.device
        sample = sampling is not None and any(not s.params.greedy for s in sampling)
        self.mode = "sample" if sample else "greedy"
        wanted = self.wanted(rows, tokens, positions, page_rows, sampling if sample else None)
        self.inputs.write(wanted)
        if self.traced and self.mode not in self.traces:
            self.run_graph(sample)  # compile run (program cache), undone by the rewrite below
            self.inputs.write(wanted, force=True)
            tid = ttnn.begin_trace_capture(dev, cq_id=0)
            self.run_graph(sample)
            ttnn.end_trace_capture(dev, tid, cq_id=0)
            self.traces[self.mode] = tid
            self.inputs.write(wanted, force=True)  # capture may have executed (emulator)
        if self.traced:
            ttnn.execute_trace(dev, self.traces[self.mode], cq_id=0, blocking=False)
        else:
            self.run_graph(sample)
        out = self.mesh.read(self.inputs.next_tokens).reshape(-1).to(torch.int64)  # [32]
        self.inputs.advance(out, sample)
        self.steps += 1
        return [int(out[r]) for r in rows]

    def release(self) -> None:
        """Release the captured traces (a later step captures again)."""
        for tid in self.traces.values():
            self.mesh.ttnn.release_trace(self.mesh.device, tid)
        self.traces = {}
