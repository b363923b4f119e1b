"""The HTTP API's admission and security, each on a server of its own: a full queue is a 429 with
``Retry-After`` (``openai.RateLimitError``), a draining server answers 503 while in-flight streams finish, the
bearer token is required (``openai.AuthenticationError``) except on ``/health``, TLS and mutual TLS use the gRPC
server's certificates, and ``aspen serve`` itself serves HTTP and drains it on SIGTERM."""
from __future__ import annotations

import argparse
import json
import signal
import ssl
import threading
import time

import httpx
import openai
import pytest

from engine.server import command as serve_command
from engine.server.options import ServerOptions
from tests.helpers.certs import self_signed_cert
from tests.helpers.server import ServeProcess, ServerThread, shared_assets, wait_engine_idle

LONG = {"max_tokens": 300, "temperature": 0.0, "ignore_eos": True}


def _open_stream(http: httpx.Client, url: str, model: str):
    """A streamed completion that has sent its first chunk: (response context, line iterator)."""
    ctx = http.stream("POST", f"{url}/completions", json={"model": model, "prompt": "hi", "stream": True, **LONG})
    response = ctx.__enter__()
    assert response.status_code == 200, response.read()
    lines = response.iter_lines()
    assert next(line for line in lines if line.startswith("data: "))
    return ctx, lines


def _finish(ctx, lines) -> dict:
    events = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
    ctx.__exit__(None, None, None)
    assert events[-1] == "[DONE]"
    return json.loads(events[-2])


def test_a_full_queue_is_429_and_a_draining_server_503_while_streams_finish(tmp_path_factory):
    s = ServerThread(shared_assets(tmp_path_factory), http=True, grace_period=60,
                     engine={"max_num_seqs": 1, "max_waiting": 1})
    base, paused = s.options.model_name, s.server.engine._step_lock  # held: the engine takes no step
    stopped = threading.Event()
    try:
        with httpx.Client(timeout=60) as http, openai.OpenAI(base_url=s.http_url, api_key="x", max_retries=0) as c:
            with paused:  # a queued request fills the queue of one
                first = threading.Thread(target=lambda: c.completions.create(model=base, prompt="hi", max_tokens=2))
                first.start()
                deadline = time.monotonic() + 10
                while not s.server.engine.has_work() and time.monotonic() < deadline:
                    time.sleep(0.01)
                with pytest.raises(openai.RateLimitError) as info:
                    c.completions.create(model=base, prompt="hi", max_tokens=2)
            first.join(30)
            assert info.value.response.headers["retry-after"] == "1"
            assert (info.value.body["type"], info.value.body["code"]) == ("rate_limit_error", "queue_full")

            running = _open_stream(http, s.http_url, "a1")
            with paused:  # the stream is in flight when the drain begins
                stopper = threading.Thread(target=lambda: (s.stop(grace=60), stopped.set()))
                stopper.start()
                deadline = time.monotonic() + 10
                while s.server.state != "draining" and time.monotonic() < deadline:
                    time.sleep(0.01)
                with pytest.raises(openai.APIStatusError) as info:
                    c.completions.create(model=base, prompt="hi", max_tokens=2)
                assert info.value.status_code == 503 and info.value.response.headers["retry-after"] == "1"
                assert http.get(s.http_url.removesuffix("/v1") + "/health").status_code == 503
            last = _finish(*running)  # finishes in full
            assert last["choices"][0]["finish_reason"] == "length"
            stopper.join(30)
            assert stopped.is_set()
    finally:
        if not stopped.is_set():
            s.stop()


def test_token_tls_and_mutual_tls(tmp_path, tmp_path_factory):
    cert, key = self_signed_cert(str(tmp_path))
    assets = shared_assets(tmp_path_factory)
    s = ServerThread(assets, http=True, tls_cert=cert, tls_key=key, auth_token="s3cret")
    try:
        assert s.http_url.startswith("https://")
        trust = ssl.create_default_context(cafile=cert)
        tls = openai.DefaultHttpxClient(verify=trust)
        with pytest.raises(openai.AuthenticationError) as info:
            openai.OpenAI(base_url=s.http_url, api_key="wrong", max_retries=0, http_client=tls).models.list()
        assert info.value.body["code"] == "invalid_api_key"
        missing = httpx.get(f"{s.http_url}/models", verify=trust)
        assert missing.status_code == 401 and "missing" in missing.json()["error"]["message"]
        with openai.OpenAI(base_url=s.http_url, api_key="s3cret", max_retries=0, http_client=tls) as c:
            assert c.completions.create(model="a1", prompt="hi", max_tokens=3).usage.completion_tokens == 3
        assert httpx.get(s.http_url.removesuffix("/v1") + "/health", verify=trust).status_code == 200
        with pytest.raises(httpx.HTTPError):  # plain HTTP to a TLS port
            httpx.get(s.http_url.replace("https", "http") + "/models", timeout=5)
    finally:
        s.stop()
    s = ServerThread(assets, http=True, tls_cert=cert, tls_key=key, tls_client_ca=cert)
    try:
        with pytest.raises(httpx.HTTPError):  # no client certificate
            httpx.get(f"{s.http_url}/models", verify=ssl.create_default_context(cafile=cert), timeout=5)
        mine = ssl.create_default_context(cafile=cert)
        mine.load_cert_chain(cert, key)
        got = httpx.get(f"{s.http_url}/models", verify=mine, timeout=30)
        assert got.status_code == 200 and "a1" in got.text
    finally:
        s.stop()


def test_http_port_is_an_option_of_its_own():
    parser = argparse.ArgumentParser()
    serve_command.add_arguments(parser)
    assert serve_command.options_from_args(parser.parse_args(["--model", "m", "--http-port", "0"])).http_port == 0
    assert serve_command.options_from_args(parser.parse_args(["--model", "m"])).http_port == 8000
    assert ServerOptions().http_port == 8000
    with pytest.raises(ValueError, match="--http-port 50051 is also --port"):
        ServerOptions(http_port=50051)
    with pytest.raises(ValueError, match="ServerOptions.http_port must be an int >= 0"):
        ServerOptions(http_port=-1)


def test_aspen_serve_serves_http_and_drains_it_on_sigterm(tmp_path, tmp_path_factory):
    from tests.helpers.server import free_port

    server = ServeProcess(shared_assets(tmp_path_factory), tmp_path, "--http-port", str(free_port()),
                          "--grace-period", "30")
    try:
        assert server.http_url and server.http_url.startswith("http://127.0.0.1:")
        with httpx.Client(timeout=60) as http:
            stream = _open_stream(http, server.http_url, "team/a2")
            server.signal(signal.SIGTERM)
            time.sleep(0.3)
            late = http.post(f"{server.http_url}/completions", json={"model": "a1", "prompt": "x", "max_tokens": 2})
            assert late.status_code == 503 and late.json()["error"]["type"] == "service_unavailable_error"
            assert _finish(*stream)["choices"][0]["finish_reason"] == "length"
        assert server.wait(30) == 0, server.log()
        assert "server stopped (drained)" in server.log()
    finally:
        server.kill()


def test_nothing_is_held_after_the_lifecycle_tests(http_server):
    state = wait_engine_idle(http_server)
    assert (state["kv_blocks_used"], state["adapter_pins"], state["calls"]) == (0, 0, 0)
