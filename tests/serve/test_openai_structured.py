"""Structured output over HTTP with the official openai client: response_format json_schema and
json_object on chat, vLLM's guided_json / guided_regex / guided_choice / guided_grammar and their
successor structured_outputs on completions and chat, streamed and whole; a 400 naming the field
for every malformed value (the field named even when the grammar fails to compile), and nothing
left held after."""

from __future__ import annotations

import json
import re

import httpx
import openai
import pytest
from conftest import MODEL_NAME

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

CHAT = [{"role": "user", "content": "Tell me about a person, in JSON."}]
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 12},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]},
                                  "minItems": 1, "maxItems": 2}}}


def _layout(text: str) -> str:
    """The JSON text outside its string literals: where its whitespace is."""
    return re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)


def _valid(text: str) -> bool:
    return jsonschema.validate(json.loads(text), PERSON) is None


def test_chat_response_format_json_schema_and_json_object(client, live_server) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON,
                                                  "strict": True}}
    r = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=64,
                                       temperature=0, response_format=fmt)
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)
    chunks = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=64,
                                            temperature=0.8, seed=4, response_format=fmt,
                                            stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema.validate(json.loads(text), PERSON)
    r = client.chat.completions.create(
        model=MODEL_NAME, max_tokens=64, temperature=0, response_format={"type": "json_object"},
        messages=[{"role": "user", "content": "Reply with a JSON object with one key."}])
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    assert live_server.wait_all_free()


def test_strict_output_lists_properties_in_the_schemas_order(client, live_server) -> None:
    """OpenAI's strict outputs (and vLLM's) give an object's keys in the schema's order, not
    sorted."""
    schema = {"type": "object", "additionalProperties": False, "required": ["zeta", "alpha"],
              "properties": {"zeta": {"type": "integer"}, "alpha": {"type": "integer"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "za", "schema": schema, "strict": True}}
    r = client.chat.completions.create(model=MODEL_NAME, max_tokens=24, temperature=0,
                                       response_format=fmt, messages=[
                                           {"role": "user", "content": "JSON, zeta then alpha"}])
    assert list(json.loads(r.choices[0].message.content)) == ["zeta", "alpha"]


@pytest.mark.parametrize("extra, ok", [
    ({"guided_json": PERSON}, lambda t: jsonschema.validate(json.loads(t), PERSON) is None),
    ({"guided_json": json.dumps(PERSON)},
     lambda t: jsonschema.validate(json.loads(t), PERSON) is None),
    ({"guided_regex": r"[A-Z][a-z]{2,8} [0-9]{2}"},
     lambda t: re.fullmatch(r"[A-Z][a-z]{2,8} [0-9]{2}", t)),
    ({"guided_choice": ["positive", "negative"]}, lambda t: t in ("positive", "negative")),
    ({"guided_grammar": 'root ::= "x = " [0-9] [0-9]? ";"'},
     lambda t: re.fullmatch(r"x = [0-9]{1,2};", t)),
    ({"guided_grammar": 'start: "x = " /[0-9]{1,2}/ ";"'},
     lambda t: re.fullmatch(r"x = [0-9]{1,2};", t)),
    ({"structured_outputs": {"json": PERSON, "disable_fallback": True}},
     lambda t: jsonschema.validate(json.loads(t), PERSON) is None),
    ({"structured_outputs": {"regex": r"[A-Z][a-z]{2,8} [0-9]{2}", "json_object": False}},
     lambda t: re.fullmatch(r"[A-Z][a-z]{2,8} [0-9]{2}", t)),
    ({"structured_outputs": {"choice": ["positive", "negative"], "whitespace_pattern": None}},
     lambda t: t in ("positive", "negative")),
    ({"structured_outputs": {"grammar": 'root ::= "x = " [0-9] [0-9]? ";"',
                             "disable_any_whitespace": False}},
     lambda t: re.fullmatch(r"x = [0-9]{1,2};", t)),
    # the layout: by default ", " and ": " (json.dumps'), compact, or a whitespace pattern
    ({"guided_json": PERSON}, lambda t: _valid(t) and ", " in _layout(t) and '": ' in t),
    ({"structured_outputs": {"json": PERSON, "disable_any_whitespace": True}},
     lambda t: _valid(t) and not re.search(r"\s", _layout(t))),
    ({"structured_outputs": {"json": PERSON, "whitespace_pattern": "[\t]?"}},
     lambda t: _valid(t) and not re.search(r"[^\S\t]", _layout(t))),
    ({"guided_json": PERSON, "guided_whitespace_pattern": "[\t]?"},
     lambda t: _valid(t) and not re.search(r"[^\S\t]", _layout(t))),
])
def test_guided_extensions_on_completions_and_chat(client, live_server, extra, ok) -> None:
    r = client.completions.create(model=MODEL_NAME, prompt="Here is the answer:", max_tokens=64,
                                  temperature=0, extra_body=extra)
    assert r.choices[0].finish_reason == "stop" and ok(r.choices[0].text), r.choices[0].text
    r = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=64,
                                       temperature=0.7, seed=2, extra_body=extra)
    assert ok(r.choices[0].message.content), r.choices[0].message.content
    assert live_server.wait_all_free()


BAD = [
    ("response_format", {"type": "xml"}),
    ("response_format", "json_object"),
    ("response_format", {"type": "json_schema"}),
    ("response_format", {"type": "json_schema", "json_schema": {"name": "x"}}),
    ("response_format", {"type": "json_schema", "json_schema": {"schema": PERSON}}),
    ("response_format", {"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}),
    ("response_format", {"type": "json_schema",
                         "json_schema": {"name": "x", "schema": PERSON, "strict": "yes"}}),
    ("response_format", {"type": "json_schema",
                         "json_schema": {"name": "x", "schema": {"type": "nope"}}}),
    ("guided_json", {"type": "object", "properties": {"a": {"type": "strin"}}}),
    ("guided_json", "{not json"),
    ("guided_json", 5),
    ("guided_regex", "a(b"),
    ("guided_regex", ""),
    ("guided_regex", ["a"]),
    ("guided_choice", []),
    ("guided_choice", "yes"),
    ("guided_choice", ["a", 1]),
    ("guided_grammar", "start: ("),
    ("guided_grammar", "root ::= undefined"),
    ("guided_grammar", 3),
    ("guided_whitespace_pattern", " "),
    ("structured_outputs", "regex"),
    ("structured_outputs", {}),
    ("structured_outputs", {"json_object": False}),
    ("structured_outputs", {"regex": "a", "choice": ["a"]}),
    ("structured_outputs", {"regex": "a(b"}),
    ("structured_outputs", {"json": 5}),
    ("structured_outputs", {"json": 0}),
    ("structured_outputs", {"json": {"type": "strin"}}),
    ("structured_outputs", {"json_object": "yes"}),
    ("structured_outputs", {"choice": []}),
    ("structured_outputs", {"grammar": "start: ("}),
    ("structured_outputs", {"regex": "a", "disable_any_whitespace": True}),
    ("structured_outputs", {"regex": "a", "disable_additional_properties": True}),
    ("structured_outputs", {"regex": "a", "whitespace_pattern": " "}),
    ("structured_outputs", {"regex": "a", "structural_tag": "{}"}),
    ("structured_outputs", {"regex": "a", "disable_fallback": "no"}),
    ("structured_outputs", {"regex": "a", "backend": "xgrammar"}),
    ("structured_outputs", {"json": PERSON, "disable_any_whitespace": True,
                            "whitespace_pattern": " "}),
    ("structured_outputs", {"json": PERSON, "whitespace_pattern": "("}),
    ("structured_outputs", {"json": PERSON, "whitespace_pattern": 3}),
    ("structured_outputs", {"json_object": True, "disable_additional_properties": True}),
    ("tools", [{"type": "function", "function": {"name": "f"}}]),
]


@pytest.mark.parametrize("path", ["/completions", "/chat/completions"])
def test_malformed_values_are_400s_naming_the_field(live_server, path) -> None:
    base = {"model": MODEL_NAME, "max_tokens": 4}
    base.update({"messages": CHAT} if path.startswith("/chat") else {"prompt": "Hi"})
    cases = [(field, {field: value}) for field, value in BAD] + [
        ("guided_choice", {"guided_regex": "a", "guided_choice": ["a"]}),  # one at a time
        ("guided_json", {"response_format": {"type": "json_object"}, "guided_json": PERSON}),
        ("guided_regex", {"structured_outputs": {"regex": "a"}, "guided_regex": "a"}),
        ("guided_whitespace_pattern", {"guided_regex": "a", "guided_whitespace_pattern": " "}),
        ("guided_whitespace_pattern", {"guided_json": PERSON, "guided_whitespace_pattern": "("}),
        ("guided_whitespace_pattern", {"guided_json": PERSON, "guided_whitespace_pattern": ""}),
        ("guided_whitespace_pattern", {"structured_outputs": {"json": PERSON,
                                                              "disable_any_whitespace": True},
                                       "guided_whitespace_pattern": " "}),
        ("structured_outputs", {"response_format": {"type": "json_object"},
                                "structured_outputs": {"regex": "a"}})]
    for field, value in cases:
        body = {**base, **value}
        for stream in (False, True):
            r = httpx.post(f"{live_server.url}/v1{path}", json={**body, "stream": stream},
                           timeout=60)
            assert r.status_code == 400, (field, value, r.text)
            err = r.json()["error"]
            assert err["param"] == field and field in err["message"], (field, value, err)
    assert live_server.wait_all_free()


def test_disable_additional_properties_closes_every_object_schema() -> None:
    """vLLM's disable_additional_properties: each object schema that does not say whether it
    allows other properties allows none (nested ones too); ones that say so keep their word."""
    from llm.serve.structured_output import structured_output

    schema = {"type": "object", "properties": {
        "a": {"type": "object", "properties": {"b": {"type": "integer"}}},
        "c": {"type": "array", "items": {"properties": {"d": {"type": "string"}}}},
        "e": {"type": "object", "additionalProperties": True},
        "f": {"type": "object"}, "g": {"patternProperties": {"^x": {"type": "integer"}}}}}
    closed = json.loads(structured_output({"structured_outputs": {
        "json": schema, "disable_additional_properties": True}}).spec)
    assert closed["additionalProperties"] is False
    assert closed["properties"]["a"]["additionalProperties"] is False
    assert closed["properties"]["c"]["items"]["additionalProperties"] is False
    assert closed["properties"]["e"]["additionalProperties"] is True
    assert closed["properties"]["f"] == {"type": "object"}  # any object, as in vLLM
    assert closed["properties"]["g"]["additionalProperties"] is False
    as_text = structured_output({"structured_outputs": {
        "json": json.dumps(schema), "disable_additional_properties": True}})
    assert json.loads(as_text.spec) == closed
    assert "additionalProperties" not in json.loads(
        structured_output({"structured_outputs": {"json": schema}}).spec)


def test_client_gets_bad_request_naming_the_field(client, live_server) -> None:
    with pytest.raises(openai.BadRequestError, match="guided_regex") as e:
        client.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=2,
                                  extra_body={"guided_regex": "(unclosed"})
    assert e.value.body["param"] == "guided_regex"
    r = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=2,
                                       response_format={"type": "text"})
    assert r.choices[0].message.content is not None
    assert live_server.wait_all_free()
