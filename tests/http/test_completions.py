"""``/v1/completions``, ``/v1/models`` and vLLM's adapter endpoints through the official ``openai`` client: greedy
outputs equal the gRPC server's for the same request (base model and two adapters in flight at once, unary and
streamed), the listing shows the adapters, load / unload work under the adapter root's confinement, and every
refusal is the OpenAI error the client raises as its typed exception, with the field at fault."""
from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from clients.client import AspenClient
from tests.helpers.server import wait_engine_idle
from tests.http.conftest import PROMPT, REFERENCE_TOKENS

GREEDY = {"temperature": 0.0, "extra_body": {"ignore_eos": True}}


async def _completion(c: openai.AsyncOpenAI, model: str, stream: bool) -> tuple[str, str, dict]:
    if not stream:
        r = await c.completions.create(model=model, prompt=PROMPT, max_tokens=REFERENCE_TOKENS, **GREEDY)
        return r.choices[0].text, r.choices[0].finish_reason, r.usage.model_dump()
    text, finish, usage = "", None, None
    chunks = await c.completions.create(model=model, prompt=PROMPT, max_tokens=REFERENCE_TOKENS, stream=True,
                                        stream_options={"include_usage": True}, **GREEDY)
    async for chunk in chunks:
        if chunk.choices:
            text += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason or finish
        usage = chunk.usage.model_dump() if chunk.usage else usage
    return text, finish, usage


def test_greedy_completions_equal_grpc_for_base_and_two_adapters_in_flight_at_once(http_server):
    models = {http_server.options.model_name: None, "a1": "a1", "team/a2": "team/a2"}

    async def run():
        async with openai.AsyncOpenAI(base_url=http_server.http_url, api_key="x", max_retries=0, timeout=60) as c:
            jobs = [(m, s) for m in models for s in (False, True) for _ in range(2)]
            return jobs, await asyncio.gather(*(_completion(c, m, s) for m, s in jobs))

    jobs, results = asyncio.run(run())
    for (model, stream), (text, finish, usage) in zip(jobs, results):
        ref = http_server.reference[models[model]]
        assert (text, finish) == (ref.text, "length"), (model, stream)
        assert usage["completion_tokens"] == REFERENCE_TOKENS == len(ref.token_ids)
        assert usage["prompt_tokens"] == ref.usage.prompt_tokens
        assert usage["total_tokens"] == usage["prompt_tokens"] + REFERENCE_TOKENS
    assert wait_engine_idle(http_server)["kv_blocks_used"] == 0


def test_token_id_prompts_batches_logprobs_and_stop(http_server, client):
    with AspenClient(http_server.address, timeout=30) as g:
        ids = g.tokenize(PROMPT)
        ref = g.generate(list(ids), "a1", max_new_tokens=6, temperature=0.0, ignore_eos=True, logprobs=2)
    r = client.completions.create(model="a1", prompt=list(ids), max_tokens=6, logprobs=2, **GREEDY)
    assert r.choices[0].text == ref.text
    lp = r.choices[0].logprobs
    assert [round(x, 4) for x in lp.token_logprobs] == [round(x.logprob, 4) for x in ref.logprobs]
    assert len(lp.tokens) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    assert all(1 <= len(top) <= 2 for top in lp.top_logprobs) and lp.text_offset[0] == 0
    # a list of prompts, n choices each: index = prompt * n + choice; each prompt counted once in usage
    r = client.completions.create(model="a1", prompt=[list(ids), list(ids)], n=2, max_tokens=6, **GREEDY)
    assert [c.index for c in r.choices] == [0, 1, 2, 3] and {c.text for c in r.choices} == {ref.text}
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (2 * len(ids), 4 * 6)
    # a stop string ends the output before it; vLLM's stop_reason names it
    stop = ref.text[2:4]
    r = client.completions.create(model="a1", prompt=list(ids), max_tokens=6, stop=[stop], temperature=0.0)
    assert r.choices[0].finish_reason == "stop" and r.choices[0].text == ref.text[:ref.text.index(stop)]
    assert r.choices[0].model_extra["stop_reason"] == stop


def test_sampling_with_a_seed_is_reproducible_and_n_choices_use_their_own_seeds(client, http_server):
    kw = {"model": "team/a2", "prompt": PROMPT, "max_tokens": 8, "temperature": 1.5, "seed": 7, "n": 3,
          "extra_body": {"top_k": -1, "min_p": 0.0, "ignore_eos": True}}
    first, again = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    single = client.completions.create(**{**kw, "n": 1})
    assert single.choices[0].text == first.choices[0].text


def test_structured_output_through_response_format(client, http_server):
    r = client.completions.create(model="a1", prompt=PROMPT, max_tokens=48, temperature=0.0,
                                  extra_body={"response_format": {"type": "json_object"}})
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].text), dict)
    r = client.completions.create(model="a1", prompt=PROMPT, max_tokens=8, temperature=0.0,
                                  extra_body={"guided_choice": ["yes", "no"]})
    assert r.choices[0].text in ("yes", "no") and r.choices[0].finish_reason == "stop"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="a1", prompt=PROMPT, max_tokens=4, extra_body={
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}})
    assert info.value.body["param"] == "response_format.json_schema.schema"


def test_models_list_shows_the_base_and_every_adapter_with_its_parent(client, http_server):
    base = http_server.options.model_name
    cards = {m.id: m for m in client.models.list().data}
    assert {base, "a1", "team/a2", "a3"} <= set(cards)
    assert cards[base].parent is None and cards[base].max_model_len == 256
    assert cards["team/a2"].parent == base and cards["team/a2"].root == "team/a2"
    assert client.models.retrieve("team/a2").id == "team/a2"
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("nope")
    assert info.value.body["code"] == "model_not_found"


def test_load_and_unload_through_the_vllm_endpoints(client, http_server):
    url, ref = http_server.http_url, http_server.reference["a1"]
    loaded = httpx.post(f"{url}/load_lora_adapter", json={"lora_name": "alias", "lora_path": "a1"})
    assert loaded.status_code == 200 and "alias" in loaded.text
    assert "alias" in {m.id for m in client.models.list().data}
    r = client.completions.create(model="alias", prompt=PROMPT, max_tokens=REFERENCE_TOKENS, **GREEDY)
    assert r.choices[0].text == ref.text
    assert httpx.post(f"{url}/unload_lora_adapter", json={"lora_name": "alias"}).status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="alias", prompt=PROMPT, max_tokens=2)
    for body, status, param in (({"lora_name": "x", "lora_path": "../base"}, 400, "lora_path"),
                                ({"lora_name": "x", "lora_path": "/etc"}, 400, "lora_path"),
                                ({"lora_name": "x", "lora_path": "missing"}, 404, "lora_path"),
                                ({"lora_name": "missing"}, 404, "lora_name"),
                                ({"lora_name": "bad"}, 400, None),
                                ({"lora_path": "a1"}, 400, "lora_name")):
        got = httpx.post(f"{url}/load_lora_adapter", json=body)
        assert (got.status_code, got.json()["error"]["param"]) == (status, param), (body, got.text)
    assert httpx.post(f"{url}/unload_lora_adapter", json={"lora_name": "never"}).status_code == 404
    assert wait_engine_idle(http_server)["adapter_pins"] == 0


@pytest.mark.parametrize("kw, param", [
    ({"temperature": -1.0}, "temperature"),
    ({"max_tokens": 10_000}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"extra_body": {"min_tokens": 5}, "max_tokens": 2}, "min_tokens"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": [1, 2, 10**6]}, "prompt"),
    ({"prompt": "x" * 2_000_000}, "prompt"),
    ({"seed": -1}, "seed"),
    ({"logprobs": 21}, "logprobs"),
    ({"top_p": 0.0}, "top_p"),
    ({"echo": True}, "echo"),
    ({"n": 0}, "n"),
    ({"n": 129}, "n"),
    ({"stop": ["x"] * 17}, "stop"),
    ({"extra_body": {"stop_token_ids": [10**9]}}, "stop_token_ids"),
    ({"extra_body": {"guided_regex": "(?=a)a"}}, "guided_regex"),
    ({"extra_body": {"guided_regex": "a", "guided_choice": ["a"]}}, "guided_regex"),
    ({"model": "../base"}, "model"),
    ({"extra_body": {"max_tokens": "8"}}, "max_tokens"),
    ({"extra_body": {"temperature": True}}, "temperature"),
])
def test_bad_requests_are_400_naming_the_field(client, http_server, kw, param):
    kw = {"model": "a1", "prompt": PROMPT, "max_tokens": 2, **kw}
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(**kw)
    body = info.value.body
    assert body["param"] == param and body["type"] == "invalid_request_error", body
    assert http_server.options.adapter_dir not in body["message"]


def test_unknown_models_are_404_and_raw_bodies_never_422(http_server, client):
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="missing", prompt=PROMPT, max_tokens=2)
    assert (info.value.body["param"], info.value.body["code"]) == ("model", "model_not_found")
    url = http_server.http_url
    for raw, param in ((b'{"prompt": "\xff\xfe"}', None), (b"[1, 2", None), (b"[]", None),
                       (b'{"prompt": 5}', "prompt"), (b'{"prompt": "x", "n": 1.5}', "n")):
        got = httpx.post(f"{url}/completions", content=raw, headers={"content-type": "application/json"})
        assert got.status_code == 400 and got.json()["error"]["param"] == param, (raw, got.text)
    assert httpx.get(f"{url}/nowhere").json()["error"]["type"] == "invalid_request_error"
    too_big = httpx.post(f"{url}/completions", content=b" " * (http_server.options.max_message_bytes + 1),
                         headers={"content-type": "application/json"})
    assert too_big.status_code == 413 and "max_message_bytes" in too_big.json()["error"]["message"]
    assert httpx.get(url.removesuffix("/v1") + "/health").status_code == 200
