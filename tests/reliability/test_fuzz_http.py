"""Fuzzing the HTTP API of a live server, as tests/reliability/test_fuzz.py fuzzes gRPC: hypothesis-generated
completion, chat and adapter bodies (valid ones, wrong types, huge and non-finite numbers, unknown fields, random
JSON) and raw bytes (invalid UTF-8, broken JSON) against an in-process server on 127.0.0.1. Every call must end,
within its deadline, in a success that respects the request or an OpenAI error object with a client status
(400 / 404 / 413 / 429), never a 500; afterwards the server still gives the reference outputs with nothing held.

Counts: 450 examples in ``make test`` (150 + 100 + 100 + 100), 8,000 under ``make soak``.
"""
from __future__ import annotations

import json
import time
from collections import Counter

import httpx
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from clients.client import AspenClient
from tests.helpers.server import GREEDY, ServerThread, shared_assets
from tests.reliability.test_fuzz import (
    MAX_MODEL_LEN,
    VOCAB,
    adapter_ids,
    after_fuzz,
    floats,
    fuzz_settings,
    texts,
)

CALL_TIMEOUT_S = 30.0
CLIENT_STATUSES = {400, 404, 413, 429}
FAST = {"completions": 150, "chat": 100, "adapters": 100, "raw": 100}
SLOW = {"completions": 3000, "chat": 2000, "adapters": 1500, "raw": 1500}


@pytest.fixture(scope="module")
def fuzz_http(tmp_path_factory):
    assets = shared_assets(tmp_path_factory)
    s = ServerThread(assets, http=True, engine={"max_model_len": MAX_MODEL_LEN, "num_kv_blocks": 64})
    s.assets = assets
    with AspenClient(s.address, timeout=CALL_TIMEOUT_S) as c:
        s.reference = {a: c.generate("The quick brown fox", a, max_new_tokens=8, **GREEDY).token_ids
                       for a in (None, "a1")}
    with httpx.Client(base_url=s.http_url + "/", timeout=CALL_TIMEOUT_S) as http:
        s.http = http
        yield s
    s.stop()


# ---------------------------------------------------------------------------------------------- strategies
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), floats, st.text(max_size=20)),
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(st.text(max_size=8), children,
                                                                               max_size=4)),
    max_leaves=12)
EXTREME_INTS = st.one_of(st.sampled_from([0, -1, 2**31, 2**63, 10**30, -(10**30)]), json_values)


def _mix(draw, valid, extreme, valid_share: int = 3):
    """Usually a valid value (``valid_share`` in ``valid_share + 1``), else an extreme one."""
    return draw(extreme if draw(st.integers(0, valid_share)) == valid_share else valid)


def _sampling(draw, body: dict) -> dict:
    body["max_tokens"] = _mix(draw, st.integers(1, 4), st.one_of(EXTREME_INTS, st.just(MAX_MODEL_LEN)), 9)
    fields = {"temperature": st.floats(0, 3), "top_p": st.floats(1e-6, 1), "min_p": st.floats(0, 1),
              "repetition_penalty": st.floats(0.5, 2), "presence_penalty": st.floats(-2, 2),
              "frequency_penalty": st.floats(-2, 2), "seed": st.integers(0, 2**63 - 1), "top_k": st.integers(-1, 50),
              "n": st.integers(1, 2), "min_tokens": st.integers(0, 1), "ignore_eos": st.booleans(),
              "stop": st.lists(st.text(min_size=1, max_size=3), max_size=3),
              "stop_token_ids": st.lists(st.integers(0, VOCAB - 1), max_size=3), "stream": st.booleans(),
              "stream_options": st.just({"include_usage": True}),
              "response_format": st.sampled_from([{"type": "text"}, {"type": "json_object"}, {
                  "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "maxLength": 3}}}]),
              "guided_choice": st.lists(st.text(min_size=1, max_size=4), min_size=1, max_size=3),
              "guided_regex": st.sampled_from(["[ab]{1,3}", "(?=a)", "a++"])}
    extreme = st.one_of(EXTREME_INTS, floats, json_values)
    for name, valid in fields.items():
        if draw(st.integers(0, 2)) == 0:
            body[name] = _mix(draw, valid, extreme, valid_share=6)
    if draw(st.integers(0, 5)) == 0:
        body.update(draw(st.dictionaries(st.text(max_size=10), json_values, max_size=3)))
    return body


def _model(draw) -> object:
    return _mix(draw, st.sampled_from(["base", "a1", "team/a2"]), st.one_of(adapter_ids, json_values), valid_share=4)


@st.composite
def completion_bodies(draw):
    if draw(st.integers(0, 12)) == 0:
        return draw(json_values)  # not even an object, mostly
    body = {"model": _model(draw), "prompt": _mix(draw, st.one_of(
        st.text(min_size=1, max_size=25), st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=30)),
        st.one_of(texts, st.lists(st.integers(0, 2**40), max_size=40), json_values))}
    if draw(st.integers(0, 5)) == 0:
        body["logprobs"] = _mix(draw, st.integers(0, 5), EXTREME_INTS)
    return _sampling(draw, body)


messages = st.lists(st.fixed_dictionaries({
    "role": st.one_of(st.sampled_from(["user", "system", "assistant"]), st.sampled_from(["", "wizard", "tool"]),
                      json_values),
    "content": st.one_of(st.text(max_size=30), texts, st.lists(st.fixed_dictionaries(
        {"type": st.sampled_from(["text", "image_url"]), "text": st.text(max_size=10)}), max_size=3), json_values)}),
    max_size=4)


@st.composite
def chat_bodies(draw):
    if draw(st.integers(0, 12)) == 0:
        return draw(json_values)
    valid = st.just([{"role": "user", "content": "The quick brown fox"}])
    body = {"model": _model(draw), "messages": _mix(draw, valid, st.one_of(messages, json_values), valid_share=1)}
    if draw(st.integers(0, 4)) == 0:
        body["logprobs"] = draw(st.one_of(st.booleans(), json_values))
        body["top_logprobs"] = _mix(draw, st.integers(0, 5), EXTREME_INTS)
    if draw(st.integers(0, 6)) == 0:
        body["max_completion_tokens"] = _mix(draw, st.integers(1, 4), EXTREME_INTS)
    return _sampling(draw, body)


@st.composite
def adapter_bodies(draw):
    path = draw(st.sampled_from(["load_lora_adapter", "unload_lora_adapter"]))
    body = {"lora_name": _mix(draw, st.sampled_from(["a1", "team/a2", "alias", "bad"]), st.one_of(adapter_ids,
                                                                                                    json_values))}
    if draw(st.booleans()):
        body["lora_path"] = draw(st.one_of(adapter_ids, st.sampled_from(["a3", "/", "/tmp", "../base"]), json_values))
    return path, body


INVALID_UTF8 = [b"\xff\xfe", b"\xc0\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"a\x80", b"\xe2\x82"]
raw_bodies = st.one_of(
    st.binary(max_size=200),
    st.builds(lambda junk: b'{"model": "a1", "max_tokens": 2, "prompt": "' + junk + b'"}',
              st.one_of(st.sampled_from(INVALID_UTF8), st.binary(max_size=30))),
    st.builds(lambda junk: b'{"messages": [{"role": "user", "content": "' + junk + b'"}], "max_tokens": 2}',
              st.sampled_from(INVALID_UTF8)),
    st.builds(lambda n: b"[" * n + b"]" * n, st.sampled_from([10, 1000, 100_000])))


# ---------------------------------------------------------------------------------------------- checks
def check_call(server, path: str, body, raw: bytes | None = None) -> str:
    """One call: a documented outcome (returned as its name for the statistics), or an assertion error."""
    content = raw if raw is not None else json.dumps(body, allow_nan=True).encode()
    streamed = isinstance(body, dict) and body.get("stream") is True
    headers = {"content-type": "application/json"}
    with server.http.stream("POST", path, content=content, headers=headers) as r:
        data = r.read()
    assert r.status_code != 500, data[:500]
    if r.status_code >= 400:
        assert r.status_code in CLIENT_STATUSES, (r.status_code, data[:500])
        error = json.loads(data)["error"]
        assert isinstance(error["message"], str) and error["type"] in (
            "invalid_request_error", "rate_limit_error"), error
        return f"{path}:{r.status_code}"
    if path.endswith("_adapter"):
        return f"{path}:OK"
    if streamed:
        events = [line.removeprefix("data: ") for line in data.decode().splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]", events[-3:]
        for event in events[:-1]:
            error = json.loads(event).get("error")
            assert error is None or error["type"] == "invalid_request_error", error  # e.g. a grammar too complex
        return f"{path}:STREAM"
    answer = json.loads(data)
    assert answer["choices"] and answer["usage"]["completion_tokens"] >= 1, answer
    limit = body.get("max_tokens") if isinstance(body, dict) else None
    if isinstance(limit, int) and not isinstance(limit, bool):
        assert answer["usage"]["completion_tokens"] <= limit * len(answer["choices"])
    return f"{path}:OK"


def _run(server, n: int, strategy, name: str, path_of, extra_examples=()) -> None:
    stats: Counter = Counter()
    started = time.monotonic()

    @fuzz_settings(n)
    @given(item=strategy)
    def check(item):
        path, body = path_of(item)
        stats[check_call(server, path, body)] += 1

    for ex in extra_examples:
        check = example(item=ex)(check)
    check()
    assert sum(stats.values()) >= n and any(k.endswith(("OK", "STREAM")) for k in stats), stats
    assert any(k.endswith(":400") for k in stats), stats
    after_fuzz(server, stats, f"fuzz-http-{name}-{n}", started)


@pytest.mark.parametrize("n", [pytest.param(FAST["completions"], id="fast"),
                               pytest.param(SLOW["completions"], id="soak", marks=pytest.mark.slow)])
def test_fuzz_completion_bodies(fuzz_http, n):
    _run(fuzz_http, n, completion_bodies(), "completions", lambda b: ("completions", b), extra_examples=[
        {"model": "a1", "prompt": "hi", "max_tokens": 2, "temperature": float("nan")},
        {"model": "a1", "prompt": "hi", "max_tokens": 10**30, "n": 128},
        {"model": "a1", "prompt": "x" * 3_000_000, "max_tokens": 1},
        {"model": "base", "prompt": [2**40], "stream": True}])


@pytest.mark.parametrize("n", [pytest.param(FAST["chat"], id="fast"),
                               pytest.param(SLOW["chat"], id="soak", marks=pytest.mark.slow)])
def test_fuzz_chat_bodies(fuzz_http, n):
    _run(fuzz_http, n, chat_bodies(), "chat", lambda b: ("chat/completions", b), extra_examples=[
        {"model": "a1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": True,
         "logprobs": True, "top_logprobs": 20},
        {"model": "a1", "messages": [{"role": "user", "content": "x" * 3_000_000}]}])


@pytest.mark.parametrize("n", [pytest.param(FAST["adapters"], id="fast"),
                               pytest.param(SLOW["adapters"], id="soak", marks=pytest.mark.slow)])
def test_fuzz_adapter_bodies(fuzz_http, n):
    _run(fuzz_http, n, adapter_bodies(), "adapters", lambda item: item)


@pytest.mark.parametrize("n", [pytest.param(FAST["raw"], id="fast"),
                               pytest.param(SLOW["raw"], id="soak", marks=pytest.mark.slow)])
def test_fuzz_raw_bytes(fuzz_http, n):
    """Undecodable bodies (invalid UTF-8, broken or deeply nested JSON) are 400s, never 500s."""
    stats: Counter = Counter()
    started = time.monotonic()

    @fuzz_settings(n)
    @given(path=st.sampled_from(["completions", "chat/completions", "load_lora_adapter"]), raw=raw_bodies)
    @example(path="completions", raw=b'{"model": "a1", "prompt": "\xff\xfe"}')
    @example(path="completions", raw=b'{"model": "a1", "prompt": "\xed\xa0\x80"}')
    @example(path="chat/completions", raw=b'{"messages": [{"role": "user", "content": "\\ud800"}]}')
    def check(path, raw):
        stats[check_call(fuzz_http, path, None, raw)] += 1

    check()
    assert sum(stats.values()) >= n and any(k.endswith(":400") for k in stats), stats
    after_fuzz(fuzz_http, stats, f"fuzz-http-raw-{n}", started)
