"""Structured-output fields of a request body -> a StructuredOutput (or a 400 naming the field).

OpenAI's `response_format`: {"type": "text"} (no constraint), {"type": "json_object"} (any JSON
object), {"type": "json_schema", "json_schema": {"name", "schema", "strict", "description"}} (a
value valid against `schema`; enforced whether `strict` is true or not). vLLM's extensions:
`guided_json` (a schema, as an object or JSON text), `guided_regex` (Rust regex syntax, matched
by the whole output), `guided_choice` (a list of strings), `guided_grammar` (a Lark grammar in
llguidance's dialect, or llama.cpp's GBNF), and `structured_outputs`, the object that replaced
them in vLLM 0.12: exactly one of `json`, `regex`, `choice`, `grammar` or `json_object` (true),
the same constraints; with a JSON one, `disable_any_whitespace` (no whitespace at all),
`whitespace_pattern` (free whitespace matching a regex) and `disable_additional_properties` (an
object schema without `additionalProperties` allows no others); `disable_fallback` is accepted
(there is one grammar engine, nothing to fall back to); `structural_tag` is refused. At most one
of these constraints per request. `guided_whitespace_pattern` (vLLM before 0.12) sets the
whitespace of a JSON constraint given by `guided_json` or `response_format`.
By default JSON is laid out as json.dumps does (", " and ": ", nothing else).
"""

from __future__ import annotations

import json
import re
from typing import Any

from llm.engine.contract.structured import StructuredOutput
from llm.serve.errors import ApiError, short_repr

GUIDED = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")
# structured_outputs' constraint keys (one per request), and its other keys with the values that
# leave the output as the constraint alone gives it
_KINDS = ("json", "regex", "choice", "grammar", "json_object")
_OPTIONS = ("disable_fallback", "disable_any_whitespace", "disable_additional_properties",
            "whitespace_pattern", "structural_tag")
_JSON = ("json_schema", "json_object")
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
    out = None
    if given:
        name = given[0]
        if name == "response_format":
            out = _response_format(body[name])
        elif name == "structured_outputs":
            out = _structured_outputs(body[name])
        else:
            out = _constraint(name.removeprefix("guided_"), body[name], name, name)
    pattern = body.get("guided_whitespace_pattern")
    if pattern is None:
        return out
    name = "guided_whitespace_pattern"
    if not isinstance(pattern, str) or not pattern:
        raise ApiError(400, f"'{name}' must be a non-empty regular expression, got "
                            f"{short_repr(pattern)}", name)
    if out is None or out.kind not in _JSON or out.whitespace:
        raise ApiError(400, f"'{name}' applies to a JSON constraint ('guided_json', "
                            "'response_format' json_schema / json_object, or structured_outputs' "
                            "json / json_object) without a whitespace option of its own", name)
    return StructuredOutput(out.kind, out.spec, whitespace="pattern:" + pattern, param=name)


def _constraint(kind: str, value: Any, field: str, param: str,
                whitespace: str = "") -> StructuredOutput:
    """One constraint of `kind` (json, regex, choice, grammar) given as `field` of the body."""
    if kind == "json":
        if not isinstance(value, (dict, str)):
            raise ApiError(400, f"'{field}' must be a JSON schema (an object or its JSON "
                                f"text), got {short_repr(value)}", param)
        return StructuredOutput.json_schema(value, param=param, whitespace=whitespace)
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
        if key.startswith("disable_") and value is not None and not isinstance(value, bool):
            raise ApiError(400, f"'structured_outputs.{key}' must be true or false, got "
                                f"{short_repr(value)}", param)
    if spec.get("structural_tag") is not None:
        raise ApiError(400, "'structured_outputs.structural_tag' is not supported by this server",
                       param)
    kinds = [k for k in _KINDS if spec.get(k) is not None and spec.get(k) is not False]
    if len(kinds) != 1:
        raise ApiError(400, "'structured_outputs' takes exactly one of "
                            f"{', '.join(_KINDS)}, got {kinds or 'none'}", param)
    kind = kinds[0]
    whitespace = _whitespace(spec, kind)
    if spec.get("disable_additional_properties") and kind != "json":
        raise ApiError(400, "'structured_outputs.disable_additional_properties' applies to a "
                            f"'json' schema, not to '{kind}'", param)
    if kind == "json_object":
        if spec[kind] is not True:
            raise ApiError(400, "'structured_outputs.json_object' must be true or false, got "
                                f"{short_repr(spec[kind])}", param)
        return StructuredOutput("json_object", whitespace=whitespace, param=param)
    value = spec[kind]
    if kind == "json" and spec.get("disable_additional_properties"):
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                pass  # not JSON: the schema's own check names it
        value = _closed_objects(value)
    return _constraint(kind, value, f"structured_outputs.{kind}", param, whitespace)


def _whitespace(spec: dict[str, Any], kind: str) -> str:
    """StructuredOutput.whitespace of a structured_outputs object whose constraint is `kind`."""
    param = "structured_outputs"
    compact, pattern = spec.get("disable_any_whitespace"), spec.get("whitespace_pattern")
    if not compact and pattern is None:
        return ""
    if kind not in ("json", "json_object"):
        given = "disable_any_whitespace" if compact else "whitespace_pattern"
        raise ApiError(400, f"'structured_outputs.{given}' applies to 'json' or 'json_object', "
                            f"not to '{kind}'", param)
    if compact and pattern is not None:
        raise ApiError(400, "'structured_outputs.disable_any_whitespace' cannot be combined with "
                            "'structured_outputs.whitespace_pattern'", param)
    if compact:
        return "compact"
    if not isinstance(pattern, str) or not pattern:
        raise ApiError(400, "'structured_outputs.whitespace_pattern' must be a non-empty regular"
                            f" expression, got {short_repr(pattern)}", param)
    return "pattern:" + pattern


def _closed_objects(node: Any) -> Any:
    """A copy of the schema `node` where every schema with properties (or patternProperties)
    that does not say whether it allows others allows none, as vLLM's
    disable_additional_properties does (a bare {"type": "object"} stays any object)."""
    if isinstance(node, list):
        return [_closed_objects(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _closed_objects(v) for k, v in node.items()}
    if ("properties" in out or "patternProperties" in out) and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


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
