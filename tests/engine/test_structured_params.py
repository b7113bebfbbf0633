"""StructuredOutput and SamplingParams.structured are validated at construction: every kind
compiles, a bad schema / regex / grammar / choice list is a SamplingParamsError naming the
parameter it came from, and structured output does not combine with ignore_eos or min_tokens
(the grammar decides where the output ends)."""

from __future__ import annotations

import pytest

from llm.engine.contract.sampling_params import SamplingParams, SamplingParamsError
from llm.engine.contract.structured import StructuredOutput

pytest.importorskip("llguidance")


def test_every_kind_compiles_and_schemas_keep_their_key_order() -> None:
    a = StructuredOutput.json_schema({"type": "object", "properties": {"x": {"type": "integer"}}})
    b = StructuredOutput.json_schema('{ "type": "object",\n "properties": {"x": {"type": '
                                     '"integer"}}}')
    assert a == b and hash(a) == hash(b)  # frozen, keyed by the compact JSON text
    ordered = StructuredOutput.json_schema({"properties": {"zeta": {}, "alpha": {}}})
    assert ordered.spec.index("zeta") < ordered.spec.index("alpha")  # not sorted
    for spec in (a, StructuredOutput("json_object"), StructuredOutput("regex", r"\d{3}-[a-z]+"),
                 StructuredOutput("choice", choices=["yes", "no"]),
                 StructuredOutput("grammar", 'start: "(" WORD ")"\nWORD: /[a-z]+/'),  # Lark
                 StructuredOutput("grammar", 'root ::= "(" [a-z]+ ")"')):  # GBNF
        assert SamplingParams(structured=spec).structured is spec
        assert spec.llguidance_grammar()


@pytest.mark.parametrize("make, match", [
    (lambda p: StructuredOutput.json_schema({"type": "nope"}, param=p), "nope"),
    (lambda p: StructuredOutput.json_schema("{not json", param=p), "not valid JSON"),
    (lambda p: StructuredOutput.json_schema([1, 2], param=p), "must be an object"),
    (lambda p: StructuredOutput.json_schema({"type": "string", "format": "x-unknown"}, param=p),
     "invalid json schema"),
    (lambda p: StructuredOutput("regex", "a(b", param=p), "unclosed group"),
    (lambda p: StructuredOutput("regex", "", param=p), "empty"),
    (lambda p: StructuredOutput("grammar", "start: (", param=p), "invalid grammar"),
    (lambda p: StructuredOutput("grammar", "root ::= undefined_rule", param=p), "invalid grammar"),
    (lambda p: StructuredOutput("choice", choices=[], param=p), "non-empty list"),
    (lambda p: StructuredOutput("choice", choices=["a", ""], param=p), "non-empty strings"),
    (lambda p: StructuredOutput("yaml", "x", param=p), "kind must be one of"),
])
def test_invalid_specs_name_their_parameter(make, match) -> None:
    with pytest.raises(SamplingParamsError, match=match) as info:
        make("guided_x")
    assert info.value.param == "guided_x" and str(info.value).startswith("guided_x: ")


def test_sampling_params_checks_the_field() -> None:
    with pytest.raises(SamplingParamsError, match="StructuredOutput") as info:
        SamplingParams(structured={"type": "object"})
    assert info.value.param == "structured"
    for name, value in (("ignore_eos", True), ("min_tokens", 3)):
        with pytest.raises(SamplingParamsError, match=name) as info:
            SamplingParams(structured=StructuredOutput("json_object"), **{name: value})
        assert info.value.param == name
