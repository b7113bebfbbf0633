"""Model and runtime configuration.

`ModelConfig` is the only description of a model that the backends see: it is built from a Hugging
Face `config.json` or from GGUF metadata, never passed around as a transformers object.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm.model.arch import (
    ARCHITECTURES,
    Architecture,
    architecture,
    for_gguf,
    for_hf,
    supported_gguf,
    supported_hf,
)
from llm.model.errors import ConfigError
from llm.model.rope_scaling import (
    RopeScaling,
    rope_scaling_from_gguf,
    rope_scaling_from_hf,
    rope_scaling_to_hf,
)

__all__ = ["ConfigError", "ModelConfig", "RopeScaling", "RuntimeConfig"]


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Llama-family decoder (Llama 2/3, Mistral, Qwen2, Qwen3, SmolLM,
    Granite 3.x, Phi-3). `arch` names its `llm.model.arch` description, which the readers below
    consult for its names and switches.

    qk_norm: per-head RMSNorm of q and k (weights `self_attn.q_norm` / `k_norm`, [head_dim]),
    applied before RoPE. partial_rotary_dim: RoPE rotates only these leading dims of each head
    (Phi-4-mini; None: all of them; `llm.model.rope.rotary_row_order`).
    Granite's multipliers (1.0 / None elsewhere): the embeddings are multiplied by
    embedding_multiplier, each sublayer's output by residual_multiplier before its residual add,
    the attention scores by attention_multiplier (None: 1/sqrt(head_dim)), and the logits are
    divided by logits_scaling.
    """

    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    attention_multiplier: float | None = None
    logits_scaling: float = 1.0
    sliding_window: int | None = None
    partial_rotary_dim: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads ({self.num_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if architecture(self.arch) is None:
            raise ConfigError(f"unknown architecture {self.arch!r} (known: "
                              f"{', '.join(sorted(a.name for a in ARCHITECTURES))})")
        d = self.partial_rotary_dim
        if d is not None and not (0 < d < self.head_dim and d % 2 == 0):
            raise ConfigError(f"partial_rotary_dim must be even and in (0, head_dim "
                              f"{self.head_dim}), got {d}")
        rs = self.rope_scaling
        longrope = rs is not None and rs.rope_type == "longrope"
        if longrope and len(rs.short_factor) * 2 != self.rotary_dim:
            raise ConfigError(f"longrope short/long factors have {len(rs.short_factor)} values, "
                              f"expected rotary dims / 2 = {self.rotary_dim // 2}")
        if not self.spec.multipliers and self.scaled:
            raise ConfigError(f"{self.arch} has no embedding / residual / attention / logits "
                              "multipliers (only granite)")
        if self.logits_scaling == 0:
            raise ConfigError("logits_scaling must not be 0")

    @property
    def spec(self) -> Architecture:
        """This model's architecture description (`llm.model.arch`)."""
        return architecture(self.arch)

    @property
    def scaled(self) -> bool:
        """Whether any of Granite's multipliers differs from the plain Llama computation."""
        return (self.embedding_multiplier != 1.0 or self.residual_multiplier != 1.0
                or self.attention_multiplier is not None or self.logits_scaling != 1.0)

    @property
    def rotary_dim(self) -> int:
        """The leading dims of each q/k head that RoPE rotates (all of head_dim, or
        partial_rotary_dim: Phi-4-mini's partial_rotary_factor; the others pass unrotated)."""
        return self.head_dim if self.partial_rotary_dim is None else self.partial_rotary_dim

    @property
    def attention_scale(self) -> float:
        """The factor of q.k in the attention scores: 1/sqrt(head_dim) or Granite's
        attention_multiplier; with LongRoPE rotating whole heads, times its attention_factor
        squared (transformers scales RoPE's cos and sin, so both q and k, by it; with partial
        rotation it scales the rotated dims only and stays in the cos/sin tables,
        `llm.model.rope.cos_sin`)."""
        scale = self.head_dim ** -0.5
        if self.attention_multiplier is not None:
            scale = self.attention_multiplier
        rs = self.rope_scaling
        if rs is not None and rs.rope_type == "longrope" and self.partial_rotary_dim is None:
            scale *= rs.attention_factor ** 2
        return scale

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA)."""
        return self.num_heads // self.num_kv_heads

    @property
    def max_context(self) -> int:
        """Longest sequence (prompt + generated) this engine runs the model at, exactly.

        A sliding window shorter than the trained context caps it: within the window, full causal
        attention equals sliding-window attention, so every token we produce is the model's own.
        """
        if self.sliding_window is not None:
            return min(self.max_position_embeddings, self.sliding_window)
        return self.max_position_embeddings

    # ---------------------------------------------------------------- Hugging Face config.json
    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Build from the dict of a Hugging Face `config.json`; `source` names it in errors."""
        model_type = cfg.get("model_type")
        spec = for_hf(model_type, cfg.get("architectures"))
        if model_type is None and spec is None:
            raise ConfigError(f"{source}: missing field 'model_type'")
        if spec is None:
            raise ConfigError(
                f"{source}: unknown architecture model_type={model_type!r} "
                f"(supported: {', '.join(supported_hf())})"
            )
        arch = spec.name

        def need(key: str) -> Any:
            if cfg.get(key) is None:
                raise ConfigError(f"{source}: missing field {key!r} (model_type={arch!r})")
            return cfg[key]

        num_heads = int(need("num_attention_heads"))
        hidden = int(need("hidden_size"))
        head_dim = cfg.get("head_dim") or hidden // num_heads
        if cfg.get("hidden_act", "silu") not in ("silu", "swish"):
            raise ConfigError(
                f"{source}: hidden_act={cfg['hidden_act']!r} is not supported (only silu)")
        sliding = None
        if spec.sliding_window == "always" or (spec.sliding_window == "flag"
                                               and cfg.get("use_sliding_window")):
            sliding = cfg.get("sliding_window")
        attention_bias = bool(cfg.get("attention_bias", False))
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        # transformers >= 5 writes theta and scaling under "rope_parameters", older ones at top
        # level.
        rope = cfg.get("rope_parameters") or {}
        partial = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor"))
        rotary = None  # transformers rotates int(head_dim * partial_rotary_factor) dims
        if partial is not None and int(int(head_dim) * float(partial)) != int(head_dim):
            rotary = int(int(head_dim) * float(partial))
        return cls(
            arch=arch,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_layers=int(need("num_hidden_layers")),
            num_heads=num_heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            max_position_embeddings=int(need("max_position_embeddings")),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
            rope_scaling=rope_scaling_from_hf(cfg, rope or cfg.get("rope_scaling"), source),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=spec.qkv_bias or attention_bias,
            o_bias=attention_bias and spec.attention_bias_on_o,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            qk_norm=spec.qk_norm,
            **_multipliers(spec, cfg, ("embedding_multiplier", "residual_multiplier",
                                       "attention_multiplier", "logits_scaling")),
            sliding_window=int(sliding) if sliding else None,
            partial_rotary_dim=rotary,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> ModelConfig:
        """Read `<path>/config.json`."""
        file = Path(path) / "config.json"
        if not file.is_file():
            raise ConfigError(f"{path}: no config.json (expected a Hugging Face model directory)")
        try:
            cfg = json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{file}: not valid JSON: {e}") from e
        return cls.from_hf_dict(cfg, source=str(file))

    # ---------------------------------------------------------------- GGUF metadata
    @classmethod
    def from_gguf(
        cls,
        metadata: dict[str, Any],
        tensor_names: set[str],
        source: str = "gguf",
        rope_freq_factors: tuple[float, ...] = (),
        rope_long_short: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
    ) -> ModelConfig:
        """Build from GGUF key/value metadata (already decoded to Python values) and the tensor
        names.

        Tied embeddings are recognised by the absence of `output.weight`; Qwen2 bias by
        `blk.0.attn_q.bias`. `rope_freq_factors` are the values of a `rope_freqs.weight` tensor when
        the file has one; `rope_long_short` those of `rope_factors_long` and `rope_factors_short`
        (LongRoPE).
        """
        arch = metadata.get("general.architecture")
        if arch is None:
            raise ConfigError(f"{source}: missing metadata key 'general.architecture'")
        spec = for_gguf(arch)
        if spec is None:
            raise ConfigError(
                f"{source}: unknown architecture general.architecture={arch!r} "
                f"(supported: {', '.join(supported_gguf())})"
            )

        def need(key: str) -> Any:
            full = f"{arch}.{key}"
            if metadata.get(full) is None:
                raise ConfigError(f"{source}: missing metadata key {full!r}")
            return metadata[full]

        num_heads = int(need("attention.head_count"))
        hidden = int(need("embedding_length"))
        head_dim = int(metadata.get(f"{arch}.attention.key_length") or hidden // num_heads)
        vocab = metadata.get(f"{arch}.vocab_size")
        if vocab is None:
            tokens = metadata.get("tokenizer.ggml.tokens")
            if tokens is None:
                raise ConfigError(f"{source}: missing metadata key {arch + '.vocab_size'!r}")
            vocab = len(tokens)
        rotated = metadata.get(f"{arch}.rope.dimension_count")
        rotated = None if rotated is None or int(rotated) == head_dim else int(rotated)
        if rotated is not None and spec.gguf_permuted_qk:
            raise ConfigError(
                f"{source}: {arch}.rope.dimension_count={rotated} of head_dim {head_dim}: partial "
                f"rotation of Q/K rows llama.cpp permuted ({arch}) is not supported")
        scaling = rope_scaling_from_gguf(metadata, arch, source, rope_freq_factors,
                                         rope_long_short)
        eos_ids = tuple(dict.fromkeys(
            int(metadata[k]) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")
            if metadata.get(k) is not None))
        sliding = metadata.get(f"{arch}.attention.sliding_window")
        return cls(
            arch=spec.name,
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(need("feed_forward_length")),
            num_layers=int(need("block_count")),
            num_heads=num_heads,
            num_kv_heads=int(metadata.get(f"{arch}.attention.head_count_kv") or num_heads),
            head_dim=head_dim,
            max_position_embeddings=int(need("context_length")),
            rms_norm_eps=float(need("attention.layer_norm_rms_epsilon")),
            rope_theta=float(metadata.get(f"{arch}.rope.freq_base", 10000.0)),
            rope_scaling=scaling,
            tie_word_embeddings="output.weight" not in tensor_names,
            qkv_bias="blk.0.attn_q.bias" in tensor_names,
            o_bias="blk.0.attn_output.bias" in tensor_names,
            mlp_bias="blk.0.ffn_up.bias" in tensor_names,
            qk_norm=spec.qk_norm,
            **_multipliers(spec, metadata, (f"{arch}.embedding_scale", f"{arch}.residual_scale",
                                            f"{arch}.attention.scale", f"{arch}.logit_scale")),
            sliding_window=int(sliding) if sliding else None,
            partial_rotary_dim=rotated,
            bos_token_id=metadata.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=eos_ids,
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """A dict of the transformers config class of this architecture (`LlamaConfig`,
        `Qwen3Config`, `Phi3Config`, ...; used by tests and caches); ConfigError if that class
        cannot express this config."""
        spec = self.spec
        d: dict[str, Any] = {
            "model_type": spec.hf_model_type_out,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "pad_token_id": None,  # not the class default (Phi3Config's 32000 may be no token)
        }
        if self.qk_norm != spec.qk_norm:
            raise ConfigError(f"a {self.arch} config.json cannot express qk_norm={self.qk_norm}")
        if spec.hf_writes_attention_bias:
            if self.qkv_bias != self.o_bias:
                raise ConfigError(f"a {self.arch} config.json cannot express q/k/v bias without "
                                  "o_proj bias")
            d["attention_bias"] = self.qkv_bias
        elif (self.qkv_bias, self.o_bias) != (spec.qkv_bias, False):
            raise ConfigError(f"a {self.arch} config.json cannot express qkv_bias={self.qkv_bias}"
                              f", o_bias={self.o_bias}")
        if spec.hf_writes_mlp_bias:
            d["mlp_bias"] = self.mlp_bias
        elif self.mlp_bias:
            raise ConfigError(f"a {self.arch} config.json cannot express mlp_bias=True")
        if spec.multipliers:
            d.update(embedding_multiplier=self.embedding_multiplier,
                     residual_multiplier=self.residual_multiplier,
                     attention_multiplier=(self.head_dim ** -0.5
                                           if self.attention_multiplier is None
                                           else self.attention_multiplier),
                     logits_scaling=self.logits_scaling)
        if self.sliding_window is not None:
            d["sliding_window"] = self.sliding_window
            if spec.sliding_window == "flag":
                d["use_sliding_window"] = True
        if self.partial_rotary_dim is not None:
            d["partial_rotary_factor"] = self.partial_rotary_dim / self.head_dim
        rope_scaling = rope_scaling_to_hf(self.rope_scaling)
        if rope_scaling is not None:
            d["rope_scaling"] = rope_scaling
            if self.rope_scaling.rope_type == "longrope":  # Phi3Config reads it at the top level
                d["original_max_position_embeddings"] = (
                    self.rope_scaling.original_max_position_embeddings)
        if self.bos_token_id is not None:
            d["bos_token_id"] = self.bos_token_id
        if self.eos_token_ids:
            d["eos_token_id"] = list(self.eos_token_ids)
        return d


def _multipliers(spec: Architecture, values: dict[str, Any], keys: tuple[str, str, str, str],
                 ) -> dict[str, float | None]:
    """Granite's multipliers read from `values` under `keys` (embedding, residual, attention,
    logits, in the source's names); {} for an architecture without them. An absent value is the
    plain computation's; an absent or zero attention scale is 1/sqrt(head_dim) (llama.cpp's
    convention)."""
    if not spec.multipliers:
        return {}
    emb, res, att, logit = (values.get(k) for k in keys)
    return {
        "embedding_multiplier": 1.0 if emb is None else float(emb),
        "residual_multiplier": 1.0 if res is None else float(res),
        "attention_multiplier": float(att) if att else None,
        "logits_scaling": 1.0 if logit is None else float(logit),
    }


@dataclass(frozen=True)
class RuntimeConfig:
    """How a backend runs a model: device, dtype and the KV-cache geometry.

    max_batch: decode slots. max_seq_len: longest sequence per user. block_size: tokens per KV page.
    num_blocks: pages in the pool (default: enough for every slot at max_seq_len).
    """

    device: str = "cpu"
    dtype: str = "float32"
    max_batch: int = 8
    max_seq_len: int = 2048
    block_size: int = 32
    num_blocks: int | None = None

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        for name in ("max_batch", "max_seq_len", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.num_blocks is not None and self.num_blocks <= 0:
            raise ConfigError(f"num_blocks must be positive, got {self.num_blocks}")

    @property
    def blocks_per_seq(self) -> int:
        return math.ceil(self.max_seq_len / self.block_size)

    @property
    def total_blocks(self) -> int:
        """Pages in the pool, including page 0 (reserved as the page-table padding page)."""
        if self.num_blocks is not None:
            return self.num_blocks
        return self.max_batch * self.blocks_per_seq + 1
