"""The gRPC server: ``aspen.v1.GenerationService`` and ``aspen.v1.AdapterService`` over :class:`AsyncLLMEngine`.

Lifecycle of an :class:`AspenServer`: :meth:`~AspenServer.bind` listens at once (health NOT_SERVING, every call
answered UNAVAILABLE), :meth:`~AspenServer.load` builds the engine on a worker thread (the event loop keeps
answering probes) and flips health to SERVING, :meth:`~AspenServer.stop` drains: health NOT_SERVING, new calls
UNAVAILABLE, in-flight calls may finish within the grace period, then the rest are cancelled (each cancelled
call aborts its engine request) and the engine thread stops. The model never runs on the event loop thread.

Also served: ``grpc.health.v1.Health`` and server reflection (both exempt from token auth, for probes),
Prometheus metrics (see :mod:`engine.server.metrics`), and, on ``http_port``, the OpenAI-compatible HTTP API
(:mod:`engine.http`) over the same engine, on the same event loop: it binds and drains with the gRPC server, its
calls are admitted by :meth:`~AspenServer.refusal` and counted by :meth:`~AspenServer.in_flight` alike, and its
generations run through :meth:`~AspenServer.stream`. Configuration: :mod:`engine.server.options`; the
servicers' methods: :mod:`engine.server.servicers`; proto <-> engine conversions:
:mod:`engine.server.proto_convert`; error mapping: :mod:`engine.server.status`.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from aspen.demo import ensure_demo_base
from aspen.demo.adapters import ensure_demo_adapters
from clients.aspen.v1 import aspen_pb2 as pb
from clients.aspen.v1 import aspen_pb2_grpc as pb_grpc
from engine.async_engine import AsyncLLMEngine
from engine.chat import ChatMessage, ChatPrompt
from engine.http.server import HttpServer
from engine.llm_engine import LLMEngine
from engine.server import status as errs
from engine.server.metrics import ServerMetrics
from engine.server.options import ServerOptions
from engine.server.proto_convert import params_from_proto, response_format_from_proto
from engine.server.servicers import AdapterServicer, GenerationServicer

log = logging.getLogger("aspen.server")
SERVICE_NAMES = tuple(s.full_name for s in pb.DESCRIPTOR.services_by_name.values())


def build_engine(options: ServerOptions) -> LLMEngine:
    """The LLMEngine that ``options`` describe (loads the model: slow)."""
    if options.model == "demo" and options.train_demo_adapters and options.adapter_dir:
        # first run only (cached): about a minute or two on a 2-core CPU, while health says NOT_SERVING
        ensure_demo_adapters(ensure_demo_base(), options.adapter_dir)
    return LLMEngine(model=options.model, adapter_dir=options.adapter_dir, quantize=options.quantize,
                     dtype=options.dtype, device=options.device, config=options.engine, progress=False)


class AspenServer:
    """One gRPC server over one engine. See the module docstring for the lifecycle.

    ``engine`` is the :class:`LLMEngine` (None until loaded), ``async_engine`` the :class:`AsyncLLMEngine` that
    drives it from its own thread."""

    def __init__(self, options: ServerOptions, engine_factory: Callable[[], LLMEngine] | None = None) -> None:
        self.options = options
        self._factory = engine_factory or (lambda: build_engine(options))
        self.state = "starting"  # -> serving (-> failed) -> draining -> stopped
        self.health = health.aio.HealthServicer()
        self.metrics = ServerMetrics(options.model_name)
        self.engine: LLMEngine | None = None
        self.async_engine: AsyncLLMEngine | None = None
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.http: HttpServer | None = None
        self._server: grpc.aio.Server | None = None
        self._loader: threading.Thread | None = None
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._forced = asyncio.Event()
        self._stopped = asyncio.Event()

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Bind, then load the model; returns once the server is SERVING."""
        await self.bind()
        await self.load()

    async def bind(self) -> int:
        o = self.options
        server_options = [
            ("grpc.max_receive_message_length", o.max_message_bytes),
            ("grpc.max_send_message_length", o.max_message_bytes),
            ("grpc.keepalive_time_ms", int(o.keepalive_time_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(o.keepalive_timeout_s * 1000)),
            ("grpc.http2.min_ping_interval_without_data_ms", int(o.keepalive_min_ping_interval_s * 1000)),
            ("grpc.keepalive_permit_without_calls", int(o.keepalive_permit_without_calls)),
            ("grpc.so_reuseport", 0),
        ]
        # auth first (outermost): an unauthenticated caller learns nothing, not even whether its bytes parse
        interceptors = ([errs.AuthInterceptor(o.auth_token)] if o.auth_token else []) + [errs.ParseErrorInterceptor()]
        self._server = server = grpc.aio.server(interceptors=interceptors, options=server_options)
        pb_grpc.add_GenerationServiceServicer_to_server(GenerationServicer(self), server)
        pb_grpc.add_AdapterServiceServicer_to_server(AdapterServicer(self), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(SERVICE_NAMES + (health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        for name in ("",) + SERVICE_NAMES:
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        if o.http_port:
            self.http = HttpServer(self)
            await self.http.bind()
        address = f"{o.host}:{o.port}"
        try:
            if o.tls_cert:
                self.port = server.add_secure_port(address, self._credentials())
            else:
                self.port = server.add_insecure_port(address)
        except RuntimeError as e:  # grpc's way of saying the address is taken or invalid
            raise OSError(f"cannot listen on {address}: {e}") from None
        if o.metrics_port is not None:
            self.metrics_port = self.metrics.start_http(o.metrics_host, o.metrics_port)
        await server.start()
        return self.port

    def _credentials(self) -> grpc.ServerCredentials:
        o = self.options

        def read(path: str) -> bytes:
            with open(path, "rb") as f:
                return f.read()

        ca = read(o.tls_client_ca) if o.tls_client_ca else None
        return grpc.ssl_server_credentials([(read(o.tls_key), read(o.tls_cert))], root_certificates=ca,
                                          require_client_auth=ca is not None)

    async def load(self) -> None:
        """Build the engine on a daemon thread (a signal may end the process meanwhile), then serve."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()

        def settle(fn, value) -> None:
            if not done.done():
                fn(value)

        def work() -> None:
            try:
                engine = self._factory()
            except BaseException as e:  # noqa: BLE001 -- handed to the awaiting coroutine
                loop.call_soon_threadsafe(settle, done.set_exception, e)
            else:
                loop.call_soon_threadsafe(settle, done.set_result, engine)

        self._loader = threading.Thread(target=work, name="aspen-load", daemon=True)
        self._loader.start()
        self.engine = await done
        self.async_engine = AsyncLLMEngine(self.engine).start()
        self.metrics.bind_engine(self.engine)
        if self.state == "starting":
            self.state = "serving"
            for name in ("",) + SERVICE_NAMES:
                await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    @property
    def adapter_root(self) -> str | None:
        """The engine's (real) adapter root, redacted from client-facing error messages."""
        return self.engine.adapter_dir if self.engine is not None else None

    @property
    def loading(self) -> bool:
        """True while the model is still being built on the loader thread."""
        return self._loader is not None and self._loader.is_alive()

    def force(self) -> None:
        """End the grace period now: in-flight calls are cancelled."""
        self._forced.set()

    async def stop(self, grace: float | None = None) -> bool:
        """Drain and stop; True when every in-flight call finished within the grace period."""
        if self.state == "stopped":
            return True
        grace = self.options.grace_period if grace is None else grace
        self.state = "draining"
        await self.health.enter_graceful_shutdown()
        finished = await self._wait_idle(grace)
        if not finished:
            log.warning("grace period over: cancelling %d in-flight call(s)", self._inflight)
        if self._server is not None:
            await self._server.stop(0)
        if self.http is not None:
            await self.http.stop()
        if self.async_engine is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.async_engine.shutdown)
        self.metrics.stop_http()
        self.state = "stopped"
        self._stopped.set()
        return finished

    async def _wait_idle(self, grace: float) -> bool:
        waits = [asyncio.ensure_future(self._idle.wait()), asyncio.ensure_future(self._forced.wait())]
        try:
            await asyncio.wait(waits, timeout=grace, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        return self._idle.is_set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    # ------------------------------------------------------------------ calls
    async def refusal(self) -> str | None:
        """Why a new call is refused now (None while serving), for every front end; an engine loop found dead
        turns the server to "failed" (health NOT_SERVING)."""
        if self.state == "serving" and not self.async_engine.is_running:  # the engine loop died: stop advertising
            self.state = "failed"
            log.error("the engine loop is not running; reporting NOT_SERVING")
            for name in ("",) + SERVICE_NAMES:
                await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.state == "serving":
            return None
        return {"starting": "the server is starting (loading the model); retry shortly",
                "failed": "the engine stopped after an internal error; retry on another replica"}.get(
                    self.state, "the server is shutting down; retry on another replica")

    @contextlib.contextmanager
    def in_flight(self):
        """Count a call in flight while the block runs: the drain waits until none is."""
        self._inflight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.set()

    @contextlib.asynccontextmanager
    async def call(self, context):
        """Admit a gRPC call (UNAVAILABLE unless serving), count it in flight, map its exceptions to statuses."""
        why = await self.refusal()
        if why is not None:
            await context.abort_with_status(errs.unavailable(why))
        call = errs.CallFields()
        with self.in_flight():
            try:
                yield call
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception as e:  # noqa: BLE001 -- every exception becomes a status; unexpected ones INTERNAL
                await context.abort_with_status(errs.status_for_exception(e, call, root=self.adapter_root))

    async def run_blocking(self, fn, *args):
        """Run a blocking engine call (adapter load/unload, tokenizing) on a worker thread, off the event loop."""
        return await self.async_engine.run_blocking(fn, *args)

    async def stream(self, prompt, params, adapter_id: str | None, request_id: str | None):
        """Stream the engine outputs of one request, observed by the metrics (aborted in the engine if left
        early); the engine validates the request (its errors are raised before the first output)."""
        tracker = self.metrics.tracker()
        try:
            stream = self.async_engine.generate(prompt, params, adapter_id, request_id)
            async with contextlib.aclosing(stream):
                async for out in stream:
                    tracker.observe(out)
                    yield out
        finally:
            tracker.close()

    async def outputs(self, request: pb.GenerateRequest, call: errs.CallFields):
        """Stream the engine outputs of a GenerateRequest (see :meth:`stream`); ``call`` records the prompt field
        the request used, so that :meth:`call` maps the engine's errors to that field's path."""
        prompt = _prompt(request, call)
        params = params_from_proto(request.params, response_format_from_proto(request))
        call.adapter_id = request.adapter_id
        stream = self.stream(prompt, params, request.adapter_id or None, request.request_id or None)
        async with contextlib.aclosing(stream):
            async for out in stream:
                yield out


def _prompt(request: pb.GenerateRequest, call: errs.CallFields) -> str | list[int] | ChatPrompt:
    """The prompt of the wire message: which member of the ``prompt`` oneof is set is the server's to check."""
    kind = request.WhichOneof("prompt")
    if kind is None:
        raise errs.InvalidArgument("prompt", "set one of text, token_ids or messages")
    if kind == "text":
        call.prompt_field = "text"
        return request.text
    if kind == "messages":
        call.prompt_field = "messages.messages"
        return ChatPrompt(tuple(ChatMessage(m.role, m.content) for m in request.messages.messages))
    call.prompt_field = "token_ids.ids"
    return list(request.token_ids.ids)
