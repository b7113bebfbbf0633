"""Traced decode: persistent device inputs, one compile run, one capture, then per step only
`copy_host_to_device_tensor` of inputs that changed and `execute_trace`.

The decode graph advances positions and feeds the greedy tokens back on the device, so while the
same users keep decoding the host writes nothing between replays: it keeps a mirror of what the
device inputs hold after each step and copies only the inputs whose wanted values differ (a user
joining or leaving, a new page-table row). Outputs (the next tokens) are read after each replay.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from llm.backends.tt.mesh import TILE, Mesh
from llm.backends.tt.model import Transformer


class DecodeInputs:
    """The persistent decode input/output tensors on the device and their host mirrors."""

    def __init__(self, mesh: Mesh, batch: int, blocks_per_seq: int) -> None:
        ttnn = mesh.ttnn
        self.mesh = mesh
        self.host = {
            "tokens": torch.zeros(1, 1, 1, TILE, dtype=torch.int64),
            "rot_idxs": torch.zeros(1, TILE, dtype=torch.int64),
            "cur_pos": torch.full((batch,), -1, dtype=torch.int64),
            "page_table": torch.zeros(batch, blocks_per_seq, dtype=torch.int64),
        }
        self.dtypes = {"tokens": ttnn.uint32, "rot_idxs": ttnn.uint32, "cur_pos": ttnn.int32,
                       "page_table": ttnn.int32}
        self.dev = {name: ttnn.from_torch(v, dtype=self.dtypes[name],
                                          layout=ttnn.ROW_MAJOR_LAYOUT, device=mesh.device,
                                          memory_config=ttnn.DRAM_MEMORY_CONFIG,
                                          mesh_mapper=mesh.replicate())
                    for name, v in self.host.items()}
        self.next_tokens = ttnn.from_torch(torch.zeros(1, 1, TILE, dtype=torch.int64),
                                           dtype=ttnn.uint32, layout=ttnn.ROW_MAJOR_LAYOUT,
                                           device=mesh.device,
                                           memory_config=ttnn.DRAM_MEMORY_CONFIG,
                                           mesh_mapper=mesh.replicate())
        self.host_writes = 0  # copy_host_to_device_tensor calls so far

    def write(self, wanted: dict[str, torch.Tensor], force: bool = False) -> None:
        """Copy each wanted input whose values differ from what the device holds."""
        ttnn = self.mesh.ttnn
        for name, value in wanted.items():
            if not force and torch.equal(value, self.host[name]):
                continue
            host = ttnn.from_torch(value, dtype=self.dtypes[name], layout=ttnn.ROW_MAJOR_LAYOUT,
                                   mesh_mapper=self.mesh.replicate())
            ttnn.copy_host_to_device_tensor(host, self.dev[name])
            self.host[name] = value.clone()
            self.host_writes += 1

    def advance(self, next_tokens: torch.Tensor) -> None:
        """Mirror what the decode graph did on the device: tokens fed back, positions + 1."""
        self.host["tokens"] = next_tokens.reshape(1, 1, 1, TILE).clone()
        pos = self.host["cur_pos"]
        self.host["cur_pos"] = torch.where(pos >= 0, pos + 1, pos)
        self.host["rot_idxs"] = self.host["rot_idxs"] + 1


class DecodeRunner:
    """Runs decode steps of `model`, traced (default) or eagerly."""

    def __init__(self, model: Transformer, traced: bool = True) -> None:
        self.model = model
        self.mesh = model.mesh
        self.traced = traced
        geo = model.cfg.geo
        self.batch = geo.batch
        self.max_pos = model.rope.length - 1
        self.inputs = DecodeInputs(model.mesh, geo.batch, model.cache.blocks_per_seq)
        self.trace_id = None
        self.steps = 0

    def wanted(self, rows: Sequence[int], tokens: Sequence[int], positions: Sequence[int],
               page_rows: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
        """The decode inputs for these user rows (other rows idle, position -1), as host
        tensors to pass to `DecodeInputs.write`."""
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
        return {"tokens": tok, "rot_idxs": rot, "cur_pos": pos, "page_table": table}

    def run_graph(self) -> None:
        """Run (or, inside a capture, record) the decode graph on the persistent inputs."""
        d = self.inputs.dev
        self.model.decode(d["tokens"], d["rot_idxs"], d["cur_pos"], d["page_table"],
                          self.inputs.next_tokens)

    def step(self, rows: Sequence[int], tokens: Sequence[int], positions: Sequence[int],
             page_rows: Sequence[Sequence[int]]) -> list[int]:
        """Decode one token for each user row; returns the greedy next token of each row."""
        ttnn, dev = self.mesh.ttnn, self.mesh.device
        wanted = self.wanted(rows, tokens, positions, page_rows)
        self.inputs.write(wanted)
        if self.traced and self.trace_id is None:
            self.run_graph()  # compile run (program cache), its effects undone by the rewrite below
            self.inputs.write(wanted, force=True)
            self.trace_id = ttnn.begin_trace_capture(dev, cq_id=0)
            self.run_graph()
            ttnn.end_trace_capture(dev, self.trace_id, cq_id=0)
            self.inputs.write(wanted, force=True)  # capture may have executed (emulator)
        if self.traced:
            ttnn.execute_trace(dev, self.trace_id, cq_id=0, blocking=False)
        else:
            self.run_graph()
        out = self.mesh.read(self.inputs.next_tokens).reshape(-1).to(torch.int64)  # [32]
        self.inputs.advance(out)
        self.steps += 1
        return [int(out[r]) for r in rows]

    def release(self) -> None:
        """Release the captured trace (a later step captures again)."""
        if self.trace_id is not None:
            self.mesh.ttnn.release_trace(self.mesh.device, self.trace_id)
            self.trace_id = None
