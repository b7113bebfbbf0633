"""Every architecture this engine runs, found by its own name, its Hugging Face names or its
GGUF name. Adding one: a file next to this one declaring its `Architecture`, listed here."""

from __future__ import annotations

from llm.model.arch.granite import GRANITE
from llm.model.arch.llama import LLAMA, SMOLLM
from llm.model.arch.mistral import MISTRAL
from llm.model.arch.phi3 import PHI3
from llm.model.arch.qwen2 import QWEN2
from llm.model.arch.qwen3 import QWEN3
from llm.model.arch.spec import Architecture

ARCHITECTURES: tuple[Architecture, ...] = (LLAMA, SMOLLM, MISTRAL, QWEN2, QWEN3, GRANITE, PHI3)


def _index(key) -> dict[str, Architecture]:
    out: dict[str, Architecture] = {}
    for arch in ARCHITECTURES:
        for name in key(arch):
            if name in out:
                raise ValueError(f"{name!r} is claimed by both {out[name].name} and {arch.name}")
            out[name] = arch
    return out


_BY_NAME = _index(lambda a: (a.name,))
_BY_HF_MODEL_TYPE = _index(lambda a: a.hf_model_types)
_BY_HF_CLASS = _index(lambda a: a.hf_classes)
_BY_GGUF = _index(lambda a: a.gguf_archs)


def architecture(name: str) -> Architecture | None:
    """The architecture whose `ModelConfig.arch` is `name`, or None."""
    return _BY_NAME.get(name)


def for_hf(model_type: str | None, classes: list[str] | None = None) -> Architecture | None:
    """The architecture of a `config.json`: by `model_type`, or when that is absent by its
    `architectures` classes; None if unknown."""
    if model_type is not None:
        return _BY_HF_MODEL_TYPE.get(model_type)
    found = {_BY_HF_CLASS[c].name: _BY_HF_CLASS[c] for c in classes or () if c in _BY_HF_CLASS}
    return next(iter(found.values())) if len(found) == 1 else None


def for_gguf(name: str) -> Architecture | None:
    """The architecture of a GGUF's `general.architecture`, or None."""
    return _BY_GGUF.get(name)


def supported_hf() -> list[str]:
    """The `model_type` values we run, sorted (for error messages)."""
    return sorted(_BY_HF_MODEL_TYPE)


def supported_gguf() -> list[str]:
    """The GGUF architecture names we run, sorted (for error messages)."""
    return sorted(_BY_GGUF)
