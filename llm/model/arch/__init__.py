"""Architectures, one file per family, each described in one place (`spec.Architecture`): the
names it is known by in HF configs and GGUF files, its tensor names, its switches."""

from llm.model.arch.registry import (
    ARCHITECTURES,
    architecture,
    for_gguf,
    for_hf,
    supported_gguf,
    supported_hf,
)
from llm.model.arch.spec import Architecture, Fused

__all__ = ["ARCHITECTURES", "Architecture", "Fused", "architecture", "for_gguf", "for_hf",
           "supported_gguf", "supported_hf"]
