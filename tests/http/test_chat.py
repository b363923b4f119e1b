"""``/v1/chat/completions`` through the official ``openai`` client: greedy outputs equal the gRPC server's chat
outputs (base model and two adapters in flight at once, unary and streamed), OpenAI's chunk format, log-probs,
the output filling the rest of the context without ``max_tokens``, and refusals naming the field."""
from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from clients.client import AspenClient
from tests.helpers.server import wait_engine_idle

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "The quick brown fox"}]
TOKENS = 10


@pytest.fixture(scope="module")
def chat_reference(http_server):
    with AspenClient(http_server.address, timeout=30) as c:
        return {a: c.generate(MESSAGES, a, max_new_tokens=TOKENS, temperature=0.0)
                for a in (None, "a1", "team/a2")}


async def _chat(c: openai.AsyncOpenAI, model: str, stream: bool) -> tuple[str, str, int]:
    kw = {"model": model, "messages": MESSAGES, "max_completion_tokens": TOKENS, "temperature": 0.0}
    if not stream:
        r = await c.chat.completions.create(**kw)
        assert r.choices[0].message.role == "assistant"
        return r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens
    chunks = [x async for x in await c.chat.completions.create(**kw, stream=True,
                                                                 stream_options={"include_usage": True})]
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    finish = [x.choices[0].finish_reason for x in chunks[:-1]]
    assert all(f is None for f in finish[:-1]) and finish[-1] is not None
    text = "".join(x.choices[0].delta.content or "" for x in chunks[:-1])
    return text, finish[-1], chunks[-1].usage.completion_tokens


def test_greedy_chat_equals_grpc_chat_for_base_and_two_adapters_in_flight_at_once(http_server, chat_reference):
    models = {http_server.options.model_name: None, "a1": "a1", "team/a2": "team/a2"}

    async def run():
        async with openai.AsyncOpenAI(base_url=http_server.http_url, api_key="x", max_retries=0, timeout=60) as c:
            jobs = [(m, s) for m in models for s in (False, True) for _ in range(2)]
            return jobs, await asyncio.gather(*(_chat(c, m, s) for m, s in jobs))

    jobs, results = asyncio.run(run())
    finish = {1: "length", 2: "stop", 3: "stop"}  # FINISH_REASON_LENGTH, _EOS (end of turn), _STOP
    for (model, stream), (text, reason, tokens) in zip(jobs, results):
        ref = chat_reference[models[model]]
        assert (text, reason, tokens) == (ref.text, finish[ref.finish_reason], len(ref.token_ids)), (model, stream)
    assert wait_engine_idle(http_server)["kv_blocks_used"] == 0


def test_chat_logprobs_and_text_parts(client, chat_reference):
    ref = chat_reference["a1"]
    parts = [MESSAGES[0], {"role": "user", "content": [{"type": "text", "text": "The quick "},
                                                       {"type": "text", "text": "brown fox"}]}]
    r = client.chat.completions.create(model="a1", messages=parts, max_tokens=TOKENS, temperature=0.0,
                                       logprobs=True, top_logprobs=3)
    assert r.choices[0].message.content == ref.text
    content = r.choices[0].logprobs.content
    assert len(content) == len(ref.token_ids) and all(len(t.top_logprobs) == 3 for t in content)
    assert "".join(t.token for t in content) == ref.text
    assert all(bytes(t.bytes).decode("utf-8", "replace") == t.token for t in content)


def test_without_max_tokens_the_output_may_fill_the_context(client, http_server):
    r = client.chat.completions.create(model="team/a2", messages=MESSAGES, temperature=0.0,
                                       extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens + r.usage.completion_tokens == http_server.server.engine.max_model_len


@pytest.mark.parametrize("kw, param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ({"messages": [{"role": "user"}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages.0.content"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"max_completion_tokens": 10_000}, "max_completion_tokens"),
    ({"max_tokens": 10_000}, "max_tokens"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"messages": [{"role": "user", "content": "x" * 2_000_000}]}, "messages"),
    ({"model": "missing"}, "model"),
])
def test_chat_refusals_name_the_field(http_server, kw, param):
    body = {"model": "a1", "messages": MESSAGES, "max_tokens": 2, **kw}
    got = httpx.post(f"{http_server.http_url}/chat/completions", json=body, timeout=30)
    assert got.status_code == (404 if param == "model" else 400), got.text
    assert got.json()["error"]["param"] == param, got.text
