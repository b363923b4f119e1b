"""End-to-end tests of the gRPC server's API over loopback sockets, on an in-process server (an asyncio loop on a
background thread, port 0): health and reflection, generation, error statuses, adapters, metrics, the clients.
Start-up / drain, a real ``aspen serve`` subprocess, auth and TLS: tests/server/test_deployment.py."""
from __future__ import annotations

import asyncio
import re
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from aspen.cli import main as cli_main
from clients.aspen.v1 import aspen_pb2 as pb
from clients.client import AspenClient, AsyncAspenClient, build_request
from engine.server import status as errs
from tests.helpers.metrics import VLLM_NAMES, gauge, scrape
from tests.helpers.server import LONG, ServerThread, build_assets, collect_stream
from tests.helpers.statuses import expect_error

GREEDY = {"max_new_tokens": 12, "temperature": 0.0, "ignore_eos": True}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_assets(tmp_path_factory.mktemp("server"))


@pytest.fixture(scope="module")
def served(assets):
    s = ServerThread(assets, metrics_port=0)
    yield s
    s.stop()


@pytest.fixture()
def client(served):
    with AspenClient(served.address, timeout=30) as c:
        yield c


def bad_field(fn) -> str:
    d = expect_error(fn, grpc.StatusCode.INVALID_ARGUMENT)
    return d["BadRequest"].field_violations[0].field


def test_health_and_reflection(served):
    with grpc.insecure_channel(served.address) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for name in ("", "aspen.v1.GenerationService", "aspen.v1.AdapterService"):
            resp = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        reply = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                               timeout=5))
        names = {s.name for s in reply.list_services_response.service}
    assert names == {"aspen.v1.GenerationService", "aspen.v1.AdapterService", "grpc.health.v1.Health",
                     "grpc.reflection.v1alpha.ServerReflection"}


def test_unary_and_stream_agree_across_adapters_concurrently(served, client):
    adapters = [None, "a1", "team/a2", None, "a1"]
    with ThreadPoolExecutor(len(adapters) * 2) as pool:
        unary = [pool.submit(client.generate, "The quick brown fox", a, **GREEDY) for a in adapters]
        streamed = [pool.submit(collect_stream, client, "The quick brown fox", a, **GREEDY) for a in adapters]
        unary, streamed = [f.result() for f in unary], [f.result() for f in streamed]
    for u, (text, ids, last) in zip(unary, streamed):
        assert u.finish_reason == last.finish_reason == pb.FINISH_REASON_LENGTH
        assert (u.text, list(u.token_ids)) == (text, ids) and len(ids) == 12
        assert last.usage.completion_tokens == u.usage.completion_tokens == 12
        assert last.usage.prompt_tokens == u.usage.prompt_tokens > 0
    assert unary[0].token_ids == unary[3].token_ids and unary[1].token_ids == unary[4].token_ids
    assert len({tuple(u.token_ids) for u in unary[:3]}) == 3  # each adapter really changes the output
    ids = client.tokenize("The quick brown fox")
    by_ids = client.generate(ids, "a1", **GREEDY)
    assert by_ids.token_ids == unary[1].token_ids and by_ids.adapter_id == "a1"
    with_lp = client.generate(ids, None, max_new_tokens=3, temperature=0.0, logprobs=2, ignore_eos=True)
    assert len(with_lp.logprobs) == 3 and all(len(lp.top) == 2 for lp in with_lp.logprobs)
    assert served.wait_idle()["kv_blocks_used"] == 0


def test_bad_requests_get_invalid_argument_with_field(served, client):
    stub = client.generation
    assert bad_field(lambda: client.generate("hi", top_p=2.0)) == "params.top_p"
    assert bad_field(lambda: client.generate("hi", temperature=-1.0)) == "params.temperature"
    assert bad_field(lambda: client.generate("hi", max_new_tokens=0)) == "params.max_new_tokens"
    assert bad_field(lambda: client.generate("hi", max_new_tokens=600)) == "params.max_new_tokens"
    assert bad_field(lambda: client.generate([5] * 600, max_new_tokens=1)) == "token_ids.ids"
    assert bad_field(lambda: client.generate("")) == "text"
    assert bad_field(lambda: client.generate([])) == "token_ids.ids"
    assert bad_field(lambda: client.generate([5, 6, 100000])) == "token_ids.ids"
    assert bad_field(lambda: stub.Generate(pb.GenerateRequest(), timeout=5)) == "prompt"
    assert bad_field(lambda: list(client.stream("hi", seed=-1))) == "params.seed"
    assert bad_field(lambda: client.generate("hi", "../escape")) == "adapter_id"
    assert bad_field(lambda: client.generate("hi", "/abs/path")) == "adapter_id"
    assert client.generate("hi", max_new_tokens=2).usage.completion_tokens >= 1  # still serving


def test_adapter_errors_map_to_codes(served, assets, client):
    d = expect_error(lambda: client.generate("hi", "missing"), grpc.StatusCode.NOT_FOUND)
    assert (d["ResourceInfo"].resource_type, d["ResourceInfo"].resource_name) == ("adapter", "missing")
    d = expect_error(lambda: list(client.stream("hi", "missing")), grpc.StatusCode.NOT_FOUND)
    assert d["ResourceInfo"].resource_name == "missing"
    d = expect_error(lambda: client.generate("hi", "bad"), grpc.StatusCode.FAILED_PRECONDITION)
    assert d["PreconditionFailure"].violations[0].type == "ADAPTER_INCOMPATIBLE"
    for path in ("../base", assets["base"], "a1/../../base"):
        assert bad_field(lambda p=path: client.load_adapter("x", p)) == "path"
    assert bad_field(lambda: client.load_adapter("bad id!")) == "adapter_id"
    d = expect_error(lambda: client.load_adapter("x", "no/such/dir"), grpc.StatusCode.NOT_FOUND)
    assert d["ResourceInfo"].resource_name == "x"
    expect_error(lambda: client.unload_adapter("never-loaded"), grpc.StatusCode.NOT_FOUND)
    assert client.generate("hi", "a1", max_new_tokens=2).usage.completion_tokens >= 1  # still serving


def test_busy_adapter_and_duplicate_request_id(served, client):
    stream = client.generation.GenerateStream(build_request("hello", "team/a2", "dup-1", **LONG), timeout=30)
    try:
        assert next(stream).token_ids  # running: KV blocks allocated, adapter pinned
        d = expect_error(lambda: client.unload_adapter("team/a2"), grpc.StatusCode.FAILED_PRECONDITION)
        assert d["PreconditionFailure"].violations[0].type == "ADAPTER_BUSY"
        d = expect_error(lambda: client.generate("hi", request_id="dup-1"), grpc.StatusCode.ALREADY_EXISTS)
        assert d["ResourceInfo"].resource_name == "dup-1"
    finally:
        stream.cancel()
    state = served.wait_idle()
    assert (state["kv_blocks_used"], state["adapter_pins"], state["tracked"]) == (0, 0, 0)
    client.unload_adapter("team/a2")  # free now
    assert client.generate("hi", request_id="dup-1", max_new_tokens=2).request_id == "dup-1"


def test_cancel_and_deadline_abort_in_engine(served, client, monkeypatch):
    llm, aborted = served.server.engine, []
    real_abort = llm.abort
    monkeypatch.setattr(llm, "abort", lambda rid: (aborted.append(rid), real_abort(rid))[1])
    real_run = llm.runner.run
    # at least 5 ms a step, so a LONG stream outlasts the 0.5 s deadlines below however fast the machine is
    monkeypatch.setattr(llm.runner, "run", lambda *a, **k: (time.sleep(0.005), real_run(*a, **k))[1])
    stream = client.generation.GenerateStream(build_request("Tom took the red ball", "a1", "cancel-me", **LONG),
                                              timeout=30)
    assert next(stream).token_ids and next(stream).token_ids
    stream.cancel()
    late = client.generation.GenerateStream(build_request("A small cat", "team/a2", "deadline-me", **LONG),
                                            timeout=0.5)
    assert next(late).token_ids  # running when the deadline expires
    with pytest.raises(grpc.RpcError) as info:
        for _ in late:
            pass
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    expect_error(lambda: client.generate("A small cat", "a1", request_id="deadline-unary", timeout=0.5, **LONG),
                 grpc.StatusCode.DEADLINE_EXCEEDED)
    state = served.wait_idle()
    assert (state["kv_blocks_used"], state["adapter_pins"], state["running"], state["waiting"]) == (0, 0, 0, 0)
    assert {"cancel-me", "deadline-me", "deadline-unary"} <= set(aborted)  # aborted, not run to completion
    assert served.server.async_engine.num_in_flight == 0


def test_jit_load_list_and_unload(served, client):
    tiers = {a.adapter_id: a for a in client.list_adapters()}
    assert tiers["a3"].tier == pb.ADAPTER_TIER_DISK and not tiers["a3"].registered
    assert (tiers["a3"].rank, list(tiers["a3"].target_modules)) == (2, ["o_proj"])
    assert client.generate("hi", "a3", max_new_tokens=2).usage.completion_tokens == 2  # loaded just in time
    tiers = {a.adapter_id: a for a in client.list_adapters()}
    assert tiers["a3"].tier == pb.ADAPTER_TIER_DEVICE and tiers["a3"].registered
    info = client.load_adapter("alias/one", "a1")
    assert (info.rank, info.path, info.tier) == (4, "a1", pb.ADAPTER_TIER_DEVICE)
    assert client.generate("hi", "alias/one", **GREEDY).token_ids == client.generate("hi", "a1", **GREEDY).token_ids
    client.unload_adapter("alias/one")
    assert "alias/one" not in {a.adapter_id for a in client.list_adapters()}
    info = client.model_info()
    assert (info.base_model, info.model_family, info.max_context_tokens, info.vocab_size) == ("base", "llama", 512,
                                                                                             320)
    assert info.adapters_enabled and info.quantization == pb.QUANTIZATION_NONE and info.dtype == "float32"


def test_unexpected_errors_are_internal_and_generic(served, client, monkeypatch):
    def broken(text):
        raise RuntimeError("secret /etc/aspen/key.pem")

    monkeypatch.setattr(served.server.engine, "tokenize", broken)
    with pytest.raises(grpc.RpcError) as info:
        client.tokenize("hi")
    assert info.value.code() == grpc.StatusCode.INTERNAL and "secret" not in info.value.details()
    status, text = errs.engine_error("RuntimeError: CUDA exploded at /srv/x", "r1", "")
    assert status.code == grpc.StatusCode.INTERNAL and "/srv/x" not in text
    assert errs.engine_error("AdapterNotFoundError: gone", "r1", "a")[0].code == grpc.StatusCode.NOT_FOUND


def test_async_client_and_cli(served, capsys):
    async def main():
        async with AsyncAspenClient(served.address, timeout=10) as c:
            unary = await c.generate("The quick", "a1", **GREEDY)
            deltas = [m async for m in c.stream("The quick", "a1", **GREEDY)]
            return unary, deltas

    unary, deltas = asyncio.run(main())
    assert unary.text == "".join(m.text for m in deltas) and deltas[-1].finish_reason == pb.FINISH_REASON_LENGTH
    argv = ["generate", "--server", served.address, "--adapter", "a1", "--max-new-tokens", "12", "--temperature",
            "0", "--ignore-eos", "The quick"]
    assert cli_main(argv) == 0 and capsys.readouterr().out == unary.text + "\n"
    assert cli_main(["adapters", "list", "--server", served.address]) == 0
    assert re.search(r"^a1 +device +4 +q_proj,v_proj", capsys.readouterr().out, re.MULTILINE)
    assert cli_main(["adapters", "load", "cli/a3", "--path", "a3", "--server", served.address]) == 0
    assert cli_main(["adapters", "unload", "cli/a3", "--server", served.address]) == 0
    assert cli_main(["adapters", "unload", "cli/a3", "--server", served.address]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err


def test_metrics_endpoint(served, client):
    client.generate("hi", "a1", max_new_tokens=3)
    text = scrape(served.server.metrics_port)
    for name in VLLM_NAMES + ("kv_blocks_used", "adapter_pins_in_use", "adapter_cache_hits_total",
                              "adapter_cache_request_hits_total", "adapter_cache_request_misses_total",
                              "adapter_cache_loads_total", "adapter_cache_evictions_total",
                              "adapter_load_seconds_total"):
        assert re.search(rf"^aspen:{name}[{{_ ]", text, re.MULTILINE), name
    assert 'running_lora_adapters=""' in text and 'max_lora="8"' in text
    assert gauge(text, "generation_tokens_total") >= 3
    served.wait_idle()
    text = scrape(served.server.metrics_port)
    assert gauge(text, "kv_blocks_used") == 0 and gauge(text, "adapter_pins_in_use") == 0
