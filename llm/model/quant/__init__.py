"""Quantized weight matrices held and executed as they are stored.

- `QuantizedTensor` (`tensor`): format name, HF (out, in) shape, named planar tensors; exact
  reference `dequantize`, row / block-aligned column slices, device moves, flat save/load.
- Formats: the GGUF block formats Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K
  (`ggml_formats`, layouts and bit-exact dequant formulas) and our `int8` / `int4_g<G>`
  (`int_formats`); `get_format` (`registry`) looks one up by name, `bits` packs sub-byte codes.
- Sources: GGUF reader tensors (`gguf_repack`, lossless) and float weights (`quantize`).
- `quantized_linear` (`linear`): the reference x @ W.T every kernel is tested against.
- `flatten_state` / `unflatten_state` (`state`): state dicts <-> safetensors tensors + metadata.
"""

from llm.model.quant.gguf_repack import GGUF_FORMATS, from_gguf_tensor, repack_gguf
from llm.model.quant.layout import Plane, QuantFormat
from llm.model.quant.linear import quantized_linear
from llm.model.quant.quantize import DEFAULT_INT4_GROUP, quantize_int4, quantize_int8
from llm.model.quant.registry import get_format
from llm.model.quant.state import flatten_state, unflatten_state
from llm.model.quant.tensor import QuantizedTensor

__all__ = [
    "DEFAULT_INT4_GROUP",
    "GGUF_FORMATS",
    "Plane",
    "QuantFormat",
    "QuantizedTensor",
    "flatten_state",
    "from_gguf_tensor",
    "get_format",
    "quantize_int4",
    "quantize_int8",
    "quantized_linear",
    "repack_gguf",
    "unflatten_state",
]
