"""End-to-end tests of how the gRPC server is run: start-up and drain (UNAVAILABLE while loading or draining, a
full queue, SIGTERM on a real ``aspen serve`` subprocess with its metrics endpoint) and transport security (bearer
token, TLS). The API itself (generation, errors, adapters, metrics) is covered in tests/server/test_api.py."""
from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients.aspen.v1 import aspen_pb2 as pb
from clients.client import AspenClient, build_request
from engine import LLMEngine
from tests.helpers.certs import self_signed_cert
from tests.helpers.metrics import VLLM_NAMES, gauge, scrape
from tests.helpers.server import ENGINE, LONG, ServerThread, aspen_command, build_assets, collect_stream
from tests.helpers.statuses import expect_error


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_assets(tmp_path_factory.mktemp("server_deployment"))


def test_queue_full_and_unavailable_while_starting_or_draining(assets):
    gate = threading.Event()

    def slow_factory():
        gate.wait(10)
        return LLMEngine(model=assets["base"], adapter_dir=assets["adapters"], progress=False,
                         **{**ENGINE, "max_num_seqs": 1, "max_waiting": 1})

    s = ServerThread(assets, start=False, factory=slow_factory, grace_period=5.0)
    try:
        with AspenClient(s.address, timeout=10) as c, grpc.insecure_channel(s.address) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
                health_pb2.HealthCheckResponse.NOT_SERVING
            d = expect_error(lambda: c.generate("hi"), grpc.StatusCode.UNAVAILABLE)
            assert "RetryInfo" in d
            gate.set()
            s.run(s.server.load())
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
                health_pb2.HealthCheckResponse.SERVING
            first = c.generation.GenerateStream(build_request("one", **LONG), timeout=30)
            assert next(first).token_ids  # running (the only slot)
            second = c.generation.GenerateStream(build_request("two", **LONG), timeout=30)
            deadline = time.monotonic() + 5
            while s.server.engine.scheduler.num_waiting < 1 and time.monotonic() < deadline:
                time.sleep(0.02)
            d = expect_error(lambda: c.generate("three"), grpc.StatusCode.RESOURCE_EXHAUSTED)
            assert d["RetryInfo"].retry_delay.ToTimedelta().total_seconds() > 0
            second.cancel()
            stopping = asyncio.run_coroutine_threadsafe(s.server.stop(), s.loop)
            time.sleep(0.2)
            d = expect_error(lambda: c.generate("four"), grpc.StatusCode.UNAVAILABLE)
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
                health_pb2.HealthCheckResponse.NOT_SERVING
            s.loop.call_soon_threadsafe(s.server.force)  # as a second SIGTERM: cancel what still runs
            assert stopping.result(10) is False
            with pytest.raises(grpc.RpcError):
                list(first)
    finally:
        gate.set()
        s.stop()


def test_bearer_token_auth(assets):
    s = ServerThread(assets, auth_token="s3cret-token")
    try:
        for token in (None, "wrong"):
            with AspenClient(s.address, token=token, timeout=10) as c:
                expect_error(lambda: c.generate("hi", max_new_tokens=2), grpc.StatusCode.UNAUTHENTICATED)
                expect_error(lambda: list(c.stream("hi", max_new_tokens=2)), grpc.StatusCode.UNAUTHENTICATED)
                expect_error(c.list_adapters, grpc.StatusCode.UNAUTHENTICATED)
        with AspenClient(s.address, token="s3cret-token", timeout=10) as c:
            assert c.generate("hi", max_new_tokens=2).usage.completion_tokens == 2
            assert collect_stream(c, "hi", "a1", max_new_tokens=2)[2].finish_reason != pb.FINISH_REASON_UNSPECIFIED
        with grpc.insecure_channel(s.address) as ch:  # probes need no token
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        s.stop()


def test_tls_round_trip(assets, tmp_path):
    cert, key = self_signed_cert(str(tmp_path))
    s = ServerThread(assets, tls_cert=cert, tls_key=key)
    try:
        with AspenClient(f"localhost:{s.port}", tls_ca=cert, timeout=10) as c:
            assert c.generate("hi", "a1", max_new_tokens=3).usage.completion_tokens == 3
        with AspenClient(s.address, timeout=3) as plain:  # a plaintext client cannot talk to a TLS port
            expect_error(lambda: plain.generate("hi", max_new_tokens=1), grpc.StatusCode.UNAVAILABLE)
    finally:
        s.stop()


def test_serve_subprocess_drains_on_sigterm(assets, tmp_path):
    log_path = tmp_path / "serve.log"
    cmd = aspen_command() + ["serve", "--model", assets["base"], "--adapter-dir", assets["adapters"], "--port", "0",
                             "--http-port", "0", "--metrics-port", "0", "--kv-cache-mb", "8",
                             "--grace-period", "20"]
    env = {**os.environ, "ASPEN_HOME": str(tmp_path / "home")}
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    try:
        deadline, match = time.monotonic() + 60, None
        while match is None and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
            match = re.search(r"ready on ([\d.]+):(\d+) .*metrics on http://[\d.]+:(\d+)/metrics",
                              log_path.read_text())
        assert match, log_path.read_text()
        address, metrics_port = f"{match.group(1)}:{match.group(2)}", int(match.group(3))
        with AspenClient(address, timeout=60) as c:
            text = scrape(metrics_port)
            assert all(re.search(rf"^aspen:{n}", text, re.MULTILINE) for n in VLLM_NAMES[:3] + ("kv_blocks_used",))
            params = {"max_new_tokens": 450, "temperature": 0.0, "ignore_eos": True}
            streams = [c.generation.GenerateStream(build_request(f"stream {i}", a, **params), timeout=60)
                       for i, a in enumerate([None, "a1", "team/a2"])]
            firsts = [next(s) for s in streams]
            proc.send_signal(signal.SIGTERM)
            assert gauge(scrape(metrics_port), "num_requests_running") >= 1  # still running while draining
            time.sleep(0.2)
            expect_error(lambda: c.generate("late", max_new_tokens=2), grpc.StatusCode.UNAVAILABLE)
            for first, s in zip(firsts, streams):
                msgs = [first] + list(s)
                assert msgs[-1].finish_reason == pb.FINISH_REASON_LENGTH
                assert sum(len(m.token_ids) for m in msgs) == 450 == msgs[-1].usage.completion_tokens
        assert proc.wait(30) == 0, log_path.read_text()
        assert "server stopped (drained)" in log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
