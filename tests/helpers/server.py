"""Servers for end-to-end tests, all on 127.0.0.1: the tiny model and adapters they serve, an in-process
:class:`ServerThread` (an asyncio loop on a background thread, port 0) and a real ``aspen serve`` subprocess
(:class:`ServeProcess`). Every wait is bounded."""
from __future__ import annotations

import asyncio
import importlib
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

from clients.client import AspenClient
from engine import LLMEngine
from engine.config import EngineConfig
from engine.server.app import AspenServer
from engine.server.options import ServerOptions
from tests.helpers.adapters import make_peft_adapter
from tests.helpers.metrics import gauge, scrape
from tests.helpers.tiny_models import make_checkpoint

ENGINE = {"num_kv_blocks": 96, "block_size": 16, "max_num_seqs": 8}
LONG = {"max_new_tokens": 490, "temperature": 0.0, "ignore_eos": True}
GREEDY = {"temperature": 0.0, "ignore_eos": True}
_ASSETS: dict[str, dict] = {}


# ---------------------------------------------------------------------------------------------- assets
def build_assets(root) -> dict:
    """A tiny llama base (512 positions) and adapters a1, team/a2, a3 and bad (config rank != weights) in root."""
    if importlib.util.find_spec("aspen.kernels.cpu_kernels") is not None:  # build them (once) outside any deadline
        importlib.import_module("aspen.kernels.cpu_kernels").kernel()
    base = make_checkpoint(str(root / "base"), "llama", max_position_embeddings=512)
    ads = root / "adapters"
    make_peft_adapter(base, str(ads / "a1"), seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    make_peft_adapter(base, str(ads / "team" / "a2"), seed=2, r=8, lora_alpha=16,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    make_peft_adapter(base, str(ads / "a3"), seed=3, r=2, lora_alpha=4, target_modules=["o_proj"])
    shutil.copytree(ads / "a1", ads / "bad")  # a config that does not match its weights
    cfg = json.loads((ads / "bad" / "adapter_config.json").read_text())
    (ads / "bad" / "adapter_config.json").write_text(json.dumps({**cfg, "r": 2}))
    return {"root": str(root), "base": base, "adapters": str(ads)}


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


def free_port() -> int:
    """A loopback port free now (for the HTTP API, whose port 0 means "off")."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------- in process
class ServerThread:
    """An AspenServer on its own event loop thread, listening on a free loopback port; with ``http=True`` the
    OpenAI-compatible HTTP API too, on another free port (``http_url``: its base URL, ``.../v1``)."""

    def __init__(self, assets, start=True, factory=None, http=False, **options):
        engine_opts = {**ENGINE, **options.pop("engine", {})}
        options.setdefault("http_port", free_port() if http else 0)
        self.options = ServerOptions(model=assets["base"], adapter_dir=assets["adapters"], port=0,
                                     engine=EngineConfig(**engine_opts), **options)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        factory = factory or (lambda: LLMEngine(model=assets["base"], adapter_dir=assets["adapters"],
                                                progress=False, **engine_opts))
        self.server = self.run(self._make(factory))
        self.port = self.run(self.server.bind())
        self.address = f"127.0.0.1:{self.port}"
        self.http_url = self.server.http.url if self.server.http is not None else None
        if start:
            self.run(self.server.load())

    async def _make(self, factory):
        return AspenServer(self.options, factory)

    def run(self, coro, timeout=60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, grace=0.0):
        self.run(self.server.stop(grace))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        if not self.thread.is_alive():
            self.loop.close()

    def wait_idle(self, timeout=5.0) -> dict:
        """Poll the engine until no request holds KV blocks or adapter pins."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.server.engine.check_invariants()
            if (state["kv_blocks_used"], state["adapter_pins"], state["tracked"]) == (0, 0, 0) \
                    or time.monotonic() > deadline:
                return state
            time.sleep(0.05)


def wait_engine_idle(server: ServerThread, timeout: float = 30.0) -> dict:
    """Poll an in-process server until the engine holds no KV block, adapter pin or request."""
    deadline = time.monotonic() + timeout
    while True:
        state = server.server.engine.check_invariants()
        busy = (state["kv_blocks_used"], state["adapter_pins"], state["tracked"], server.server.async_engine.num_in_flight,
                server.server._inflight)
        if busy == (0, 0, 0, 0, 0) or time.monotonic() > deadline:
            return {**state, "in_flight": server.server.async_engine.num_in_flight, "calls": server.server._inflight}
        time.sleep(0.05)


def collect_stream(c: AspenClient, prompt, adapter=None, **params):
    msgs = list(c.stream(prompt, adapter, **params))
    return "".join(m.text for m in msgs), [t for m in msgs for t in m.token_ids], msgs[-1]


# ---------------------------------------------------------------------------------------------- subprocess
def aspen_command() -> list[str]:
    script = os.path.join(os.path.dirname(sys.executable), "aspen")
    return [script] if os.path.exists(script) else [sys.executable, "-m", "aspen.cli"]


class ServeProcess:
    """A real ``aspen serve`` on 127.0.0.1 (port 0, metrics on port 0, the HTTP API off unless ``args`` give
    ``--http-port``: then ``http_url`` is its base URL), output in ``log_path``."""

    def __init__(self, assets: dict, directory, *args: str, global_args: tuple[str, ...] = (),
                 env: dict | None = None, ready_timeout: float = 120):
        self.log_path = os.path.join(str(directory), f"serve-{time.monotonic_ns()}.log")
        cmd = aspen_command() + [*global_args, "serve", "--model", assets["base"], "--adapter-dir", assets["adapters"],
                                 "--port", "0", "--metrics-port", "0",
                                 *(() if "--http-port" in args else ("--http-port", "0")), *args]
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
        http = re.search(r"HTTP API on (https?://[\w.]+:\d+/v1)", self.log())
        self.http_url = http.group(1) if http else None

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
