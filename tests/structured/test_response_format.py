"""ResponseFormat's own checks (kind, type and size of the specification) and its place in SamplingParams."""
from __future__ import annotations

import pytest

from engine import ResponseFormat, SamplingParams
from engine.scheduling.errors import RequestError
from engine.scheduling.response_format import MAX_CHOICES, MAX_SPEC_CHARS, ResponseFormatError
from engine.scheduling.sampling_params import SamplingParamsError


def test_constructors_and_value_semantics():
    schema = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "string"}}}
    fmt = ResponseFormat.json_schema(schema)
    assert fmt.kind == "json_schema" and fmt.field == "response_format.json_schema"
    assert fmt.spec.index('"b"') < fmt.spec.index('"a"')  # key order kept: properties come out in that order
    assert fmt == ResponseFormat.json_schema(schema) and hash(fmt) == hash(ResponseFormat.json_schema(schema))
    assert ResponseFormat.json_schema(True).spec == "true"
    assert ResponseFormat.choice(["a", "b"]).spec == ("a", "b")
    assert ResponseFormat.choice(x for x in "ab").field == "response_format.choice.choices"
    assert ResponseFormat.json_object().spec is None
    params = SamplingParams(response_format=ResponseFormat.regex("[a-z]+"))
    assert params == SamplingParams(response_format=ResponseFormat.regex("[a-z]+"))
    assert len({params, SamplingParams()}) == 2
    assert "json_schema" in repr(ResponseFormat.json_schema({"x" * 100: 1}))


@pytest.mark.parametrize(("make", "field", "needle"), [
    (lambda: ResponseFormat("xml", "<a/>"), "response_format", "kind among"),
    (lambda: ResponseFormat("json_object", "{}"), "response_format.json_object", "no specification"),
    (lambda: ResponseFormat.regex(""), "response_format.regex", "empty"),
    (lambda: ResponseFormat.regex("  "), "response_format.regex", "empty"),
    (lambda: ResponseFormat("regex", b"abc"), "response_format.regex", "expected a string"),
    (lambda: ResponseFormat.grammar("x" * (MAX_SPEC_CHARS + 1)), "response_format.grammar", "at most"),
    (lambda: ResponseFormat.json_schema({"a": {1, 2}}), "response_format.json_schema", "not JSON-serializable"),
    (lambda: ResponseFormat.json_schema({"a": float("nan")}), "response_format.json_schema", "not JSON"),
    (lambda: ResponseFormat.choice([]), "response_format.choice.choices", "1 to"),
    (lambda: ResponseFormat.choice("abc"), "response_format.choice.choices", "list of strings"),
    (lambda: ResponseFormat.choice(["a", ""]), "response_format.choice.choices", "non-empty strings"),
    (lambda: ResponseFormat.choice(["a", 3]), "response_format.choice.choices", "non-empty strings"),
    (lambda: ResponseFormat.choice([str(i) for i in range(MAX_CHOICES + 1)]), "response_format.choice.choices",
     "1 to"),
    (lambda: ResponseFormat.choice(["x" * (MAX_SPEC_CHARS // 2 + 1)] * 2), "response_format.choice.choices",
     "characters in all"),
])
def test_refusals_name_the_field(make, field, needle):
    with pytest.raises(ResponseFormatError, match=needle) as info:
        make()
    assert isinstance(info.value, RequestError) and info.value.field == field


def test_deeply_nested_mapping_is_refused_not_crashing():
    schema: dict = {}
    for _ in range(100_000):
        schema = {"a": schema}
    with pytest.raises(ResponseFormatError, match="not JSON-serializable"):
        ResponseFormat.json_schema(schema)


@pytest.mark.parametrize(("kw", "field"), [
    ({"ignore_eos": True}, "ignore_eos"),
    ({"min_new_tokens": 2}, "min_new_tokens"),
    ({"response_format": "json"}, "response_format"),
])
def test_sampling_params_conflicts(kw, field):
    kw.setdefault("response_format", ResponseFormat.json_object())
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams(max_new_tokens=8, **kw)
    assert info.value.field == field
