"""Shared helpers of the reliability suites (tests/test_reliability_*.py): tiny model + adapters built once per
session, an in-process server (:class:`tests.server.test_server.ServerThread`), a real ``aspen serve`` subprocess, status
checks, resident-memory probes and a figures reporter. All traffic is on 127.0.0.1; every loop is bounded."""
from __future__ import annotations

import ctypes
import gc
import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request

import grpc
import psutil

from clients.aspen.v1 import aspen_pb2 as pb
from tests.server.test_server import (  # noqa: F401
    ENGINE,
    ServerThread,
    build_assets,
    details,
)
from tests.server.test_server_deployment import aspen_command, self_signed_cert  # noqa: F401

GREEDY = {"temperature": 0.0, "ignore_eos": True}
#: Status codes a client may get for its own input (proto/aspen/v1/aspen.proto, the table at the top).
CLIENT_CODES = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                          grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ALREADY_EXISTS,
                          grpc.StatusCode.RESOURCE_EXHAUSTED})
#: Field paths a BadRequest may name.
REQUEST_FIELDS = frozenset({"prompt", "text", "token_ids.ids", "adapter_id", "path", "request_id", "request"}
                           | {f"params.{f}" for f in pb.SamplingParams.DESCRIPTOR.fields_by_name})
_ASSETS: dict[str, dict] = {}


def shared_assets(tmp_path_factory) -> dict:
    """Base checkpoint (llama, 512 positions) and adapters a1, team/a2, a3 and bad (config rank != weights), made
    once per session. Tests that change adapter files copy the adapter root first (:func:`private_adapter_root`)."""
    key = str(tmp_path_factory.getbasetemp())
    if key not in _ASSETS:
        _ASSETS[key] = build_assets(tmp_path_factory.mktemp("reliability"))
    return _ASSETS[key]


def private_adapter_root(assets: dict, directory) -> dict:
    """A copy of ``assets`` whose adapter root is a fresh copy under ``directory`` (safe to damage)."""
    ads = os.path.join(str(directory), "adapters")
    shutil.copytree(assets["adapters"], ads, symlinks=True)
    return {**assets, "adapters": ads}


# ---------------------------------------------------------------------------------------------- statuses
def check_client_error(err: grpc.RpcError, allowed=CLIENT_CODES) -> grpc.StatusCode:
    """Assert ``err`` is a documented status for client input, with the details the proto promises."""
    code = err.code()
    assert code in allowed, f"{code.name}: {err.details()}"
    d = details(err)
    if code is grpc.StatusCode.INVALID_ARGUMENT:
        fields = {v.field for v in d["BadRequest"].field_violations}
        assert fields and fields <= REQUEST_FIELDS, fields
    elif code is grpc.StatusCode.NOT_FOUND or code is grpc.StatusCode.ALREADY_EXISTS:
        assert "ResourceInfo" in d, err.details()
    elif code is grpc.StatusCode.FAILED_PRECONDITION:
        assert d["PreconditionFailure"].violations[0].type in ("ADAPTER_INCOMPATIBLE", "ADAPTER_BUSY")
    elif code is grpc.StatusCode.RESOURCE_EXHAUSTED and "RetryInfo" not in d:  # only gRPC's own size limit
        assert "larger than max" in (err.details() or ""), err.details()
    return code


def retry_delay_s(err: grpc.RpcError) -> float:
    info = details(err).get("RetryInfo")
    return info.retry_delay.ToTimedelta().total_seconds() if info is not None else 0.0


# ---------------------------------------------------------------------------------------------- memory
def rss_bytes(pid: int | None = None) -> int:
    """Resident set size of ``pid`` (default: this process, after a full garbage collection and, with glibc,
    ``malloc_trim(0)`` so that freed heap pages do not count)."""
    if pid is None:
        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc
            pass
    return psutil.Process(pid or os.getpid()).memory_info().rss


def wait_engine_idle(server: ServerThread, timeout: float = 30.0) -> dict:
    """Poll an in-process server until the engine holds no KV block, adapter pin or request."""
    deadline = time.monotonic() + timeout
    while True:
        state = server.server.llm.check_invariants()
        busy = (state["kv_blocks_used"], state["adapter_pins"], state["tracked"], server.server.engine.num_in_flight,
                server.server._inflight)
        if busy == (0, 0, 0, 0, 0) or time.monotonic() > deadline:
            return {**state, "in_flight": server.server.engine.num_in_flight, "calls": server.server._inflight}
        time.sleep(0.05)


# ---------------------------------------------------------------------------------------------- subprocess
def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def gauge(text: str, name: str) -> float:
    return float(re.search(rf"^aspen:{name}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE).group(1))


class ServeProcess:
    """A real ``aspen serve`` on 127.0.0.1 (port 0, metrics on port 0), output in ``log_path``."""

    def __init__(self, assets: dict, directory, *args: str, global_args: tuple[str, ...] = (),
                 env: dict | None = None, ready_timeout: float = 120):
        self.log_path = os.path.join(str(directory), f"serve-{time.monotonic_ns()}.log")
        cmd = aspen_command() + [*global_args, "serve", "--model", assets["base"], "--adapter-dir", assets["adapters"],
                                 "--port", "0", "--metrics-port", "0", *args]
        environment = {**os.environ, "ASPEN_HOME": os.path.join(str(directory), "home"), **(env or {})}
        with open(self.log_path, "w") as log_file:
            self.proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=environment)
        deadline, match = time.monotonic() + ready_timeout, None
        while match is None and time.monotonic() < deadline and self.proc.poll() is None:
            time.sleep(0.1)
            match = re.search(r"ready on ([\d.]+):(\d+) .*metrics on http://[\d.]+:(\d+)/metrics", self.log())
        if match is None:
            self.kill()
            raise AssertionError(f"aspen serve did not start:\n{self.log()}")
        self.address = f"{match.group(1)}:{match.group(2)}"
        self.port, self.metrics_port = int(match.group(2)), int(match.group(3))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.proc.send_signal(signum)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def wait_idle(self, timeout: float = 30.0) -> dict:
        """Scrape /metrics until no request runs or waits and no KV block or adapter pin is held."""
        names = ("num_requests_running", "num_requests_waiting", "kv_blocks_used", "adapter_pins_in_use")
        deadline = time.monotonic() + timeout
        while True:
            text = scrape(self.metrics_port)
            values = {n: gauge(text, n) for n in names}
            if not any(values.values()) or time.monotonic() > deadline:
                return values
            time.sleep(0.1)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


# ---------------------------------------------------------------------------------------------- figures
def report(name: str, **figures) -> None:
    """Print one line of figures (shown with ``pytest -s``) and append it, as JSON, to the file named by
    ``$ASPEN_RELIABILITY_REPORT`` when set (RELIABILITY.md quotes them)."""
    line = {"check": name, **figures}
    print(f"\nRELIABILITY {json.dumps(line)}")
    path = os.environ.get("ASPEN_RELIABILITY_REPORT")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")
