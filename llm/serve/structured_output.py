"""Structured-output fields of a request body -> a StructuredOutput (or a 400 naming the field).

OpenAI's `response_format`: {"type": "text"} (no constraint), {"type": "json_object"} (any JSON
object), {"type": "json_schema", "json_schema": {"name", "schema", "strict", "description"}} (a
value valid against `schema`; enforced whether `strict` is true or not). vLLM's extensions:
`guided_json` (a schema, as an object or JSON text), `guided_regex` (Rust regex syntax, matched
by the whole output), `guided_choice` (a list of strings), `guided_grammar` (a Lark grammar in
llguidance's dialect, or llama.cpp's GBNF). At most one of them per request.
"""

from __future__ import annotations

import re
from typing import Any

from llm.engine.contract.structured import StructuredOutput
from llm.serve.errors import ApiError, short_repr

GUIDED = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")
_SCHEMA_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def structured_output(body: dict[str, Any]) -> StructuredOutput | None:
    """The request's structured output, None without one; SamplingParamsError (naming the field)
    when its grammar does not compile, ApiError when the field is malformed."""
    given = [name for name in ("response_format", *GUIDED) if body.get(name) is not None]
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
    if name == "guided_json":
        if not isinstance(value, (dict, str)):
            raise ApiError(400, f"'guided_json' must be a JSON schema (an object or its JSON "
                                f"text), got {short_repr(value)}", name)
        return StructuredOutput.json_schema(value, param=name)
    if name == "guided_choice":
        if not isinstance(value, list) or not value or not all(
                isinstance(c, str) and c for c in value):
            raise ApiError(400, f"'guided_choice' must be a non-empty list of non-empty strings, "
                                f"got {short_repr(value)}", name)
        return StructuredOutput("choice", choices=tuple(value), param=name)
    if not isinstance(value, str) or not value:
        raise ApiError(400, f"'{name}' must be a non-empty string, got {short_repr(value)}", name)
    kind = "regex" if name == "guided_regex" else "grammar"
    return StructuredOutput(kind, value, param=name)


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
