"""Security checks (item 7 of the reliability suite), over 127.0.0.1: adapter loading confined to the adapter root
(no traversal, no symlink escape, also when the tree changes after registration), no pickle unless explicitly
enabled (and even then no code execution), request size and prompt length limits, bearer token + TLS end to end
with a real ``aspen serve``, mutual TLS, and no secret in the server log."""
from __future__ import annotations

import argparse
import os
import pickle
import secrets
import shutil
import signal
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from safetensors.torch import load_file

from clients.client import AspenClient
from engine.server import command as serve_command
from engine.server.command import ServerOptions
from tests.helpers.certs import self_signed_cert
from tests.helpers.metrics import report
from tests.helpers.server import GREEDY, ServeProcess, ServerThread, private_adapter_root, shared_assets
from tests.helpers.statuses import CLIENT_CODES, check_client_error, details

PROMPT = "The quick brown fox"
ST = "adapter_model.safetensors"


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # unpickling this would create the marker directory
        return (os.mkdir, (self.marker,))


@pytest.fixture(scope="module")
def jail(tmp_path_factory):
    """A server over an adapter root with escape attempts in it; ``outside`` holds what must never be read."""
    work = tmp_path_factory.mktemp("jail")
    assets = private_adapter_root(shared_assets(tmp_path_factory), work)
    ads, outside = assets["adapters"], str(work / "outside")
    shutil.copytree(os.path.join(ads, "a3"), os.path.join(outside, "evil"))  # a valid adapter, outside the root
    os.symlink(os.path.join(outside, "evil"), os.path.join(ads, "escape"))  # directory symlink out of the root
    shutil.copytree(os.path.join(ads, "a1"), os.path.join(ads, "sneaky"))  # file symlink out of the root
    os.remove(os.path.join(ads, "sneaky", ST))
    os.symlink(os.path.join(outside, "evil", ST), os.path.join(ads, "sneaky", ST))
    os.symlink(os.path.join(ads, "a1"), os.path.join(ads, "inside_link"))  # stays inside: allowed
    pickled = os.path.join(ads, "pickle_only")
    shutil.copytree(os.path.join(ads, "a1"), pickled)
    torch.save(load_file(os.path.join(pickled, ST)), os.path.join(pickled, "adapter_model.bin"))
    os.remove(os.path.join(pickled, ST))
    evil = os.path.join(ads, "evil_pickle")
    shutil.copytree(os.path.join(ads, "a1"), evil)
    os.remove(os.path.join(evil, ST))
    marker = str(work / "pwned")
    with open(os.path.join(evil, "adapter_model.bin"), "wb") as f:
        f.write(pickle.dumps({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": _Evil(marker)}))
    s = ServerThread(assets)
    s.ads, s.outside, s.marker = ads, outside, marker
    with AspenClient(s.address, timeout=30) as c:
        s.reference = {a: c.generate(PROMPT, a, max_new_tokens=8, **GREEDY).token_ids for a in ("a1", "a3")}
    yield s
    s.stop()


def _refused(call, code=grpc.StatusCode.INVALID_ARGUMENT) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() is code, (info.value.code(), info.value.details())
    if code in CLIENT_CODES:
        check_client_error(info.value)
    return info.value


def _field(err: grpc.RpcError) -> str:
    return details(err)["BadRequest"].field_violations[0].field


def test_adapter_loading_is_confined_to_the_root(jail):
    ads, outside, llm = jail.ads, jail.outside, jail.server.engine
    refused = 0
    with AspenClient(jail.address, timeout=30) as c:
        for adapter in ("../outside/evil", "a1/../../outside/evil", os.path.join(outside, "evil"), "..", "a1/..",
                        "escape", "escape/", "sneaky", "a1\x00", "a1/../a1", "team//a2", "\\a1"):
            for call in (lambda a=adapter: c.generate(PROMPT, a, max_new_tokens=2),
                         lambda a=adapter: list(c.stream(PROMPT, a, max_new_tokens=2))):
                assert _field(_refused(call)) == "adapter_id", adapter
                refused += 1
        for path in ("../outside/evil", os.path.join(outside, "evil"), os.path.join(ads, "escape"), "escape",
                     "sneaky", ads, "/", "/etc", os.path.join(ads, "a1") + "\x00", "a1/../../outside/evil"):
            assert _field(_refused(lambda p=path: c.load_adapter("x", p))) == "path", path
            refused += 1
        assert "escape" not in {a.adapter_id for a in c.list_adapters()}
        # a symlink that stays inside the root is fine
        assert c.generate(PROMPT, "inside_link", max_new_tokens=8, **GREEDY).token_ids == jail.reference["a1"]
        # the tree changes after registration: checked again at the next read
        for name, damage in (("swap_dir", "dir"), ("swap_file", "file")):
            target = shutil.copytree(os.path.join(ads, "a1"), os.path.join(ads, name))
            c.load_adapter(name)
            assert c.generate(PROMPT, name, max_new_tokens=8, **GREEDY).token_ids == jail.reference["a1"]
            llm.adapter_cache.evict_unpinned()  # the next request reads the directory again
            if damage == "dir":
                shutil.rmtree(target)
                os.symlink(os.path.join(outside, "evil"), target)
            else:
                os.remove(os.path.join(target, ST))
                os.symlink(os.path.join(outside, "evil", ST), os.path.join(target, ST))
            err = _refused(lambda n=name: c.generate(PROMPT, n, max_new_tokens=2))
            assert "outside the adapter root" in err.details() and outside not in err.details()
            refused += 1
            c.unload_adapter(name)
        assert c.generate(PROMPT, "a3", max_new_tokens=8, **GREEDY).token_ids == jail.reference["a3"]
    report("security-confinement", escape_attempts_refused=refused)


def test_pickle_needs_an_explicit_opt_in_and_never_runs_code(jail, tmp_path_factory):
    with AspenClient(jail.address, timeout=30) as c:
        err = _refused(lambda: c.generate(PROMPT, "pickle_only", max_new_tokens=2),
                       grpc.StatusCode.FAILED_PRECONDITION)
        assert "pickle" in err.details() and "--allow-pickle-adapters" in err.details()
        _refused(lambda: c.load_adapter("evil_pickle"), grpc.StatusCode.FAILED_PRECONDITION)
    assets = {**shared_assets(tmp_path_factory), "adapters": jail.ads}
    s = ServerThread(assets, engine={"allow_pickle_adapters": True})
    try:
        with AspenClient(s.address, timeout=30) as c:
            tokens = c.generate(PROMPT, "pickle_only", max_new_tokens=8, **GREEDY).token_ids
            assert tokens == jail.reference["a1"]
            err = _refused(lambda: c.generate(PROMPT, "evil_pickle", max_new_tokens=2),
                           grpc.StatusCode.FAILED_PRECONDITION)
            assert "cannot load" in err.details()
    finally:
        s.stop()
    assert not os.path.exists(jail.marker)  # torch.load(weights_only=True) refused the payload
    parser = argparse.ArgumentParser()
    serve_command.add_arguments(parser)
    on = serve_command.options_from_args(parser.parse_args(["--model", "m", "--allow-pickle-adapters"]))
    off = serve_command.options_from_args(parser.parse_args(["--model", "m"]))
    assert on.engine.allow_pickle_adapters is True and off.engine.allow_pickle_adapters is False


def test_request_size_and_prompt_length_limits(jail, tmp_path_factory):
    llm = jail.server.engine
    with AspenClient(jail.address, timeout=60) as c:
        started = time.monotonic()  # the default 16 MiB message limit: refused before tokenizing
        assert _field(_refused(lambda: c.generate("x" * 10_000_000, max_new_tokens=1))) == "text"
        assert _field(_refused(lambda: c.tokenize("ab " * 3_000_000))) == "text"
        huge_s = time.monotonic() - started
        assert huge_s < 10, huge_s  # refused by the character limit, never tokenized
        assert _field(_refused(lambda: c.generate("ab " * (llm.max_prompt_chars // 3), max_new_tokens=1))) == "text"
        assert _field(_refused(lambda: c.generate([5] * (llm.max_model_len + 1), max_new_tokens=1))) == \
            "token_ids.ids"
        assert _field(_refused(lambda: c.generate("hi", max_new_tokens=llm.max_model_len))) == \
            "params.max_new_tokens"
    s = ServerThread({**shared_assets(tmp_path_factory), "adapters": jail.ads}, max_message_bytes=64 * 1024)
    try:
        with AspenClient(s.address, timeout=30) as c:
            err = _refused(lambda: c.generate("y" * 100_000, max_new_tokens=1), grpc.StatusCode.RESOURCE_EXHAUSTED)
            assert "larger than max" in err.details()
            assert c.generate(PROMPT, "a1", max_new_tokens=8, **GREEDY).token_ids == jail.reference["a1"]
    finally:
        s.stop()
    report("security-limits", max_prompt_chars=llm.max_prompt_chars, max_context_tokens=llm.max_model_len,
           huge_prompts_refused_in_s=round(huge_s, 2), max_message_bytes_tested=64 * 1024)


def test_mutual_tls(jail, tmp_path, tmp_path_factory):
    cert, key = self_signed_cert(str(tmp_path))
    s = ServerThread({**shared_assets(tmp_path_factory), "adapters": jail.ads}, tls_cert=cert, tls_key=key,
                     tls_client_ca=cert)
    try:
        with AspenClient(s.address, tls_ca=cert, server_name="localhost", timeout=5) as c:
            _refused(lambda: c.generate("hi", max_new_tokens=1), grpc.StatusCode.UNAVAILABLE)  # no client cert
        with AspenClient(s.address, tls_ca=cert, tls_cert=cert, tls_key=key, server_name="localhost",
                         timeout=30) as c:
            assert c.generate(PROMPT, "a1", max_new_tokens=8, **GREEDY).token_ids == jail.reference["a1"]
    finally:
        s.stop()


def test_token_and_tls_end_to_end_without_secrets_in_the_log(jail, tmp_path, tmp_path_factory):
    cert, key = self_signed_cert(str(tmp_path))
    token, wrong = f"tok-{secrets.token_hex(16)}", f"wrong-{secrets.token_hex(16)}"
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    assets = {**shared_assets(tmp_path_factory), "adapters": jail.ads}
    server = ServeProcess(assets, tmp_path, "--tls-cert", cert, "--tls-key", key, "--auth-token-file",
                          str(token_file), global_args=("--log-level", "DEBUG"))
    checks = 0
    try:
        tls = {"tls_ca": cert, "server_name": "localhost", "timeout": 30}
        with AspenClient(server.address, token=token, **tls) as c:
            assert c.generate(PROMPT, "a1", max_new_tokens=8, **GREEDY).token_ids == jail.reference["a1"]
            assert [t for m in c.stream(PROMPT, "a1", max_new_tokens=8, **GREEDY) for t in m.token_ids] == \
                list(jail.reference["a1"])
            c.load_adapter("a3")
            assert "a3" in {a.adapter_id for a in c.list_adapters()}
            c.unload_adapter("a3")
            _refused(lambda: c.generate(PROMPT, "pickle_only"), grpc.StatusCode.FAILED_PRECONDITION)
            _refused(lambda: c.generate(PROMPT, "../escape"))
            checks += 7
        for bad in (None, wrong, token + "x", f"{token} "):
            with AspenClient(server.address, token=bad, **tls) as c:
                _refused(lambda c=c: c.generate(PROMPT, max_new_tokens=1), grpc.StatusCode.UNAUTHENTICATED)
                _refused(lambda c=c: list(c.stream(PROMPT, max_new_tokens=1)), grpc.StatusCode.UNAUTHENTICATED)
                _refused(c.list_adapters, grpc.StatusCode.UNAUTHENTICATED)
                checks += 3
        with AspenClient(server.address, token=token, timeout=5) as plain:  # plaintext to a TLS port
            _refused(lambda: plain.generate(PROMPT, max_new_tokens=1), grpc.StatusCode.UNAVAILABLE)
        with open(cert, "rb") as f:
            creds = grpc.ssl_channel_credentials(f.read())
        with grpc.secure_channel(server.address, creds, options=[("grpc.ssl_target_name_override", "localhost")]) \
                as ch:  # probes need no token
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        checks += 2
        server.signal(signal.SIGTERM)
        assert server.wait(60) == 0
    finally:
        server.kill()
    log = server.log()
    assert "tls on, auth on" in log and "DEBUG" in log
    with open(key) as f:
        key_body = "".join(f.read().splitlines()[1:-1])
    for secret in (token, wrong, key_body[:40]):
        assert secret not in log, "a secret reached the server log"
    assert token not in repr(ServerOptions(auth_token=token))
    report("security-tls-token", checks=checks, log_lines=len(log.splitlines()), secrets_in_log=0)
