"""Response formats composed with the rest of the engine: finish reasons, streaming, stop strings, seeds, logprobs,
preemption and recomputation, cancellation, prefix caching, and refusals before anything is queued."""
from __future__ import annotations

import asyncio
import json
import re
import threading
import time

import pytest
import torch

from engine import ResponseFormat, SamplingParams
from engine.async_engine import AsyncLLMEngine
from engine.scheduling.errors import RequestError
from engine.scheduling.response_format import ResponseFormatError
from engine.structured.bitmask import words_for
from tests.helpers.structured import MAX_FORMAT_TOKENS, check_output, formats
from tests.structured.conftest import make_engine, prompts

PERSON = formats()["schema:person"]
CODE = formats()["regex:code"]


def constrained(fmt=PERSON, **kw) -> SamplingParams:
    kw.setdefault("max_new_tokens", MAX_FORMAT_TOKENS)
    kw.setdefault("temperature", 0.0)
    return SamplingParams(response_format=fmt, **kw)


def test_finish_reasons(tiny_engine):
    choice = tiny_engine.generate([[5, 6, 7]], constrained(ResponseFormat.choice(["red", "green"])))[0]
    assert choice.finish_reason == "stop" and choice.stop_reason is None and choice.text in ("red", "green")
    assert 2 not in choice.token_ids  # the grammar ended the output: no EOS token was needed
    cut = tiny_engine.generate([[5, 6, 7]], constrained(max_new_tokens=3))[0]
    assert cut.finish_reason == "length" and len(cut.token_ids) == 3 and cut.text.startswith("{")
    # a format that may end or go on: the model ends it with EOS where the format allows it
    eos = tiny_engine.generate(prompts(24, 1), constrained(ResponseFormat.regex(r"[0-9]{1,40}"), temperature=1.0,
                                                           seed=3))
    assert {o.finish_reason for o in eos} <= {"eos", "stop"} and any(o.finish_reason == "eos" for o in eos)
    assert all(re.fullmatch(r"[0-9]{1,40}", o.text) for o in eos)


def test_json_object(tiny_engine):
    """Free JSON rarely closes its strings under a random model: the outputs are JSON objects from the first token,
    and the grammar itself is checked on complete objects (tests/structured/test_compiler.py)."""
    outs = tiny_engine.generate(prompts(8, 2), constrained(ResponseFormat.json_object(), max_new_tokens=40,
                                                            temperature=1.0, seed=11))
    for o in outs:
        assert o.text.startswith("{")
        if o.finish_reason in ("stop", "eos"):
            assert isinstance(json.loads(o.text), dict)


def test_streaming_deltas_add_up(tiny_engine):
    aeng = AsyncLLMEngine(tiny_engine).start()

    async def main():
        async def one(prompt, params):
            text, last = "", None
            async for out in aeng.generate(prompt, params):
                text += out.delta_text
                last = out
            return text, last

        return await asyncio.gather(*(one(p, constrained(f, temperature=0.8, seed=i))
                                      for i, (p, f) in enumerate(zip(prompts(6, 4), [PERSON, CODE] * 3))))

    try:
        results = asyncio.run(main())
    finally:
        aeng.shutdown()
    for (text, last), name in zip(results, ["schema:person", "regex:code"] * 3):
        assert last.finished and text == last.text
        check_output(name, text)


def test_stop_strings_cut_a_constrained_output(tiny_engine):
    full = tiny_engine.generate([[9, 10, 11]], constrained(CODE))[0]
    assert "-" in full.text
    cut = tiny_engine.generate([[9, 10, 11]], constrained(CODE, stop=["-"]))[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == "-"
    assert cut.text == full.text.split("-")[0]


def test_seeded_constrained_output_independent_of_the_batch(tiny_engine):
    params = constrained(PERSON, temperature=1.0, top_p=0.95, seed=1234)
    prompt = prompts(1, 5)[0]
    alone = tiny_engine.generate([prompt], params, ["a1"])[0]
    others = [constrained(CODE, temperature=1.0), SamplingParams(max_new_tokens=30, temperature=1.0),
              constrained(formats()["schema:tool_call"], temperature=0.7)]
    batch = tiny_engine.generate(prompts(3, 6) + [prompt], others + [params], ["a0", None, "a2", "a1"])
    assert batch[-1].token_ids == alone.token_ids
    check_output("schema:person", alone.text)


def test_logprobs_are_those_of_the_constrained_distribution(tiny_engine):
    out = tiny_engine.generate([[5, 6, 7, 8]], constrained(PERSON, temperature=1.0, seed=2, logprobs=5))[0]
    assert len(out.logprobs) == len(out.token_ids)
    replay = tiny_engine.grammars.matcher(PERSON)
    row = torch.empty(words_for(replay.vocab_size), dtype=torch.int32)
    for i, lp in enumerate(out.logprobs):
        assert lp.token_id == out.token_ids[i] and lp.logprob <= 0 and lp.logprob != float("-inf")
        assert replay.fill_bitmask(row, out.token_ids[:i])
        allowed = {t for t in range(tiny_engine.model.config.vocab_size) if (int(row[t // 32]) >> (t % 32)) & 1}
        assert lp.token_id in allowed
        assert 1 <= len(lp.top) <= 5 and {t for t, _ in lp.top} <= allowed
        if len(allowed) == 1:  # a forced token has probability 1
            assert abs(lp.logprob) < 1e-5


def test_preemption_and_recompute_keep_the_matcher_in_step(tiny_setup):
    names = (list(formats()) * 2)[:30]
    work = [(p, constrained(formats()[n])) for p, n in zip(prompts(30, 7), names)]
    roomy = make_engine(tiny_setup)
    alone = [roomy.generate([p], sp)[0].token_ids for p, sp in work]
    tight = make_engine(tiny_setup, num_kv_blocks=64, max_model_len=256)
    outs = tight.generate([p for p, _ in work], [sp for _, sp in work])
    assert tight.scheduler.stats().num_preemptions > 0
    assert [o.token_ids for o in outs] == alone
    for name, o in zip(names, outs):
        check_output(name, o.text)
    assert tight.check_invariants()["kv_blocks_used"] == 0


def test_cancelled_constrained_requests_free_everything(tiny_engine):
    ids = [tiny_engine.add_request(p, constrained(f, temperature=1.0), a)
           for p, f, a in zip(prompts(8, 9), [PERSON, CODE] * 4, [None, "a0", "a1", "a2"] * 2)]
    for _ in range(3):
        tiny_engine.step()
    for rid in ids[::2]:
        tiny_engine.abort(rid)
    finished = {}
    while tiny_engine.has_work():
        for o in tiny_engine.step():
            if o.finished:
                finished[o.request_id] = o
    assert {finished[r].finish_reason for r in ids[::2]} == {"aborted"}
    for rid, name in zip(ids[1::2], ["regex:code"] * 4):
        assert finished[rid].finish_reason in ("stop", "eos")
        check_output(name, finished[rid].text)
    assert tiny_engine.check_invariants() == {"kv_blocks_used": 0, "adapter_pins": 0, "running": 0, "waiting": 0,
                                              "tracked": 0}


def test_prefix_cache_shared_between_constrained_and_free_requests(tiny_setup):
    eng = make_engine(tiny_setup)
    system = prompts(1, 11)[0][:4] * 8  # 32 shared tokens = 8 full blocks
    free = eng.generate([system + [5, 6]], SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True),
                        ["a1"])[0]
    fmt = eng.generate([system + [7, 8]], constrained(PERSON), ["a1"])[0]
    again = eng.generate([system + [7, 8]], constrained(PERSON), ["a1"])[0]
    assert free.num_cached_tokens == 0 and fmt.num_cached_tokens >= 28 and again.num_cached_tokens >= 32
    assert again.token_ids == fmt.token_ids
    check_output("schema:person", fmt.text)
    cold = make_engine(tiny_setup, enable_prefix_caching=False)
    assert cold.generate([system + [7, 8]], constrained(PERSON), ["a1"])[0].token_ids == fmt.token_ids


@pytest.mark.parametrize(("fmt", "field", "needle"), [
    (ResponseFormat.json_schema("{not json"), "response_format.json_schema", "not valid JSON"),
    (ResponseFormat.json_schema("[1, 2]"), "response_format.json_schema", "object or a boolean"),
    (ResponseFormat.json_schema({"type": "array", "uniqueItems": True}), "response_format.json_schema",
     "uniqueItems"),
    (ResponseFormat.json_schema({"type": "integer", "minimum": "x"}), "response_format.json_schema", "minimum"),
    (ResponseFormat.json_schema({"$ref": "#/$defs/missing"}), "response_format.json_schema", "missing"),
    (ResponseFormat.regex("(a"), "response_format.regex", "unclosed group"),
    (ResponseFormat.regex("(?=a)b"), "response_format.regex", "look"),
    (ResponseFormat.grammar("start: undefined_rule"), "response_format.grammar", "undefined_rule"),
])
def test_bad_formats_refused_before_queueing(tiny_engine, fmt, field, needle):
    with pytest.raises(ResponseFormatError, match=needle) as info:
        tiny_engine.add_request([5, 6], constrained(fmt))
    assert isinstance(info.value, RequestError) and info.value.field == field
    assert not tiny_engine.has_work() and tiny_engine.check_invariants()["tracked"] == 0


def test_slow_compile_refused_while_other_requests_decode(tiny_setup, monkeypatch):
    eng = make_engine(tiny_setup, grammar_compile_timeout_s=0.3)
    real = eng.grammars._build
    release = threading.Event()

    def slow(fmt):
        if fmt.kind == "regex":
            release.wait(5)
        return real(fmt)

    monkeypatch.setattr(eng.grammars, "_build", slow)
    refused = {}

    def add_slow():
        try:
            eng.add_request([5, 6], constrained(ResponseFormat.regex("[a-z]{3}")))
        except ResponseFormatError as e:
            refused["error"] = e

    slow_thread = threading.Thread(target=add_slow)
    slow_thread.start()
    started = time.monotonic()
    out = eng.generate([[7, 8, 9]], constrained(PERSON))[0]  # compiles and decodes meanwhile
    check_output("schema:person", out.text)
    slow_thread.join(5)
    release.set()
    assert "took longer than 0.3 s" in str(refused["error"]) and refused["error"].field == "response_format.regex"
    assert time.monotonic() - started < 5
    assert eng.grammars.stats().timeouts == 1
    # the compile finished in the background and was cached: the same format is served now
    deadline = time.monotonic() + 5
    while eng.grammars.stats().cached < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    ok = eng.generate([[5, 6]], constrained(ResponseFormat.regex("[a-z]{3}")))[0]
    assert len(ok.text) == 3 and ok.finish_reason == "stop"


def test_grammar_failure_mid_generation_fails_only_its_request(tiny_setup):
    eng = make_engine(tiny_setup)
    victim = eng.add_request([5, 6, 7], constrained(PERSON, temperature=1.0, seed=1))
    other = eng.add_request([8, 9, 10], constrained(CODE))
    eng.step()
    matcher = eng._states[victim].sampling.matcher
    matcher._error = "the grammar engine cannot follow the format here: injected"  # as after a matcher ran out of fuel
    outs = {}
    while eng.has_work():
        outs.update({o.request_id: o for o in eng.step() if o.finished})
    assert outs[victim].finish_reason == "error"
    assert "ResponseFormatError: response_format.json_schema: the grammar engine cannot follow" in outs[victim].error
    check_output("regex:code", outs[other].text)
    assert eng.check_invariants()["tracked"] == 0
