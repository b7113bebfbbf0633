"""Precision policies: the data format of every weight group, the KV cache and the attention
inputs, and the math fidelity of every matmul / attention op, per decoder layer.

The two policies are tt_transformers' `ModelOptimizations` (models/tt_transformers/tt/
model_config.py):

- "accuracy": everything bfloat16, HiFi4.
- "performance": tt_transformers' performance mode for a model it does not single out:
  bfloat4_b gate/up (w1/w3, LoFi, no fp32 accumulation), bfloat8_b down projection (w2), wqkv, wo,
  LM head and KV cache (HiFi2), prefill flash attention on bfloat8_b Q/K/V (HiFi4), the SwiGLU
  product in bfloat8_b. The fidelities follow the tech report's rule (HiFi4 for bf16, HiFi2 for
  bfloat8_b, LoFi for bfloat4_b weights).

Deliberate deviations from tt_transformers' performance mode, each toward accuracy (the emulator
computes every matmul in fp32 and rounds to the output dtype, so fidelities and accumulation do
not change its results; only the dtypes do): w2 and the LM head keep fp32 dest accumulation
(tt_transformers: HiFi2 without it), decode flash attention runs at HiFi4 (tt_transformers:
HiFi2), and the LM head output and the prefill wo output stay bfloat16 (tt_transformers writes
both in bfloat8_b).

Model-dependent precision. tt_transformers does not apply one policy to every model: a model
found degraded under a policy gets per-decoder overrides, either in code (Qwen2.5-7B / VL-7B
run performance mode with bf16 attention and KV cache at HiFi4 and bfloat8_b MLP) or in a JSON
file per model, `model_params/<model>/performance_decoder_config.json`, that replaces the
precision or fidelity of single decoders (Llama-3.1-8B: bfloat8_b w1/w3 in its last decoder
only); any model can be given such a file (`--decoder_config_file`). Here the same mechanism is
general: `precision(..., overrides=...)` takes a mapping in that file's form (see
`parse_overrides`) or one of the named `PRESETS` that reproduce tt_transformers' two overrides.
Which model needs which override is a measured judgement in tt_transformers (it ships such
presets per model and publishes ~79% teacher-forced top-1 for Llama-3.2-1B in plain performance
mode). The decision here (issue 17): "performance" is per model. A model under 1B parameters (the
default model, SmolLM2-135M, whose weights are already 4-bit) gets the "bf16-attention-bf8-mlp"
preset unless overrides are asked for (teacher-forced top-1 vs torch-bf16 over 575 tokens of
English: see STATUS.md and demos/tt_accuracy.py; plain performance mode loses ~20% of the top-1
on it); larger models get tt_transformers' performance mode as it is. The plain mode stays
available by name on any model: the preset "bf4-mlp" (no override).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

POLICIES = ("accuracy", "performance")
TENSOR_GROUPS = ("wqkv", "wo", "w1", "w3", "w2", "kv_cache", "prefill_q", "mlp_product")
FIDELITY_GROUPS = ("wqkv", "wo", "w1", "w3", "w2", "sdpa_prefill", "sdpa_decode")
# compute-kernel configs by name (built in op_configs._kernels), tt_transformers'
# MathFidelitySetting: "hifi2_fp16" is HiFi2 without fp32 dest accumulation
KERNELS = ("hifi4", "hifi2", "hifi2_fp16", "lofi")
_DTYPES = {"bf16": "bfloat16", "bf8": "bfloat8_b", "bf4": "bfloat4_b"}

# tt_transformers' model-specific overrides, in the form parse_overrides reads:
PRESETS: dict[str, dict[str, Any]] = {
    # model_params/Llama-3.1-8B-Instruct/performance_decoder_config.json: the last decoder's
    # FF1/FF3 in bfloat8_b (HIFI2_FP16), every other decoder as the policy says
    "bf8-mlp-last-decoder": {"decoders": {"-1": {
        "precision": {"w1": "bf8", "w3": "bf8"},
        "fidelity": {"w1": "hifi2_fp16", "w3": "hifi2_fp16"}}}},
    # ModelOptimizations.performance for Qwen2.5-7B / Qwen2.5-VL-7B ("degraded under standard
    # high-performance settings"): bf16 wqkv / wo / KV cache with HiFi4 attention ops, the MLP
    # at the default bfloat8_b (HIFI2_FP16)
    "bf16-attention-bf8-mlp": {"decoders": {"all": {
        "precision": {"wqkv": "bf16", "wo": "bf16", "kv_cache": "bf16", "w1": "bf8",
                      "w3": "bf8"},
        "fidelity": {"wqkv": "hifi4", "wo": "hifi4", "sdpa_prefill": "hifi4",
                     "sdpa_decode": "hifi4", "w1": "hifi2_fp16", "w3": "hifi2_fp16"}}}},
    # tt_transformers' performance mode as it is (bfloat4_b w1/w3 in every decoder): what
    # "performance" means for models of 1B parameters or more, by name for smaller ones
    "bf4-mlp": {"decoders": {}},
}
SMALL_MODEL_PARAMS = 1_000_000_000  # below this, "performance" defaults to SMALL_MODEL_PRESET
SMALL_MODEL_PRESET = "bf16-attention-bf8-mlp"


def num_params(config: Any) -> int:
    """Parameters of a model described by a ModelConfig (embedding, LM head unless tied,
    attention and MLP weights; norms and biases are negligible and left out)."""
    h = config.hidden_size
    attention = h * (2 * config.q_size + 2 * config.kv_size)  # q, k, v, o
    mlp = 3 * h * config.intermediate_size
    heads = 1 if config.tie_word_embeddings else 2
    return heads * config.vocab_size * h + config.num_layers * (attention + mlp)


def default_overrides(policy: str, config: Any) -> str | None:
    """The decoder overrides `policy` applies to the model of `config` when none are asked for:
    SMALL_MODEL_PRESET for "performance" on a model under SMALL_MODEL_PARAMS, else none."""
    if policy == "performance" and num_params(config) < SMALL_MODEL_PARAMS:
        return SMALL_MODEL_PRESET
    return None


@dataclass(frozen=True)
class DecoderPrecision:
    """Data formats (ttnn DataType values) and math fidelities (KERNELS names) of one decoder."""

    wqkv: Any
    wo: Any
    w1: Any  # gate
    w3: Any  # up
    w2: Any  # down
    kv_cache: Any
    prefill_q: Any  # Q of prefill flash attention (K and V enter it in the KV-cache dtype)
    mlp_product: Any  # silu(w1 x) * (w3 x)
    fidelity: Mapping[str, str]  # FIDELITY_GROUPS -> KERNELS


@dataclass(frozen=True)
class Precision:
    """A policy: one DecoderPrecision per decoder layer, and the LM head's format and fidelity.
    `overridden` lists the decoders whose settings differ from the policy's default."""

    name: str
    decoders: tuple[DecoderPrecision, ...]
    lm_head: Any
    lm_head_fidelity: str
    overridden: tuple[int, ...] = ()

    def decoder(self, layer: int) -> DecoderPrecision:
        """The settings of decoder `layer`."""
        return self.decoders[layer]


def _default(ttnn: Any, name: str) -> tuple[DecoderPrecision, Any, str]:
    if name == "accuracy":
        bf16 = ttnn.bfloat16
        return (DecoderPrecision(bf16, bf16, bf16, bf16, bf16, bf16, bf16, bf16,
                                 {g: "hifi4" for g in FIDELITY_GROUPS}), bf16, "hifi4")
    if name == "performance":
        bf8, bf4 = ttnn.bfloat8_b, ttnn.bfloat4_b
        return (DecoderPrecision(wqkv=bf8, wo=bf8, w1=bf4, w3=bf4, w2=bf8, kv_cache=bf8,
                                 prefill_q=bf8, mlp_product=bf8,
                                 fidelity={"wqkv": "hifi2", "wo": "hifi2", "w1": "lofi",
                                           "w3": "lofi", "w2": "hifi2", "sdpa_prefill": "hifi4",
                                           "sdpa_decode": "hifi4"}), bf8, "hifi2")
    raise ValueError(f"unknown precision policy {name!r} (choose from {', '.join(POLICIES)})")


def parse_overrides(spec: str | Path | Mapping[str, Any] | None,
                    num_layers: int) -> dict[int, dict[str, dict[str, str]]]:
    """Per-decoder overrides from a PRESETS name, a JSON file path or a mapping of the form
    `{"decoders": {KEY: {"precision": {group: "bf16"|"bf8"|"bf4"}, "fidelity": {group: kernel}}}}`
    (tt_transformers' decoder config file; group names are TENSOR_GROUPS / FIDELITY_GROUPS here).
    KEY is a decoder index (negative counts from the last), or "all"; indices refine "all".
    Returns {decoder index: {"precision": ..., "fidelity": ...}}; anything unknown is an error."""
    if spec is None:
        return {}
    if isinstance(spec, (str, Path)):
        if isinstance(spec, str) and spec in PRESETS:
            spec = PRESETS[spec]
        elif Path(spec).suffix == ".json" and Path(spec).is_file():
            try:
                spec = json.loads(Path(spec).read_text())
            except (ValueError, OSError) as e:  # JSONDecodeError is a ValueError
                raise ValueError(f"decoder precision file {str(spec)!r}: {e}") from e
        else:
            raise ValueError(f"decoder precision {str(spec)!r} is neither a preset "
                             f"({', '.join(PRESETS)}) nor a .json file")
    if not isinstance(spec, Mapping) or set(spec) != {"decoders"} \
            or not isinstance(spec["decoders"], Mapping):
        raise ValueError("decoder precision overrides must be a mapping {'decoders': {...}}")
    out: dict[int, dict[str, dict[str, str]]] = {}
    entries = sorted(spec["decoders"].items(), key=lambda kv: str(kv[0]) != "all")
    for key, entry in entries:
        if str(key) == "all":
            layers = range(num_layers)
        else:
            try:
                index = int(key)
            except (TypeError, ValueError):
                raise ValueError(f"decoder key {key!r} is not an index or 'all'") from None
            if not -num_layers <= index < num_layers:
                raise ValueError(f"decoder {index} is out of range for {num_layers} layers")
            layers = [index % num_layers]
        if not isinstance(entry, Mapping) or not set(entry) <= {"precision", "fidelity"}:
            raise ValueError(f"decoder {key!r}: an entry has only 'precision' and 'fidelity'")
        for section, groups, values in (("precision", TENSOR_GROUPS, _DTYPES),
                                        ("fidelity", FIDELITY_GROUPS, KERNELS)):
            for group, value in dict(entry.get(section, {})).items():
                if group not in groups:
                    raise ValueError(f"decoder {key!r}: unknown {section} group {group!r} "
                                     f"(choose from {', '.join(groups)})")
                if value not in values:
                    raise ValueError(f"decoder {key!r}: {section} {group}={value!r} is not one "
                                     f"of {', '.join(values)}")
                for layer in layers:
                    out.setdefault(layer, {"precision": {}, "fidelity": {}})[section][group] = \
                        value
    return out


def precision(ttnn: Any, name: str, num_layers: int,
              overrides: str | Path | Mapping[str, Any] | None = None) -> Precision:
    """The named policy for a model of `num_layers` decoders with `ttnn`'s dtype objects, with
    per-decoder overrides (see parse_overrides) applied."""
    base, lm_head, lm_fidelity = _default(ttnn, name)
    decoders = []
    for layer, change in sorted(parse_overrides(overrides, num_layers).items()):
        dtypes = {g: getattr(ttnn, _DTYPES[v]) for g, v in change["precision"].items()}
        decoders.append((layer, replace(base, **dtypes,
                                        fidelity={**base.fidelity, **change["fidelity"]})))
    changed = dict(decoders)
    return Precision(name, tuple(changed.get(i, base) for i in range(num_layers)), lm_head,
                     lm_fidelity, tuple(i for i in sorted(changed) if changed[i] != base))
