"""Per-slot penalty state on the device: token counts, prompt tokens, logit bias, min_tokens.

A batch slot is a row of the 32-row decode tile (slot u decodes in row u), so each slot owns row
u of five device buffers `[1, 1, 32, V_pad]`: `counts` (fp32, generated tokens per id), `prompt`
(bf16, 1 where the id is in the prompt), `bias` (fp32, logit_bias), `stop` (bf16, MASKED at EOS
and stop_token_ids of a request with min_tokens) and `allowed` (bf16, MASKED but at the ids of
allowed_token_ids, 0 in a row without them). The host keeps a mirror of each; `begin` /
`fork` / `add_prompt` change the mirror when a request's prompt is prefilled into a slot and
`sync` copies the changed buffers to the device (copy_host_to_device_tensor, once per admission),
where every decode step reads them.

The decode step counts on the device: the token each row feeds (the previous step's choice) is
turned into a one-hot row, `EQZ(iota - id)`, and added into `counts` in place, inside the traced
graph, so there is no host round trip per step; `count_mirror` repeats the update on the mirror
(the host knows the fed tokens), which is what keeps a later `sync` exact. Per-row parameters
(presence, frequency, repetition and its reciprocal, and `min_left`: how many tokens are still
to be generated before min_tokens is met, decremented by the graph) are `[1, 1, 32, 1]` fp32
columns in the decode inputs (columns()).

Order of application (vLLM's, as the torch backend): logit_bias, repetition_penalty (Hugging
Face: a token seen in the prompt or generated has its logit divided by the penalty when positive,
multiplied when negative), then frequency_penalty * count and presence_penalty * (count > 0)
subtracted (OpenAI); the masks last: allowed_token_ids' and min_tokens' (stop ids at MASKED while
min_left > 0). A masked token is masked wherever the mask goes (the torch backend's -inf passes
the penalties unchanged); added after them, MASKED is never scaled by a repetition penalty (1e9
would overflow it to -inf, and -inf * 0 is NaN; 1e-30 would unmask it). The division is
a multiplication by the host-computed reciprocal (no division op), so it may round differently
in the last bit of fp32.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from llm.backends.tt.mesh import TILE, Mesh
from llm.backends.tt.token_masks import MASKED
from llm.engine.contract.backend import SequenceSampling

BUFFERS = ("counts", "prompt", "bias", "stop", "allowed")  # the [1, 1, 32, V_pad] per-slot buffers
# counting: 1.0 for the rows of the step's batch, whose fed token is a generated one (an idle row,
# or one between its prefill chunks, feeds a stale token that must not count)
COLUMNS = ("presence", "frequency", "repetition", "inv_repetition", "min_left", "counting")


def neutral_columns() -> dict[str, torch.Tensor]:
    """Per-row parameters that change nothing, `[1, 1, 32, 1]` fp32 each."""
    ones = torch.ones(1, 1, TILE, 1)
    return {"presence": ones * 0, "frequency": ones * 0, "repetition": ones.clone(),
            "inv_repetition": ones.clone(), "min_left": ones * 0, "counting": ones * 0}


class SlotPenalties:
    """The penalty buffers of the 32 slots (rows) over a padded vocabulary `width` (see module).
    """

    def __init__(self, mesh: Mesh, width: int) -> None:
        ttnn = mesh.ttnn
        self.mesh, self.width = mesh, width
        z = torch.zeros(1, 1, TILE, width)
        self.host = {"counts": z.clone(), "prompt": z.clone(), "bias": z.clone(),
                     "stop": z.clone(), "allowed": z.clone()}
        self.dtypes = {"counts": ttnn.float32, "prompt": ttnn.bfloat16, "bias": ttnn.float32,
                       "stop": ttnn.bfloat16, "allowed": ttnn.bfloat16}
        self.dev = {name: self._put(name, v, mesh.device) for name, v in self.host.items()}
        self.dirty: set[str] = set()
        self.params = {u: (0.0, 0.0, 1.0, 0) for u in range(TILE)}  # pres, freq, rep, min_pos
        self.host_writes = 0
        # the token ids as a fp32 row (ids < 2^24 are exact), for one-hot rows EQZ(iota - id)
        self.iota = ttnn.from_torch(torch.arange(width, dtype=torch.float32)[None, None, None],
                                    dtype=ttnn.float32, layout=ttnn.TILE_LAYOUT,
                                    device=mesh.device, memory_config=ttnn.DRAM_MEMORY_CONFIG,
                                    mesh_mapper=mesh.replicate())

    def _put(self, name: str, value: torch.Tensor, device):
        ttnn = self.mesh.ttnn
        return ttnn.from_torch(value, dtype=self.dtypes[name], layout=ttnn.TILE_LAYOUT,
                               device=device,
                               memory_config=ttnn.DRAM_MEMORY_CONFIG if device else None,
                               mesh_mapper=self.mesh.replicate())

    # ------------------------------------------------------------------ host: admissions
    def begin(self, slot: int, sampling: SequenceSampling) -> None:
        """A new request in `slot` (its first prefill chunk): reset the row to its parameters."""
        p = sampling.params
        for name in BUFFERS:
            if bool(self.host[name][0, 0, slot].any()):
                self.host[name][0, 0, slot] = 0
                self.dirty.add(name)
        if p.allowed_token_ids:  # every other token masked
            self.host["allowed"][0, 0, slot] = MASKED
            self.host["allowed"][0, 0, slot, list(p.allowed_token_ids)] = 0
            self.dirty.add("allowed")
        for tok, b in p.logit_bias:
            self.host["bias"][0, 0, slot, tok] = b
            self.dirty.add("bias")
        if p.min_tokens and sampling.stop_ids:
            self.host["stop"][0, 0, slot, list(sampling.stop_ids)] = MASKED
            self.dirty.add("stop")
        self.params[slot] = (p.presence_penalty, p.frequency_penalty, p.repetition_penalty, 0)

    def fork(self, src: int, dst: int) -> None:
        """Start row `dst` as a copy of row `src` (another sequence of the same request)."""
        for name in BUFFERS:
            if not torch.equal(self.host[name][0, 0, dst], self.host[name][0, 0, src]):
                self.host[name][0, 0, dst] = self.host[name][0, 0, src]
                self.dirty.add(name)
        self.params[dst] = self.params[src]

    def add_prompt(self, slot: int, sampling: SequenceSampling, tokens: Sequence[int],
                   end: int) -> None:
        """One prefill chunk `tokens` of the request in `slot`, ending at position `end`
        (exclusive): its tokens count as seen by repetition_penalty; min_tokens counts from end.
        """
        p = sampling.params
        if p.repetition_penalty != 1.0 and len(tokens):
            self.host["prompt"][0, 0, slot, list(tokens)] = 1.0
            self.dirty.add("prompt")
        pres, freq, rep, _ = self.params[slot]
        self.params[slot] = (pres, freq, rep, end + p.min_tokens)

    def columns(self, rows: Mapping[int, int],
                previous: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The per-row parameters `[1, 1, 32, 1]` fp32 of `rows` (row -> the position of the
        token it chooses); other rows are neutral, except min_left, kept from `previous` (what
        the device holds: the graph decrements it in every row) so idle rows need no write."""
        out = neutral_columns()
        if previous is not None:
            out["min_left"] = previous["min_left"].clone()
        for r, sample_pos in rows.items():
            pres, freq, rep, min_pos = self.params[r]
            out["presence"][0, 0, r] = pres
            out["frequency"][0, 0, r] = freq
            out["repetition"][0, 0, r] = rep
            out["inv_repetition"][0, 0, r] = 1.0 / rep
            out["min_left"][0, 0, r] = float(min_pos - sample_pos)  # > 0: stop ids masked
            out["counting"][0, 0, r] = 1.0
        return out

    def sync(self, force: bool = False) -> None:
        """Copy the buffers whose mirror changed (all with `force`) to the device."""
        ttnn = self.mesh.ttnn
        for name in BUFFERS if force else sorted(self.dirty):
            ttnn.copy_host_to_device_tensor(self._put(name, self.host[name], None),
                                            self.dev[name])
            self.host_writes += 1
        self.dirty.clear()

    def count_mirror(self, fed: torch.Tensor, rows: Sequence[int]) -> None:
        """Mirror the decode graph's count of the fed tokens `fed` [32] (one per row) of the
        batch's `rows` (the others' counting column is 0)."""
        rows_t = torch.tensor(list(rows), dtype=torch.int64)
        self.host["counts"][0, 0, rows_t, fed.to(torch.int64)[rows_t]] += 1

    # ------------------------------------------------------------------ device
    def one_hot(self, ids_col):
        """ids_col fp32 `[1, 1, 32, 1]` -> bf16 `[1, 1, 32, V_pad]`, 1.0 at each row's id (0 / 1
        are exact in bf16, half the bytes of fp32)."""
        ttnn = self.mesh.ttnn
        return ttnn.subtract(self.iota, ids_col, activations=[ttnn.UnaryOpType.EQZ],
                             dtype=ttnn.bfloat16, memory_config=ttnn.DRAM_MEMORY_CONFIG)

    def count(self, fed_col, counting) -> None:
        """Add the one-hot rows of the fed tokens fed_col fp32 `[1, 1, 32, 1]` into `counts` for
        the rows whose `counting` column (fp32 `[1, 1, 32, 1]`, 0 / 1) is 1 (in place;
        trace-safe)."""
        ttnn = self.mesh.ttnn
        dram = ttnn.DRAM_MEMORY_CONFIG
        hot = self.one_hot(fed_col)
        kept = ttnn.multiply(hot, counting, dtype=ttnn.bfloat16, memory_config=dram)  # 0 / 1
        ttnn.deallocate(hot)
        counts = self.dev["counts"]
        ttnn.add(counts, kept, memory_config=dram, output_tensor=counts)
        ttnn.deallocate(kept)

    def apply(self, x, cols: Mapping):
        """Penalized logits: x fp32 `[1, 1, 32, V_pad]` -> fp32 `[1, 1, 32, V_pad]`; cols: the
        device columns of COLUMNS. Decrements min_left by one (in place)."""
        ttnn = self.mesh.ttnn
        dram = ttnn.DRAM_MEMORY_CONFIG
        u = ttnn.UnaryOpType
        d = self.dev
        steps = []

        def keep(t):
            steps.append(t)
            return t

        x = keep(ttnn.add(x, d["bias"], memory_config=dram))
        hit = keep(ttnn.add(d["counts"], d["prompt"], activations=[u.GTZ], dtype=ttnn.bfloat16,
                            memory_config=dram))  # 0 / 1
        up = keep(ttnn.multiply(x, cols["inv_repetition"], input_tensor_a_activations=[u.RELU],
                                memory_config=dram))  # x / rep where x > 0
        down = keep(ttnn.multiply(x, cols["repetition"], input_tensor_a_activations=[u.NEG, u.RELU],
                                  memory_config=dram))  # -x * rep where x < 0
        rep = keep(ttnn.subtract(up, down, memory_config=dram))
        unhit = keep(ttnn.multiply(x, hit, input_tensor_b_activations=[u.EQZ],
                                   memory_config=dram))
        onhit = keep(ttnn.multiply(rep, hit, memory_config=dram))
        x = keep(ttnn.add(unhit, onhit, memory_config=dram))
        freq = keep(ttnn.multiply(d["counts"], cols["frequency"], memory_config=dram))
        x = keep(ttnn.subtract(x, freq, memory_config=dram))
        pres = keep(ttnn.multiply(d["counts"], cols["presence"],
                                  input_tensor_a_activations=[u.GTZ], memory_config=dram))
        x = keep(ttnn.subtract(x, pres, memory_config=dram))
        x = keep(ttnn.add(x, d["allowed"], memory_config=dram))  # the masks (see module)
        early = keep(ttnn.multiply(d["stop"], cols["min_left"], dtype=ttnn.bfloat16,
                                   input_tensor_b_activations=[u.GTZ], memory_config=dram))
        out = ttnn.add(x, early, memory_config=dram)
        for t in steps:
            ttnn.deallocate(t)
        ttnn.add(cols["min_left"], -1.0, memory_config=dram, output_tensor=cols["min_left"])
        return out


def full_path(params: Sequence[SequenceSampling], masked: bool = False) -> bool:
    """Host-known: whether a batch needs the penalty / logprobs / mask path (else the plain
    sampler or the argmax fast path)."""
    return masked or any(s.params.penalized or s.params.logprobs is not None for s in params)
