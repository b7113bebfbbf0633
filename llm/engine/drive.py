"""Drive a Backend directly, without the Generator: prefill users into slots, decode them together.

For benchmarks and backend tests that need exact control of the batch (no stop conditions, no
tokenizer). Pages come from a private PageTable, so the caller's pool bookkeeping is untouched.
"""

from __future__ import annotations

from collections.abc import Sequence

from llm.engine.contract.backend import Backend, DecodeInput, PrefillInput, SequenceSampling
from llm.engine.paged_kv import PageTable, PageTableSpec


def decode_together(backend: Backend, prompts: Sequence[Sequence[int]], steps: int,
                    sampling: Sequence[SequenceSampling]) -> list[list[int]]:
    """Prefill each prompt into slot i, then decode all together; `steps` tokens per user."""
    rt = backend.runtime
    pages = PageTable(PageTableSpec(rt.total_blocks, rt.block_size, rt.blocks_per_seq),
                      rt.max_batch)
    out = []
    for slot, p in enumerate(prompts):
        pages.reserve(slot, len(p) + steps)
        out.append([backend.prefill(PrefillInput(slot, p, 0, pages.row(slot), sampling[slot]))])
    slots = list(range(len(prompts)))
    for t in range(steps - 1):
        nxt = backend.decode(DecodeInput(slots, [o[-1] for o in out],
                                         [len(p) + t for p in prompts], pages.table(slots),
                                         list(sampling)))
        for o, tok in zip(out, nxt):
            o.append(tok)
    return out
