"""RoPE frequency scaling of a model: the `RopeScaling` description and its readers from a
Hugging Face config's `rope_scaling` / `rope_parameters` and from GGUF metadata and tensors.

The frequencies themselves are computed in `llm.model.rope`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from llm.model.errors import ConfigError

ROPE_TYPES = ("llama3", "linear", "freq_factors", "longrope")


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling.

    rope_type "llama3": Llama 3.1 smooth interpolation (factor, low/high_freq_factor, original
    context). rope_type "linear": positions divided by `factor`. rope_type "freq_factors": explicit
    per-frequency divisors (GGUF `rope_freqs.weight`). rope_type "longrope" (Phi-3's LongRoPE,
    "su"): per-frequency divisors `short_factor` while a sequence is at most
    original_max_position_embeddings long, `long_factor` beyond, and cos/sin multiplied by
    attention_factor, that is q and k both: the attention scores by its square
    (`ModelConfig.attention_scale`, where the backends apply it in the scores' precision rather
    than in rounded cos/sin tables).
    """

    rope_type: str
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    freq_factors: tuple[float, ...] = ()
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    attention_factor: float = 1.0

    def __post_init__(self) -> None:
        if self.rope_type not in ROPE_TYPES:
            raise ConfigError(
                f"rope_scaling type {self.rope_type!r} is not supported "
                "(supported: 'llama3', 'linear', 'longrope' / 'su', GGUF rope_freqs)"
            )
        if self.rope_type in ("llama3", "linear") and not self.factor > 0:
            raise ConfigError(f"rope_scaling factor must be > 0, got {self.factor}")
        if self.rope_type == "longrope":
            if not self.short_factor or len(self.short_factor) != len(self.long_factor):
                raise ConfigError(
                    f"longrope rope_scaling needs short_factor and long_factor of one length, got "
                    f"{len(self.short_factor)} and {len(self.long_factor)} values")
            if not self.attention_factor > 0:
                raise ConfigError(f"longrope attention_factor must be > 0, got "
                                  f"{self.attention_factor}")

    def uses_long(self, end: int) -> bool:
        """Whether the positions of a forward pass reaching position `end - 1` rotate with
        LongRoPE's long factors: as transformers decides per forward, by the highest position + 1
        against original_max_position_embeddings."""
        return self.rope_type == "longrope" and end > self.original_max_position_embeddings


def longrope_attention_factor(max_position_embeddings: int, original: int,
                              factor: float | None = None) -> float:
    """LongRoPE's default cos/sin factor: sqrt(1 + ln(s) / ln(original)) for the context
    extension s = factor, or max_position_embeddings / original (1.0 when s <= 1)."""
    s = max_position_embeddings / original if factor is None else factor
    return 1.0 if s <= 1.0 else math.sqrt(1 + math.log(s) / math.log(original))


def rope_scaling_from_hf(cfg: dict[str, Any], rs: dict[str, Any] | None,
                         source: str) -> RopeScaling | None:
    """The scaling of a `config.json` (`cfg`) whose rope_scaling / rope_parameters dict is `rs`."""
    if not rs:
        return None
    kind = rs.get("rope_type", rs.get("type"))
    if kind in (None, "default"):
        return None
    try:
        if kind == "llama3":
            return RopeScaling(
                "llama3",
                factor=float(rs["factor"]),
                low_freq_factor=float(rs["low_freq_factor"]),
                high_freq_factor=float(rs["high_freq_factor"]),
                original_max_position_embeddings=int(rs["original_max_position_embeddings"]),
            )
        if kind == "linear":
            return RopeScaling("linear", factor=float(rs["factor"]))
        if kind in ("longrope", "su"):
            # Phi-3 keeps original_max_position_embeddings at the top level, and transformers
            # prefers it there.
            original = int(cfg.get("original_max_position_embeddings")
                           or rs["original_max_position_embeddings"])
            attention = rs.get("attention_factor")
            if attention is None:
                attention = longrope_attention_factor(
                    int(cfg["max_position_embeddings"]), original, rs.get("factor"))
            return RopeScaling(
                "longrope",
                original_max_position_embeddings=original,
                short_factor=tuple(float(x) for x in rs["short_factor"]),
                long_factor=tuple(float(x) for x in rs["long_factor"]),
                attention_factor=float(attention),
            )
    except KeyError as e:
        raise ConfigError(f"{source}: rope_scaling of type {kind!r} is missing field {e}") from e
    raise ConfigError(f"{source}: rope_scaling type {kind!r} is not supported "
                      "(supported: llama3, linear, longrope / su)")


def rope_scaling_from_gguf(
    metadata: dict[str, Any], arch: str, source: str, freq_factors: tuple[float, ...] = (),
    long_short: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
) -> RopeScaling | None:
    """The scaling of a GGUF: `freq_factors` from a `rope_freqs` tensor (Llama 3.1),
    `long_short` from `rope_factors_long` / `rope_factors_short` (LongRoPE, as llama.cpp writes
    Phi-3: with `{arch}.rope.scaling.original_context_length` and `.attn_factor`), else the
    `{arch}.rope.scaling.type` keys."""
    if freq_factors:
        return RopeScaling("freq_factors", freq_factors=tuple(freq_factors))
    if long_short is not None:
        key = f"{arch}.rope.scaling.original_context_length"
        if metadata.get(key) is None:
            raise ConfigError(f"{source}: has rope_factors_long/short but no {key!r}")
        original = int(metadata[key])
        default = longrope_attention_factor(int(metadata[f"{arch}.context_length"]), original)
        stored = metadata.get(f"{arch}.rope.scaling.attn_factor")
        # The file holds a float32: one that rounds the default is the default.
        attention = (default if stored is None or math.isclose(stored, default, rel_tol=1e-6)
                     else float(stored))
        return RopeScaling("longrope", original_max_position_embeddings=original,
                           long_factor=tuple(long_short[0]), short_factor=tuple(long_short[1]),
                           attention_factor=attention)
    kind = metadata.get(f"{arch}.rope.scaling.type")
    if kind == "linear":
        return RopeScaling("linear", factor=float(metadata[f"{arch}.rope.scaling.factor"]))
    if kind not in (None, "none"):
        raise ConfigError(f"{source}: rope scaling type {kind!r} is not supported")
    return None


def rope_scaling_to_hf(rs: RopeScaling | None) -> dict[str, Any] | None:
    """The `rope_scaling` dict of a config.json for `rs` (None: none, or GGUF-only kinds)."""
    if rs is None or rs.rope_type == "freq_factors":
        return None
    if rs.rope_type == "longrope":
        return {"rope_type": "longrope", "short_factor": list(rs.short_factor),
                "long_factor": list(rs.long_factor), "attention_factor": rs.attention_factor,
                "original_max_position_embeddings": rs.original_max_position_embeddings}
    d: dict[str, Any] = {"rope_type": rs.rope_type, "factor": rs.factor}
    if rs.rope_type == "llama3":
        d.update(low_freq_factor=rs.low_freq_factor, high_freq_factor=rs.high_freq_factor,
                 original_max_position_embeddings=rs.original_max_position_embeddings)
    return d
