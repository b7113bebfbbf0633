"""A state dict with quantized weights <-> safetensors-ready (tensors, str metadata).

`flatten_state` stores each `QuantizedTensor` under `<name>.<plane>` and plain tensors under their
own name; the metadata entry `QUANT_METADATA_KEY` is the JSON object {name: {"format", "shape"}}
of the quantized ones. `unflatten_state` reverses it exactly (same dtypes and bytes).
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import torch

from llm.model.quant.tensor import QuantizedTensor

QUANT_METADATA_KEY = "llm.quantized_tensors"

Weight = torch.Tensor | QuantizedTensor


def flatten_state(weights: Mapping[str, Weight]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(flat tensors, metadata) for `safetensors.torch.save_file(tensors, path, metadata)`."""
    tensors: dict[str, torch.Tensor] = {}
    quantized: dict[str, dict] = {}
    for name, w in weights.items():
        if isinstance(w, QuantizedTensor):
            flat, quantized[name] = w.to_flat(name)
        else:
            flat = {name: w.contiguous().cpu()}
        for key, t in flat.items():
            if key in tensors:
                raise ValueError(f"tensor name {key!r} is used twice in the flattened state")
            tensors[key] = t
    return tensors, {QUANT_METADATA_KEY: json.dumps(quantized, sort_keys=True)}


def unflatten_state(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None
) -> dict[str, Weight]:
    """The state dict that `flatten_state` flattened (quantized weights rebuilt from planes)."""
    quantized = json.loads((metadata or {}).get(QUANT_METADATA_KEY, "{}"))
    weights: dict[str, Weight] = {}
    used: set[str] = set()
    for name, meta in quantized.items():
        w = QuantizedTensor.from_flat(name, tensors, meta)
        weights[name] = w
        used.update(f"{name}.{p}" for p in w.planes)
    for key, t in tensors.items():
        if key not in used:
            weights[key] = t
    return weights
