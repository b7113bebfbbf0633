"""Structured output: what a request's output must match, and the token masks that enforce it.

`StructuredOutput` is the request's side (a SamplingParams field): a JSON schema, any JSON object,
a regular expression, one of several strings, or a context-free grammar. It is compiled by
llguidance (imported on first use; an optional dependency) and validated when constructed.
`TokenMasks` is the engine's side of one step: the allowed-token bitmasks of the constrained rows,
computed on a worker thread while the backend runs the model, joined before selection.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from llm.engine.contract.errors import SamplingParamsError

KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")
# JSON is written as json.dumps writes it: ", " and ": " and no other whitespace (free whitespace
# lets a small model fill max_tokens with newlines); a schema's "x-guidance" may override it.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# StructuredOutput.whitespace "compact": no whitespace at all (json.dumps with separators "," ":")
COMPACT_LAYOUT = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}


def llguidance_module(param: str) -> Any:
    """The llguidance package, or SamplingParamsError naming `param` if it is not installed."""
    try:
        import llguidance
    except ImportError:
        raise SamplingParamsError(f"{param}: structured output needs the llguidance package "
                                  "(pip install llguidance)", param=param) from None
    return llguidance


@dataclass(frozen=True)
class StructuredOutput:
    """What the whole generated text must match (enforced token by token, see llm.engine.grammar).

    kind "json_schema": `spec` is a JSON schema (as canonical JSON text; build it with
    `json_schema(dict)`), the output is one JSON value valid against it, laid out as JSON_LAYOUT
    says. "json_object": any JSON object. "regex": `spec` is a regular expression (Rust regex
    syntax) the whole output matches.
    "choice": the output is exactly one of `choices`. "grammar": `spec` is a context-free grammar
    in llguidance's Lark dialect, or llama.cpp's GBNF (EBNF) which llguidance converts to Lark.
    whitespace (JSON kinds only): "" for JSON_LAYOUT, "compact" for no whitespace at all
    (COMPACT_LAYOUT), or "pattern:<regex>" for free whitespace matching <regex> around the
    separators and brackets (vLLM's whitespace_pattern).
    param: the request field it came from, named in errors (not part of equality).
    Raises SamplingParamsError naming `param` when the spec does not compile.
    """

    kind: str
    spec: str = ""
    choices: tuple[str, ...] = ()
    whitespace: str = ""
    param: str = field(default="structured", compare=False)

    def __post_init__(self) -> None:
        p = self.param
        if self.kind not in KINDS:
            raise SamplingParamsError(f"{p}: kind must be one of {', '.join(KINDS)}, got "
                                      f"{self.kind!r}", param=p)
        if not isinstance(self.spec, str):
            raise SamplingParamsError(f"{p}: spec must be a string, got {self.spec!r:.60}",
                                      param=p)
        object.__setattr__(self, "choices", tuple(self.choices))
        if self.kind == "choice":
            if not self.choices or not all(isinstance(c, str) and c for c in self.choices):
                raise SamplingParamsError(f"{p}: choices must be a non-empty list of non-empty "
                                          f"strings, got {list(self.choices)!r:.60}", param=p)
        elif self.kind != "json_object" and not self.spec:
            raise SamplingParamsError(f"{p}: the {self.kind} is empty", param=p)
        if self.whitespace and (self.kind not in ("json_schema", "json_object") or not (
                self.whitespace == "compact" or self.whitespace.startswith("pattern:"))):
            raise SamplingParamsError(f"{p}: whitespace must be '', 'compact' or 'pattern:<regex>'"
                                      f" and only for JSON, got {self.whitespace!r:.60} for "
                                      f"{self.kind}", param=p)
        llg = llguidance_module(p)
        try:
            error = llg.LLMatcher.validate_grammar(self.llguidance_grammar())
        except ValueError as e:  # e.g. a GBNF grammar that cannot be converted
            error = str(e)
        if error:
            raise SamplingParamsError(f"{p}: invalid {self.kind.replace('_', ' ')}: "
                                      f"{error.strip()}", param=p)

    @classmethod
    def json_schema(cls, schema: Mapping[str, Any] | str, param: str = "structured",
                    whitespace: str = "") -> StructuredOutput:
        """From a schema object (or its JSON text), kept in its own key order (the order in which
        the output lists each object's properties); two schemas that differ only in layout are
        equal."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as e:
                raise SamplingParamsError(f"{param}: the schema is not valid JSON ({e})",
                                          param=param) from None
        if not isinstance(schema, (Mapping, bool)):
            raise SamplingParamsError(f"{param}: a JSON schema must be an object, got "
                                      f"{schema!r:.60}", param=param)
        # the schema's own key order: a strict output lists an object's properties in it
        return cls("json_schema", json.dumps(schema, separators=(",", ":")), whitespace=whitespace,
                   param=param)

    def llguidance_grammar(self) -> str:
        """The grammar as llguidance's matcher takes it."""
        from llguidance import LLMatcher, grammar_from

        if self.kind in ("json_schema", "json_object"):
            schema = self.spec if self.kind == "json_schema" else {"type": "object"}
            layout = JSON_LAYOUT
            if self.whitespace == "compact":
                layout = COMPACT_LAYOUT
            elif self.whitespace:
                layout = {"whitespace_flexible": True,
                          "whitespace_pattern": self.whitespace.removeprefix("pattern:")}
            return LLMatcher.grammar_from_json_schema(schema, defaults=layout)
        if self.kind == "regex":
            return LLMatcher.grammar_from_regex(self.spec)
        if self.kind == "choice":  # one lexeme: no parser row per choice (llguidance caps those)
            return grammar_from("regex", "(" + "|".join(map(_literal, self.choices)) + ")")
        return grammar_from("grammar", self.spec)


def _literal(text: str) -> str:
    """`text` as a regular expression (Rust syntax) matching exactly it: every ASCII character
    but letters and digits as a hex escape."""
    return "".join(c if c.isalnum() or ord(c) > 127 else f"\\x{{{ord(c):x}}}" for c in text)


@dataclass(frozen=True)
class TokenMasks:
    """The allowed tokens of the constrained rows of one prefill or decode step.

    rows: indices into the step's batch of the constrained users (the others are unconstrained).
    future: resolves to an int32 array [len(rows), ceil(V / 32)]; bit j of word w of a row is 1
    when token 32 * w + j is allowed. A backend calls `result()` after its forward, before it
    selects tokens or computes logprobs, and applies the masks to the logits (-inf elsewhere).
    """

    rows: tuple[int, ...]
    future: Future

    def result(self) -> np.ndarray:
        """The bitmasks [len(rows), words] (waits for the worker computing them)."""
        return self.future.result()

    def result_for(self, vocab: int) -> np.ndarray:
        """`result()`, refused with ValueError where its words cover fewer than `vocab` tokens
        (the logits the masks are applied to)."""
        bits = self.result()
        if bits.shape[1] * 32 < vocab:
            raise ValueError(f"token masks cover {bits.shape[1] * 32} tokens, the logits {vocab}")
        return bits
