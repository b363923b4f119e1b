"""Structured output over gRPC: GenerateRequest.response_format in unary and streaming calls, with adapters, and
the INVALID_ARGUMENT statuses (field paths included) of formats the engine refuses."""
from __future__ import annotations

import json
import re

import grpc
import jsonschema
import pytest

from clients.aspen.v1 import aspen_pb2 as pb
from clients.client import AspenClient, build_request, format_message
from engine.server import status as errs
from tests.helpers.server import ServerThread, build_assets, collect_stream
from tests.helpers.statuses import REQUEST_FIELDS, expect_error
from tests.helpers.structured import MAX_FORMAT_TOKENS, SCHEMAS

FMT = {"max_new_tokens": MAX_FORMAT_TOKENS, "temperature": 0.0}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    s = ServerThread(build_assets(tmp_path_factory.mktemp("structured-server")))
    yield s
    s.stop()


@pytest.fixture()
def client(served):
    with AspenClient(served.address, timeout=60) as c:
        yield c


@pytest.mark.parametrize("adapter", [None, "a1", "team/a2"])
def test_json_schema_unary(client, adapter):
    schema = SCHEMAS["tool_call"]
    resp = client.generate("The quick brown fox", adapter, response_format={"json_schema": schema}, **FMT)
    assert resp.finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_EOS)
    jsonschema.validate(json.loads(resp.text), schema)
    assert resp.usage.completion_tokens == len(resp.token_ids)


def test_stream_regex_choice_and_grammar(client):
    text, tokens, last = collect_stream(client, "The quick brown fox", "a3",
                                        response_format={"regex": r"[a-z]{3}-\d{2}"}, **FMT)
    assert len(tokens) == last.usage.completion_tokens
    assert re.fullmatch(r"[a-z]{3}-\d{2}", text) and last.finish_reason == pb.FINISH_REASON_STOP
    chosen = client.generate("hi", response_format={"choice": ["alpha", "beta"]}, temperature=1.0, seed=3).text
    assert chosen in ("alpha", "beta")
    lark = 'start: "<" WORD ">"\nWORD: /[a-z]{1,4}/'
    assert re.fullmatch(r"<[a-z]{1,4}>", client.generate("hi", response_format={"grammar": lark}, **FMT).text)
    openai_style = client.generate("hi", response_format={"type": "json_schema", "json_schema": {
        "name": "label", "schema": SCHEMAS["label"]}}, **FMT)
    jsonschema.validate(json.loads(openai_style.text), SCHEMAS["label"])


def test_length_cut_is_reported(client):
    resp = client.generate("hi", response_format={"json_schema": SCHEMAS["person"]}, max_new_tokens=2,
                           temperature=0.0)
    assert resp.finish_reason == pb.FINISH_REASON_LENGTH and len(resp.token_ids) == 2


@pytest.mark.parametrize(("fmt", "params", "field", "needle"), [
    ({"json_schema": "{nope"}, {}, "response_format.json_schema", "not valid JSON"),
    ({"json_schema": {"type": "object", "not": {}}}, {}, "response_format.json_schema", "Unimplemented keys"),
    ({"regex": "(a"}, {}, "response_format.regex", "unclosed"),
    ({"regex": ""}, {}, "response_format.regex", "empty"),
    ({"grammar": "start: missing"}, {}, "response_format.grammar", "missing"),
    ({"choice": []}, {}, "response_format.choice.choices", "1 to"),
    (pb.ResponseFormat(), {}, "response_format", "set one of"),
    ({"json_object": True}, {"ignore_eos": True}, "params.ignore_eos", "response_format"),
    ({"json_object": True}, {"min_new_tokens": 1}, "params.min_new_tokens", "response_format"),
])
@pytest.mark.parametrize("stream", [False, True])
def test_bad_formats_are_invalid_argument_naming_the_field(client, served, fmt, params, field, needle, stream):
    request = build_request("hi", response_format=fmt, max_new_tokens=4, **params)
    if stream:
        d = expect_error(lambda: list(client.generation.GenerateStream(request, timeout=30)),
                         grpc.StatusCode.INVALID_ARGUMENT)
    else:
        d = expect_error(lambda: client.generation.Generate(request, timeout=30), grpc.StatusCode.INVALID_ARGUMENT)
    violation = d["BadRequest"].field_violations[0]
    assert violation.field == field and field in REQUEST_FIELDS and needle in violation.description
    assert served.wait_idle()["tracked"] == 0


def test_grammar_failure_during_generation_is_invalid_argument():
    status, message = errs.engine_error("ResponseFormatError: response_format.regex: the grammar engine cannot "
                                        "follow the format here: lexer fuel exhausted", "r1", "")
    assert status.code is grpc.StatusCode.INVALID_ARGUMENT and message.startswith("response_format.regex: ")


def test_format_message_shapes():
    assert format_message(None) is None
    assert format_message({"json_object": {}}).WhichOneof("format") == "json_object"
    assert json.loads(format_message({"json_schema": {"type": "string"}}).json_schema) == {"type": "string"}
    assert format_message({"type": "json_object"}).WhichOneof("format") == "json_object"
    with pytest.raises(ValueError, match="exactly one key"):
        format_message({"regex": "a", "grammar": "b"})
    with pytest.raises(ValueError, match="json_object or json_schema"):
        format_message({"type": "text"})
    with pytest.raises(TypeError):
        format_message("json")


def test_generate_command_takes_a_response_format(served, tmp_path, capsys):
    from aspen.cli import main

    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps(SCHEMAS["tool_call"]))
    base = ["generate", "--server", served.address, "--temperature", "0", "--max-new-tokens", str(MAX_FORMAT_TOKENS)]
    assert main([*base, "--adapter", "a1", "--json-schema", f"@{schema_file}", "The quick brown fox"]) == 0
    jsonschema.validate(json.loads(capsys.readouterr().out), SCHEMAS["tool_call"])
    assert main([*base, "--no-stream", "--regex", "[a-c]{3}-[0-9]{2}", "A small cat"]) == 0
    assert re.fullmatch(r"[a-c]{3}-[0-9]{2}", capsys.readouterr().out.strip())
    assert main([*base, "--choice", "yes", "--choice", "no", "Is it raining?"]) == 0
    assert capsys.readouterr().out.strip() in ("yes", "no")
    assert main([*base, "--json-schema", "@/nonexistent/schema.json", "x"]) == 1  # names the unreadable file
    assert "/nonexistent/schema.json" in capsys.readouterr().err
    assert main([*base, "--regex", "(?=a)a", "x"]) == 1  # refused by the engine: INVALID_ARGUMENT with its field
    assert "response_format.regex" in capsys.readouterr().err
