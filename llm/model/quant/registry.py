"""Look-up of a quantized format by name (GGUF block formats and our int8/int4 formats)."""

from __future__ import annotations

from llm.model.quant.ggml_formats import GGML_FORMATS
from llm.model.quant.int_formats import int_format
from llm.model.quant.layout import QuantFormat


def get_format(name: str) -> QuantFormat:
    """The format called `name` (`q4_k`, `int4_g128`, ...); ValueError naming the known ones."""
    fmt = GGML_FORMATS.get(name) or int_format(name)
    if fmt is None:
        known = ", ".join([*GGML_FORMATS, "int8", "int4_g<G>"])
        raise ValueError(f"unknown quantized format {name!r} (known: {known})")
    return fmt
