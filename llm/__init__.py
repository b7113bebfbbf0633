"""llm: a Llama-family transformer inference engine with torch (CUDA/CPU) and TT-NN backends.

    import llm
    model = llm.LLM()                                   # the embedded SmolLM2-135M-Instruct
    out = model.generate(["Once upon a time"], llm.SamplingParams(max_new_tokens=32))
    print(out[0].text)

Names are imported on first use, so `import llm` stays light and imports no backend.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "LLM": "llm.engine",
    "AsyncEngine": "llm.async_engine",
    "SchedulerConfig": "llm.scheduler",
    "Generator": "llm.generator",
    "RequestOutput": "llm.generator",
    "StreamEvent": "llm.generator",
    "SamplingParams": "llm.sampling",
    "ModelConfig": "llm.config",
    "RuntimeConfig": "llm.config",
    "Tokenizer": "llm.tokenizer",
    "load_checkpoint": "llm.checkpoint",
}

__all__ = [
    "LLM", "AsyncEngine", "SchedulerConfig", "Generator", "ModelConfig", "RequestOutput",
    "RuntimeConfig", "SamplingParams", "StreamEvent", "Tokenizer", "load_checkpoint",
]

if TYPE_CHECKING:
    from llm.async_engine import AsyncEngine
    from llm.checkpoint import load_checkpoint
    from llm.config import ModelConfig, RuntimeConfig
    from llm.engine import LLM
    from llm.generator import Generator, RequestOutput, StreamEvent
    from llm.sampling import SamplingParams
    from llm.scheduler import SchedulerConfig
    from llm.tokenizer import Tokenizer


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'llm' has no attribute {name!r}")
