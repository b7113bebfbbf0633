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
    "LLM": "llm.api.llm",
    "AsyncEngine": "llm.engine.async_engine",
    "SchedulerConfig": "llm.engine.scheduler",
    "Generator": "llm.engine.generator",
    "RequestOutput": "llm.engine.generator",
    "StreamEvent": "llm.engine.generator",
    "TokenLogprobs": "llm.engine.contract.outputs",
    "SamplingParams": "llm.engine.contract.sampling_params",
    "SamplingParamsError": "llm.engine.contract.sampling_params",
    "StructuredOutput": "llm.engine.contract.structured",
    "Capabilities": "llm.engine.contract.backend",
    "EngineBusyError": "llm.engine.core",
    "ModelConfig": "llm.model.config",
    "RuntimeConfig": "llm.model.config",
    "Tokenizer": "llm.model.tokenizer.tokenizer",
    "TokenizerError": "llm.model.tokenizer.errors",
    "load_checkpoint": "llm.model.checkpoint.load",
}

__all__ = [
    "LLM", "AsyncEngine", "Capabilities", "EngineBusyError", "SchedulerConfig", "Generator",
    "ModelConfig", "RequestOutput", "RuntimeConfig", "SamplingParams", "SamplingParamsError",
    "StreamEvent", "StructuredOutput", "TokenLogprobs", "Tokenizer", "TokenizerError",
    "load_checkpoint",
]

if TYPE_CHECKING:
    from llm.api.llm import LLM
    from llm.engine.async_engine import AsyncEngine
    from llm.engine.contract.backend import Capabilities
    from llm.engine.contract.outputs import TokenLogprobs
    from llm.engine.contract.sampling_params import SamplingParams, SamplingParamsError
    from llm.engine.contract.structured import StructuredOutput
    from llm.engine.core import EngineBusyError
    from llm.engine.generator import Generator, RequestOutput, StreamEvent
    from llm.engine.scheduler import SchedulerConfig
    from llm.model.checkpoint.load import load_checkpoint
    from llm.model.config import ModelConfig, RuntimeConfig
    from llm.model.tokenizer.tokenizer import Tokenizer


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'llm' has no attribute {name!r}")
