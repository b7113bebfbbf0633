"""Structured-output fields of a request body -> a StructuredOutput (or a 400 naming the field).

OpenAI's `response_format`: {"type": "text"} (no constraint), {"type": "json_object"} (any JSON
object), {"type": "json_schema", "json_schema": {"name", "schema", "strict", "description"}} (a
value valid against `schema`; enforced whether `strict` is true or not). vLLM's extensions:
`guided_json` (a schema, as an object or JSON text), `guided_regex` (Rust regex syntax, matched
by the whole output), `guided_choice` (a list of strings), `guided_grammar` (a Lark grammar in
llguidance's dialect, or llama.cpp's GBNF), and `structured_outputs`, the object that replaced
them in vLLM 0.12: exactly one of `json`, `regex`, `choice`, `grammar` or `json_object` (true),
the same constraints; `disable_fallback` is accepted (there is one grammar engine, nothing to fall
back to); `disable_any_whitespace`, `disable_additional_properties` (true), `whitespace_pattern`
and `structural_tag` are refused. At most one of these fields per request.
"""

from __future__ import annotations

import re
from typing import Any

from llm.engine.contract.structured import StructuredOutput
from llm.serve.errors import ApiError, short_repr

GUIDED = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")
# structured_outputs' constraint keys (one per request), and its other keys with the values that
# leave the output as the constraint alone gives it
_KINDS = ("json", "regex", "choice", "grammar", "json_object")
_OPTIONS = {"disable_fallback": (False, True), "disable_any_whitespace": (False,),
            "disable_additional_properties": (False,), "whitespace_pattern": (None,),
            "structural_tag": (None,)}
_SCHEMA_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def structured_output(body: dict[str, Any]) -> StructuredOutput | None:
    """The request's structured output, None without one; SamplingParamsError (naming the field)
    when its grammar does not compile, ApiError when the field is malformed."""
    given = [name for name in ("response_format", "structured_outputs", *GUIDED)
             if body.get(name) is not None]
    fmt = body.get("response_format")
    if fmt is not None and _response_type(fmt) == "text":
        given.remove("response_format")
    if len(given) > 1:
        raise ApiError(400, f"'{given[1]}' cannot be combined with '{given[0]}' (one structured "
                            "output constraint per request)", given[1])
    if not given:
        return None
    name = given[0]
    value = body[name]
    if name == "response_format":
        return _response_format(value)
    if name == "structured_outputs":
        return _structured_outputs(value)
    return _constraint(name.removeprefix("guided_"), value, name, name)


def _constraint(kind: str, value: Any, field: str, param: str) -> StructuredOutput:
    """One constraint of `kind` (json, regex, choice, grammar) given as `field` of the body."""
    if kind == "json":
        if not isinstance(value, (dict, str)):
            raise ApiError(400, f"'{field}' must be a JSON schema (an object or its JSON "
                                f"text), got {short_repr(value)}", param)
        return StructuredOutput.json_schema(value, param=param)
    if kind == "choice":
        if not isinstance(value, list) or not value or not all(
                isinstance(c, str) and c for c in value):
            raise ApiError(400, f"'{field}' must be a non-empty list of non-empty strings, "
                                f"got {short_repr(value)}", param)
        return StructuredOutput("choice", choices=tuple(value), param=param)
    if not isinstance(value, str) or not value:
        raise ApiError(400, f"'{field}' must be a non-empty string, got {short_repr(value)}",
                       param)
    return StructuredOutput(kind, value, param=param)


def _structured_outputs(spec: Any) -> StructuredOutput:
    """vLLM's `structured_outputs` object -> its one constraint (see the module docstring)."""
    param = "structured_outputs"
    if not isinstance(spec, dict):
        raise ApiError(400, "'structured_outputs' must be an object with one of "
                            f"{', '.join(_KINDS)}, got {short_repr(spec)}", param)
    for key, value in spec.items():
        if key not in _KINDS and key not in _OPTIONS:
            raise ApiError(400, f"'structured_outputs.{key}' is not a field of structured_outputs"
                                f" (one of {', '.join((*_KINDS, *_OPTIONS))})", param)
        if key in _OPTIONS and not any(
                value is v or (v is not None and type(value) is type(v) and value == v)
                for v in _OPTIONS[key]):
            raise ApiError(400, f"'structured_outputs.{key}' is not supported by this server "
                                f"(got {short_repr(value)})", param)
    kinds = [k for k in _KINDS if spec.get(k) not in (None, False)]
    if len(kinds) != 1:
        raise ApiError(400, "'structured_outputs' takes exactly one of "
                            f"{', '.join(_KINDS)}, got {kinds or 'none'}", param)
    kind = kinds[0]
    if kind == "json_object":
        if spec[kind] is not True:
            raise ApiError(400, "'structured_outputs.json_object' must be true or false, got "
                                f"{short_repr(spec[kind])}", param)
        return StructuredOutput("json_object", param=param)
    return _constraint(kind, spec[kind], f"structured_outputs.{kind}", param)


def _response_type(fmt: Any) -> str:
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise ApiError(400, "'response_format' must be an object with 'type' one of 'text', "
                            f"'json_object', 'json_schema', got {short_repr(fmt)}",
                       "response_format")
    return fmt["type"]


def _response_format(fmt: dict[str, Any]) -> StructuredOutput:
    param = "response_format"
    if _response_type(fmt) == "json_object":
        return StructuredOutput("json_object", param=param)
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict):
        raise ApiError(400, "'response_format.json_schema' must be an object with 'name' and "
                            "'schema'", param)
    name = spec.get("name")
    if not isinstance(name, str) or not _SCHEMA_NAME.fullmatch(name):
        raise ApiError(400, "'response_format.json_schema.name' must be a string of 1-64 "
                            f"letters, digits, '_' or '-', got {short_repr(name)}", param)
    if spec.get("strict") is not None and not isinstance(spec["strict"], bool):
        raise ApiError(400, "'response_format.json_schema.strict' must be true or false", param)
    schema = spec.get("schema")
    if not isinstance(schema, dict):
        raise ApiError(400, "'response_format.json_schema.schema' must be a JSON schema object, "
                            f"got {short_repr(schema)}", param)
    return StructuredOutput.json_schema(schema, param=param)
