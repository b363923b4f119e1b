"""Fuzzing a live server (item 1 of the reliability suite): hypothesis-generated GenerateRequests, adapter RPCs and
raw wire bytes against an in-process server on 127.0.0.1. Every call must end, within its deadline, either in a
success that respects the request or in a documented client status (never INTERNAL / UNKNOWN), and a valid request
must still give the reference output afterwards with nothing held in the engine.

Response formats get their own fuzzing: generated JSON Schemas, regexes, grammars and choice lists, and hostile
ones (deep nesting, huge enums, catastrophic regexes), while a plain request keeps being served alongside.

Counts: 2,300 examples in ``make test`` (1,200 + 400 + 400 + 300), 12,000 under ``make soak``
(6,000 + 2,000 + 2,000 + 2,000).
"""
from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter

import grpc
import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from clients.aspen.v1 import aspen_pb2 as pb
from clients.client import AspenClient
from tests.helpers.metrics import report
from tests.helpers.server import GREEDY, ServerThread, shared_assets, wait_engine_idle
from tests.helpers.statuses import CLIENT_CODES, check_client_error, details
from tests.helpers.structured import check_output

CALL_TIMEOUT_S = 30.0  # a call that outlives this is a hang
OK_FINISH = {pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_EOS, pb.FINISH_REASON_STOP}
FAST = {"generate": 1200, "adapters": 400, "wire": 400, "formats": 300}
SLOW = {"generate": 6000, "adapters": 2000, "wire": 2000, "formats": 2000}
VOCAB = 320
MAX_MODEL_LEN = 128
INT32 = (-(2**31), 2**31 - 1)


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    assets = shared_assets(tmp_path_factory)
    s = ServerThread(assets, engine={"max_model_len": MAX_MODEL_LEN, "num_kv_blocks": 64})
    s.assets = assets
    with AspenClient(s.address, timeout=CALL_TIMEOUT_S) as c:
        s.reference = {a: c.generate("The quick brown fox", a, max_new_tokens=8, **GREEDY).token_ids
                       for a in (None, "a1")}
    yield s
    s.stop()


def fuzz_settings(n: int):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None, print_blob=True,
                    suppress_health_check=list(HealthCheck), phases=(Phase.explicit, Phase.generate, Phase.shrink))


# ---------------------------------------------------------------------------------------------- strategies
NASTY_CHARS = "\x00\x01\x7f\ufffd\ud7ff\ue000\ufeff\u200b\u202e\u0301\U0010ffff\U0001f642\n\r\t\\/'\"%$"
NASTY_IDS = ["a1", "team/a2", "a3", "bad", "missing", "team", "", ".", "..", "../x", "a1/..", "./a1", "a1/", "/a1",
             "/etc/passwd", "a\x00b", "a1\x00", "x" * 257, "y" * 5000, "a//b", "\\a1", "C:\\x", "%2e%2e/x", "~",
             "${HOME}", "a1;ls", " a1", "a1\n", "team/a2/../a2", "a1/adapter_config.json", "é", "a1\u202e",
             "team/../../base", "a" * 256]
texts = st.one_of(st.text(max_size=40), st.text(alphabet=st.sampled_from(NASTY_CHARS), max_size=40),
                  st.text(max_size=400), st.builds(lambda c, n: c * n, st.sampled_from("ab \n🙂"),
                                                   st.integers(0, 70_000)))
adapter_ids = st.one_of(st.sampled_from(NASTY_IDS), st.from_regex(r"[A-Za-z0-9._/-]{1,40}", fullmatch=True),
                        st.text(max_size=300))
token_ids = st.lists(st.one_of(st.integers(0, VOCAB + 5), st.integers(0, 2**32 - 1)), max_size=300)
floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.floats(-3, 3),
                   st.sampled_from([0.0, -0.0, 1e-300, 5e-324, 1e-5, 1.0, 2.0, 1e4, 1e300, float("inf")]))
def _mix(draw, valid, extreme, valid_share: int = 3):
    """Usually a valid value (``valid_share`` in ``valid_share + 1``), else an extreme one. (Hypothesis favours
    small draws, so the valid branch is the one at 0.)"""
    return draw(extreme if draw(st.integers(0, valid_share)) == valid_share else valid)


def _params(draw) -> pb.SamplingParams:
    """Every field unset, valid or extreme, so that about half of the requests are valid and exercise the engine."""
    p = pb.SamplingParams()
    max_new = _mix(draw, st.integers(1, 4), st.one_of(st.integers(*INT32), st.sampled_from(
        [0, -1, MAX_MODEL_LEN, 2**31 - 1])), valid_share=9)
    p.max_new_tokens = max_new  # always set: the default (16) would make valid requests 4x dearer
    ints = {"min_new_tokens": (st.integers(0, max(0, min(max_new, 4))), st.integers(*INT32)),
            "top_k": (st.integers(0, 400), st.integers(*INT32)), "logprobs": (st.integers(0, 20), st.integers(*INT32)),
            "seed": (st.integers(0, 2**63 - 1), st.integers(-(2**63), 2**63 - 1))}
    reals = {"temperature": st.floats(0, 3), "top_p": st.floats(1e-6, 1), "min_p": st.floats(0, 1),
             "repetition_penalty": st.floats(0.5, 2), "presence_penalty": st.floats(-2, 2),
             "frequency_penalty": st.floats(-2, 2)}
    for name, (valid, extreme) in ints.items():
        if draw(st.booleans()):
            setattr(p, name, _mix(draw, valid, extreme, valid_share=6))
    for name, valid in reals.items():
        if draw(st.booleans()):
            setattr(p, name, _mix(draw, valid, floats, valid_share=6))
    if draw(st.booleans()):
        p.skip_special_tokens = draw(st.booleans())
    p.ignore_eos = draw(st.booleans())
    p.stop.extend(_mix(draw, st.lists(st.text(min_size=1, max_size=3), max_size=3), st.lists(
        st.one_of(st.text(max_size=5), st.text(min_size=250, max_size=300)), max_size=18)))
    p.stop_token_ids.extend(_mix(draw, st.lists(st.integers(0, VOCAB - 1), max_size=3),
                                 st.lists(st.integers(0, 2**32 - 1), max_size=4), valid_share=6))
    if draw(st.integers(0, 40)) == 0:  # every token a stop token (with min_new_tokens: nothing left to sample)
        p.stop_token_ids.extend(range(VOCAB))
    return p


@st.composite
def generate_requests(draw) -> pb.GenerateRequest:
    req = pb.GenerateRequest(params=_params(draw))
    if draw(st.booleans()):
        req.request_id = _mix(draw, st.text(max_size=20), st.text(min_size=250, max_size=300))
    if draw(st.booleans()):
        req.adapter_id = _mix(draw, st.sampled_from(["a1", "team/a2", "a3"]), adapter_ids, valid_share=2)
    kind = ["text", "ids", "text", "ids", "none"][draw(st.integers(0, 4)) if draw(st.integers(0, 9)) == 9 else
                                                  draw(st.integers(0, 3))]
    if kind == "text":
        req.text = _mix(draw, st.text(min_size=1, max_size=25), texts)
    elif kind == "ids":
        req.token_ids.ids.extend(_mix(draw, st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=60), token_ids))
    return req


def check_generate(client: AspenClient, req: pb.GenerateRequest, stream: bool, stats: Counter) -> None:
    try:
        if stream:
            msgs = list(client.generation.GenerateStream(req, timeout=CALL_TIMEOUT_S))
            last, tokens = msgs[-1], [t for m in msgs for t in m.token_ids]
        else:
            last = client.generation.Generate(req, timeout=CALL_TIMEOUT_S)
            tokens = list(last.token_ids)
    except grpc.RpcError as e:
        stats[check_client_error(e).name] += 1
        return
    assert last.finish_reason in OK_FINISH, (last.finish_reason, last.error if stream else "")
    assert last.usage.completion_tokens == len(tokens) >= 1
    if req.params.HasField("max_new_tokens"):
        assert len(tokens) <= req.params.max_new_tokens
    stats["OK"] += 1


def after_fuzz(server: ServerThread, stats: Counter, name: str, started: float) -> None:
    """The server still serves the reference outputs and holds nothing."""
    llm = server.server.engine
    for info in llm.adapter_cache.info():  # forget aliases the fuzzer may have re-pointed (e.g. LoadAdapter("a1", "a3"))
        llm.adapter_cache.unregister(info.adapter_id)
    with AspenClient(server.address, timeout=CALL_TIMEOUT_S) as c:
        for adapter, ids in server.reference.items():
            assert c.generate("The quick brown fox", adapter, max_new_tokens=8, **GREEDY).token_ids == ids
    state = wait_engine_idle(server)
    assert (state["kv_blocks_used"], state["adapter_pins"], state["tracked"], state["calls"]) == (0, 0, 0, 0)
    report(name, examples=sum(stats.values()), outcomes=dict(sorted(stats.items())),
           seconds=round(time.monotonic() - started, 1))


# ---------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("n", [pytest.param(FAST["generate"], id="fast"),
                               pytest.param(SLOW["generate"], id="soak", marks=pytest.mark.slow)])
def test_fuzz_generate_requests(fuzz_server, n):
    stats: Counter = Counter()
    started = time.monotonic()
    with AspenClient(fuzz_server.address, timeout=CALL_TIMEOUT_S) as client:
        @fuzz_settings(n)
        @given(req=generate_requests(), stream=st.booleans())
        @example(req=pb.GenerateRequest(text="hi", params=pb.SamplingParams(
            max_new_tokens=2, min_new_tokens=1, temperature=1.0, stop_token_ids=range(VOCAB))), stream=False)
        @example(req=pb.GenerateRequest(text="hi", params=pb.SamplingParams(
            max_new_tokens=2, temperature=1.0, repetition_penalty=1e-300)), stream=True)
        @example(req=pb.GenerateRequest(text="hi", params=pb.SamplingParams(
            max_new_tokens=2, min_new_tokens=2, temperature=1e300, stop_token_ids=[5])), stream=False)
        @example(req=pb.GenerateRequest(text="x" * 10_000_000, params=pb.SamplingParams(max_new_tokens=1)),
                 stream=False)
        @example(req=pb.GenerateRequest(token_ids=pb.TokenIds(ids=[2**32 - 1])), stream=True)
        def check(req, stream):
            check_generate(client, req, stream, stats)

        check()
    assert sum(stats.values()) >= n and stats["OK"] > 0 and stats["INVALID_ARGUMENT"] > 0
    after_fuzz(fuzz_server, stats, f"fuzz-generate-{n}", started)


@st.composite
def adapter_calls(draw):
    kind = draw(st.sampled_from(["load", "load", "unload", "list", "tokenize"]))
    if kind == "load":
        path = draw(st.one_of(st.just(""), adapter_ids, st.sampled_from(["@ROOT/a1", "@ROOT/../base", "@ROOT",
                                                                         "@ROOT/team", "/", "/tmp", "/a\x00b"])))
        return kind, pb.LoadAdapterRequest(adapter_id=draw(adapter_ids), path=path)
    if kind == "unload":
        return kind, pb.UnloadAdapterRequest(adapter_id=draw(adapter_ids))
    if kind == "tokenize":
        return kind, pb.TokenizeRequest(text=draw(texts))
    return kind, pb.ListAdaptersRequest()


@pytest.mark.parametrize("n", [pytest.param(FAST["adapters"], id="fast"),
                               pytest.param(SLOW["adapters"], id="soak", marks=pytest.mark.slow)])
def test_fuzz_adapter_rpcs(fuzz_server, n):
    stats: Counter = Counter()
    started = time.monotonic()
    root = fuzz_server.assets["adapters"]
    with AspenClient(fuzz_server.address, timeout=CALL_TIMEOUT_S) as client:
        rpc = {"load": client.adapters.LoadAdapter, "unload": client.adapters.UnloadAdapter,
               "list": client.adapters.ListAdapters, "tokenize": client.generation.Tokenize}

        @fuzz_settings(n)
        @given(call=adapter_calls())
        @example(call=("load", pb.LoadAdapterRequest(adapter_id="x", path="/tmp/a\x00b")))
        @example(call=("tokenize", pb.TokenizeRequest(text="ab " * 3_000_000)))
        def check(call):
            kind, req = call
            if kind == "load" and req.path.startswith("@ROOT"):
                req.path = root + req.path[len("@ROOT"):]
            try:
                rpc[kind](req, timeout=CALL_TIMEOUT_S)
                stats["OK"] += 1
            except grpc.RpcError as e:
                code = check_client_error(e, allowed=CLIENT_CODES - {grpc.StatusCode.RESOURCE_EXHAUSTED})
                if code is grpc.StatusCode.INVALID_ARGUMENT and kind == "load":
                    assert {v.field for v in details(e)["BadRequest"].field_violations} <= {"adapter_id", "path"}
                stats[f"{kind}:{code.name}"] += 1

        check()
    assert sum(stats.values()) >= n and stats["OK"] > 0
    after_fuzz(fuzz_server, stats, f"fuzz-adapter-rpcs-{n}", started)


METHODS = ["/aspen.v1.GenerationService/Generate", "/aspen.v1.GenerationService/GenerateStream",
           "/aspen.v1.GenerationService/Tokenize", "/aspen.v1.GenerationService/GetModelInfo",
           "/aspen.v1.AdapterService/LoadAdapter", "/aspen.v1.AdapterService/UnloadAdapter",
           "/aspen.v1.AdapterService/ListAdapters"]


def _string_field(tag: int, payload: bytes) -> bytes:
    """A length-delimited field ``tag`` holding ``payload`` (e.g. invalid UTF-8 in a string field)."""
    return bytes([tag << 3 | 2, len(payload)]) + payload


wire_bytes = st.one_of(
    st.binary(max_size=200),
    st.builds(_string_field, st.sampled_from([1, 2, 3]), st.one_of(
        st.sampled_from([b"\xff\xfe", b"\xc0\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"a\x80", b"\xe2\x82"]),
        st.binary(max_size=60))))


@pytest.mark.parametrize("n", [pytest.param(FAST["wire"], id="fast"),
                               pytest.param(SLOW["wire"], id="soak", marks=pytest.mark.slow)])
def test_fuzz_wire_bytes(fuzz_server, n):
    """Raw request bytes, undecodable ones included: INVALID_ARGUMENT (field "request"), never UNKNOWN."""
    stats: Counter = Counter()
    started = time.monotonic()
    with AspenClient(fuzz_server.address, timeout=CALL_TIMEOUT_S) as client:
        callers = {m: (client.channel.unary_stream if m.endswith("Stream") else client.channel.unary_unary)(m)
                   for m in METHODS}

        @fuzz_settings(n)
        @given(method=st.sampled_from(METHODS), payload=wire_bytes)
        @example(method=METHODS[0], payload=_string_field(3, b"\xff\xfe"))
        @example(method=METHODS[1], payload=b"\xff\xff\xff\xff")
        def check(method, payload):
            try:
                result = callers[method](payload, timeout=CALL_TIMEOUT_S)
                if method.endswith("Stream"):
                    list(result)
                stats["OK"] += 1
            except grpc.RpcError as e:
                stats[check_client_error(e).name] += 1

        check()
    assert sum(stats.values()) >= n and stats["INVALID_ARGUMENT"] > 0
    after_fuzz(fuzz_server, stats, f"fuzz-wire-{n}", started)


# ---------------------------------------------------------------------------------------------- response formats
def _nested(depth: int) -> dict:
    schema: dict = {"type": "integer"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"], "additionalProperties": False}
    return schema


#: (name, ResponseFormat message, what must happen: "ok" = served (the output checked where it completes),
#: "refused" = INVALID_ARGUMENT naming the format's field)
HOSTILE = [
    ("nested-20", pb.ResponseFormat(json_schema=json.dumps(_nested(20))), "ok"),
    ("nested-300", pb.ResponseFormat(json_schema=json.dumps(_nested(300))), "refused"),
    ("nested-text-50k", pb.ResponseFormat(json_schema="[" * 50_000 + "]" * 50_000), "refused"),
    ("enum-10k", pb.ResponseFormat(json_schema=json.dumps({"enum": [f"value-{i}" for i in range(10_000)]})), "ok"),
    ("enum-40k", pb.ResponseFormat(json_schema=json.dumps({"enum": [f"value-{i}" for i in range(40_000)]})),
     "refused"),
    ("choices-4096", pb.ResponseFormat(choice=pb.Choice(choices=[f"c{i}" for i in range(4096)])), "ok"),
    ("choices-5000", pb.ResponseFormat(choice=pb.Choice(choices=[f"c{i}" for i in range(5000)])), "refused"),
    ("props-2000", pb.ResponseFormat(json_schema=json.dumps({
        "type": "object", "properties": {f"p{i}": {"type": "boolean"} for i in range(2000)},
        "required": [f"p{i}" for i in range(2000)], "additionalProperties": False})), "ok"),
    ("regex-nested-plus", pb.ResponseFormat(regex=r"(a+)+b"), "ok"),
    ("regex-alternation", pb.ResponseFormat(regex=r"(a|aa)*c"), "ok"),
    ("regex-overlap", pb.ResponseFormat(regex=r"(x+x+)+y"), "ok"),
    ("regex-nested-counts", pb.ResponseFormat(regex=r"((a{1,100}){1,100}){1,100}"), "ok"),
    ("regex-huge-count", pb.ResponseFormat(regex=r"[0-9a-f]{100000}"), "ok"),
    ("regex-any-long", pb.ResponseFormat(regex=r"[\s\S]{0,100000}x"), "ok"),
    ("regex-many-words", pb.ResponseFormat(regex="(" + "|".join(f"w{i}x" for i in range(20_000)) + ")"), "ok"),
    ("regex-too-long", pb.ResponseFormat(regex="(" + "|".join(f"w{i}x" for i in range(40_000)) + ")"), "refused"),
    ("regex-lookahead", pb.ResponseFormat(regex=r"(?=a)a"), "refused"),
    ("grammar-left-recursive", pb.ResponseFormat(grammar='start: start "a" | "b"'), "ok"),
    ("grammar-ambiguous", pb.ResponseFormat(grammar='start: x\nx: x x | "a" | ""'), "ok"),
    ("schema-no-finite-value", pb.ResponseFormat(json_schema=json.dumps({"$ref": "#"})), "refused"),
]
PYTHON_CHECKS = {"regex-nested-plus": r"(a+)+b", "regex-alternation": r"(a|aa)*c", "regex-overlap": r"(x+x+)+y"}

_SCHEMA_KEYWORDS = ["type", "properties", "items", "enum", "const", "required", "minimum", "maximum", "pattern",
                    "minLength", "maxLength", "anyOf", "oneOf", "allOf", "$ref", "$defs", "additionalProperties",
                    "format", "minItems", "maxItems", "not", "uniqueItems", "multipleOf", "prefixItems"]
_json_leaves = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=False),
                         st.text(max_size=8), st.sampled_from(["string", "integer", "object", "array", "#", "#/$defs/a",
                                                               "email", "date-time", "^[a-z]+$", "(a"]))
schemas = st.recursive(
    st.one_of(st.booleans(), st.fixed_dictionaries({"type": st.sampled_from(
        ["string", "integer", "number", "boolean", "null", "object", "array", "nope"])})),
    lambda children: st.dictionaries(st.sampled_from(_SCHEMA_KEYWORDS), st.one_of(
        children, _json_leaves, st.lists(st.one_of(children, _json_leaves), max_size=3),
        st.dictionaries(st.text(max_size=4), children, max_size=3)), max_size=4),
    max_leaves=16)
REGEX_CHARS = "ab01.*+?|()[]{}^$\\-,dswSDW:=!<>"
formats = st.one_of(
    st.builds(lambda s: pb.ResponseFormat(json_schema=json.dumps(s)), schemas),
    st.builds(lambda t: pb.ResponseFormat(json_schema=t), st.text(max_size=60)),
    st.builds(lambda t: pb.ResponseFormat(regex=t), st.text(alphabet=REGEX_CHARS, max_size=30)),
    st.builds(lambda t: pb.ResponseFormat(regex=t), st.text(max_size=20)),
    st.builds(lambda t: pb.ResponseFormat(grammar=t), st.text(alphabet='start:|"ab()*+?/ \n%json{}', max_size=40)),
    st.builds(lambda c: pb.ResponseFormat(choice=pb.Choice(choices=c)), st.lists(st.text(max_size=6), max_size=8)),
    st.just(pb.ResponseFormat(json_object=pb.JsonObject())), st.just(pb.ResponseFormat()),
    st.sampled_from([h[1] for h in HOSTILE]))


def check_format_generate(client: AspenClient, req: pb.GenerateRequest, stream: bool) -> str:
    """One constrained call: served (a completed output is checked where Python can check it), or refused with a
    documented status; a grammar that turns out too complex mid-stream ends with FINISH_REASON_ERROR naming it."""
    try:
        if stream:
            msgs = list(client.generation.GenerateStream(req, timeout=CALL_TIMEOUT_S))
            last, text = msgs[-1], "".join(m.text for m in msgs)
            if last.finish_reason == pb.FINISH_REASON_ERROR:
                assert last.error.startswith("response_format"), last.error
                return "STREAM_ERROR"
        else:
            last = client.generation.Generate(req, timeout=CALL_TIMEOUT_S)
            text = last.text
    except grpc.RpcError as e:
        code = check_client_error(e)
        if code is grpc.StatusCode.INVALID_ARGUMENT:
            fields = {v.field for v in details(e)["BadRequest"].field_violations}
            assert all(f.startswith(("response_format", "params.", "text")) for f in fields), fields
        return code.name
    assert last.finish_reason in OK_FINISH
    complete = last.finish_reason in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_EOS)
    kind = req.response_format.WhichOneof("format")
    if complete and kind == "json_object":
        check_output("json_object", text)
    elif complete and kind == "json_schema":
        json.loads(text)
    elif complete and kind == "choice":
        assert text in req.response_format.choice.choices
    return "OK"


def _format_request(fmt: pb.ResponseFormat, max_new: int = 6, temperature: float = 0.0) -> pb.GenerateRequest:
    return pb.GenerateRequest(text="The quick brown fox", response_format=fmt,
                              params=pb.SamplingParams(max_new_tokens=max_new, temperature=temperature, seed=1))


def test_hostile_formats_clear_errors_and_the_server_keeps_serving(fuzz_server):
    """Each hostile format is served or refused as expected, quickly, while a plain request is served alongside."""
    started = time.monotonic()
    plain: list[float] = []
    stop = threading.Event()

    def keep_serving():
        with AspenClient(fuzz_server.address, timeout=CALL_TIMEOUT_S) as c:
            while not stop.is_set():
                t0 = time.monotonic()
                assert c.generate("The quick brown fox", None, max_new_tokens=8,
                                  **GREEDY).token_ids == fuzz_server.reference[None]
                plain.append(time.monotonic() - t0)

    alongside = threading.Thread(target=keep_serving)
    alongside.start()
    outcomes = {}
    try:
        with AspenClient(fuzz_server.address, timeout=CALL_TIMEOUT_S) as client:
            for name, fmt, expected in HOSTILE:
                t0 = time.monotonic()
                max_new = 48 if name in PYTHON_CHECKS else 6
                req = _format_request(fmt, max_new=max_new)
                why = ""
                try:
                    resp = client.generation.Generate(req, timeout=CALL_TIMEOUT_S)
                    outcome = "ok"
                    if name in PYTHON_CHECKS and resp.finish_reason != pb.FINISH_REASON_LENGTH:
                        assert re.fullmatch(PYTHON_CHECKS[name], resp.text), (name, resp.text)
                except grpc.RpcError as e:
                    assert e.code() is grpc.StatusCode.INVALID_ARGUMENT, (name, e.code(), e.details())
                    field = details(e)["BadRequest"].field_violations[0].field
                    assert field.startswith("response_format"), (name, field)
                    outcome, why = "refused", e.details()
                outcomes[name] = (outcome, round(time.monotonic() - t0, 3), why[:120])
                assert outcome == expected, (name, outcome, why)
    finally:
        stop.set()
        alongside.join(CALL_TIMEOUT_S)
    assert plain and max(plain) < 10, plain
    after_fuzz(fuzz_server, Counter(o for o, _, _ in outcomes.values()), "fuzz-hostile-formats", started)
    report("hostile-formats", outcomes=outcomes, plain_requests=len(plain), plain_max_s=round(max(plain), 3))


@pytest.mark.parametrize("n", [pytest.param(FAST["formats"], id="fast"),
                               pytest.param(SLOW["formats"], id="soak", marks=pytest.mark.slow)])
def test_fuzz_response_formats(fuzz_server, n):
    stats: Counter = Counter()
    started = time.monotonic()
    with AspenClient(fuzz_server.address, timeout=CALL_TIMEOUT_S) as client:
        @fuzz_settings(n)
        @given(fmt=formats, stream=st.booleans(), temperature=st.sampled_from([0.0, 1.0]),
               adapter=st.sampled_from(["", "a1", "team/a2"]))
        def check(fmt, stream, temperature, adapter):
            req = _format_request(fmt, max_new=4, temperature=temperature)
            req.adapter_id = adapter
            stats[check_format_generate(client, req, stream)] += 1

        check()
    assert sum(stats.values()) >= n and stats["OK"] > 0 and stats["INVALID_ARGUMENT"] > 0
    after_fuzz(fuzz_server, stats, f"fuzz-formats-{n}", started)
