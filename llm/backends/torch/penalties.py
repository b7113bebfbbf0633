"""Per-slot penalty state on the device: token counts, prompt tokens, logit bias, min_tokens.

Each batch slot owns one row of every buffer, written when a request's prompt is prefilled into
that slot (`begin`, `add_prompt`) and read by the decode steps through the batch's slot ids, so a
decode step needs no per-request input beyond its slot ids (and it fits in a CUDA graph).

Counts of generated tokens are updated on the device by each decode step from the token it feeds
(the previous step's choice), guarded by `counted`: a slot's counts hold its generated tokens at
positions < counted[slot], so a step that is run again on the same inputs (graphs.py recomputes a
step launched ahead when the batch changed) does not count its token twice, and a step launched
ahead whose result is thrown away for an earlier position is undone (`uncount`). Row `slots`
(one past the last slot) is scratch for padding rows.

Order of application (vLLM's): logit_bias, min_tokens (EOS and stop_token_ids at -inf until
min_tokens were generated), repetition_penalty (Hugging Face: a token seen in the prompt or
generated has its logit divided by the penalty when positive, multiplied when negative), then
frequency_penalty * count and presence_penalty * (count > 0) subtracted (OpenAI).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence

import torch

from llm.engine.contract.backend import SequenceSampling


class SlotPenalties:
    """The penalty buffers of `slots` batch slots over a vocabulary of `vocab` (see module)."""

    def __init__(self, slots: int, vocab: int, device: torch.device,
                 fused: bool | None = None) -> None:
        """fused: apply the penalties by the Triton kernel (kernels/penalties.py); None: on CUDA
        where Triton is installed."""
        n = slots + 1  # + the scratch row of padding
        self.scratch = slots
        if fused is None:
            fused = torch.device(device).type == "cuda" and importlib.util.find_spec(
                "triton") is not None
        self.fused = fused
        with torch.inference_mode():
            self.counts = torch.zeros(n, vocab, dtype=torch.int32, device=device)
            self.counted = torch.zeros(n, dtype=torch.int64, device=device)
            self.in_prompt = torch.zeros(n, vocab, dtype=torch.bool, device=device)
            self.bias = torch.zeros(n, vocab, dtype=torch.float32, device=device)
            self.stop = torch.zeros(n, vocab, dtype=torch.bool, device=device)
            self.min_pos = torch.zeros(n, dtype=torch.int64, device=device)
            self.presence = torch.zeros(n, dtype=torch.float32, device=device)
            self.frequency = torch.zeros(n, dtype=torch.float32, device=device)
            self.repetition = torch.ones(n, dtype=torch.float32, device=device)
        # host-known: the row's bias, stop, presence, frequency and repetition are neutral (0, no
        # stop, 0, 0, 1), so apply() leaves its logits as they are whatever its counts, counted,
        # in_prompt and min_pos hold
        self._neutral = [True] * n

    @torch.inference_mode()
    def begin(self, slot: int, sampling: SequenceSampling) -> None:
        """A new request in `slot` (its first prefill chunk): reset the row to its parameters.
        A request without penalties, bias or min_tokens in a neutral row launches nothing: the
        row's counts are read only by a request that has them, and its own begin resets them."""
        p = sampling.params
        if not p.penalized and self._neutral[slot]:
            return
        self._neutral[slot] = not p.penalized
        for t in (self.counts, self.counted, self.in_prompt, self.bias, self.stop):
            t[slot] = 0
        self.presence[slot] = p.presence_penalty
        self.frequency[slot] = p.frequency_penalty
        self.repetition[slot] = p.repetition_penalty
        dev = self.bias.device
        if p.allowed_token_ids:  # every other token masked
            self.bias[slot] = float("-inf")
            self.bias[slot, torch.tensor(p.allowed_token_ids, dtype=torch.int64, device=dev)] = 0
        if p.logit_bias:  # (added: a masked token stays masked)
            ids = torch.tensor([t for t, _ in p.logit_bias], dtype=torch.int64, device=dev)
            self.bias[slot, ids] += torch.tensor([b for _, b in p.logit_bias],
                                                 dtype=torch.float32, device=dev)
        if p.min_tokens and sampling.stop_ids:
            self.stop[slot, torch.tensor(sampling.stop_ids, dtype=torch.int64, device=dev)] = True

    @torch.inference_mode()
    def fork(self, src: int, dst: int) -> None:
        """Start row `dst` as a copy of row `src`: another user of the same request (the same
        parameters) after the same prompt."""
        if self._neutral[src] and self._neutral[dst]:
            return
        for t in (self.counts, self.counted, self.in_prompt, self.bias, self.stop, self.min_pos,
                  self.presence, self.frequency, self.repetition):
            t[dst] = t[src]
        self._neutral[dst] = self._neutral[src]

    @torch.inference_mode()
    def add_prompt(self, slot: int, sampling: SequenceSampling, tokens: Sequence[int],
                   end: int) -> None:
        """One prefill chunk `tokens` (S ids) of the request in `slot`, ending at position `end`
        (exclusive): its tokens count as seen by repetition_penalty; min_tokens counts from end.
        Only a repetition penalty copies the ids to the device.
        """
        if sampling.params.repetition_penalty != 1.0:
            ids = torch.tensor(list(tokens), dtype=torch.int64, device=self.in_prompt.device)
            self.in_prompt[slot, ids] = True  # [S] columns
        if sampling.params.min_tokens:  # else the row's stop columns are all False (begin)
            self.min_pos[slot] = end + sampling.params.min_tokens

    @torch.inference_mode()
    def count(self, slots: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor) -> None:
        """Count the generated `tokens` [B] fed at `positions` [B] into rows `slots` [B] (once)."""
        new = positions >= self.counted[slots]  # [B]
        flat = slots * self.counts.shape[1] + tokens  # [B] into counts.view(-1); atomics on CUDA
        self.counts.view(-1).scatter_add_(0, flat, new.to(torch.int32))
        self.counted[slots] = torch.maximum(self.counted[slots], positions + 1)

    @torch.inference_mode()
    def uncount(self, slots: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor) -> None:
        """Undo `count` of a step whose result is thrown away (graphs.py's step launched ahead,
        when the next call asks for an earlier position): rows whose latest count is the token at
        `positions` forget it, so a step recomputed at an earlier position sees only the tokens
        before it."""
        last = self.counted[slots] == positions + 1  # [B]
        flat = slots * self.counts.shape[1] + tokens  # [B]
        self.counts.view(-1).scatter_add_(0, flat, -last.to(torch.int32))
        self.counted[slots] = torch.where(last, positions, self.counted[slots])

    def apply(self, logits: torch.Tensor, slots: torch.Tensor,
              sample_pos: torch.Tensor) -> torch.Tensor:
        """Penalized logits [B, V] f32 for rows `slots` [B] choosing the tokens at `sample_pos`."""
        if self.fused:
            from llm.backends.torch.kernels.penalties import fused_penalties

            return fused_penalties(logits.contiguous(), slots, sample_pos, self.bias, self.stop,
                                   self.counts, self.in_prompt, self.min_pos, self.presence,
                                   self.frequency, self.repetition)
        x = logits.float() + self.bias[slots]  # [B, V]
        early = (sample_pos < self.min_pos[slots])[:, None] & self.stop[slots]  # [B, V]
        x = x.masked_fill(early, float("-inf"))
        counts = self.counts[slots]  # [B, V]
        seen = counts > 0
        rep = self.repetition[slots][:, None]  # [B, 1]
        x = torch.where(seen | self.in_prompt[slots], torch.where(x > 0, x / rep, x * rep), x)
        return (x - self.frequency[slots][:, None] * counts
                - self.presence[slots][:, None] * seen)


def full_path(params: Sequence[SequenceSampling]) -> bool:
    """Host-known: whether a batch needs the penalty / logprobs path (else the plain sampler)."""
    return any(s.params.penalized or s.params.logprobs is not None for s in params)
