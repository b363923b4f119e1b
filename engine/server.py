"""The gRPC server: ``aspen.v1.GenerationService`` and ``aspen.v1.AdapterService`` over :class:`AsyncLLMEngine`.

Lifecycle of an :class:`AspenServer`: :meth:`~AspenServer.bind` listens at once (health NOT_SERVING, every call
answered UNAVAILABLE), :meth:`~AspenServer.load` builds the engine on a worker thread (the event loop keeps
answering probes) and flips health to SERVING, :meth:`~AspenServer.stop` drains: health NOT_SERVING, new calls
UNAVAILABLE, in-flight calls may finish within the grace period, then the rest are cancelled (each cancelled
call aborts its engine request) and the engine thread stops. The model never runs on the event loop thread.

Also served: ``grpc.health.v1.Health`` and server reflection (both exempt from token auth, for probes), and
Prometheus metrics (see :mod:`engine.metrics`). Error mapping: :mod:`engine.grpc_errors`.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import uuid
from collections.abc import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from clients.aspen.v1 import aspen_pb2 as pb
from clients.aspen.v1 import aspen_pb2_grpc as pb_grpc
from engine import grpc_errors as errs
from engine.adapter_paths import check_confined, validate_adapter_id
from engine.async_engine import AsyncLLMEngine
from engine.llm_engine import LLMEngine
from engine.metrics import ServerMetrics
from engine.sampling_params import SamplingParams, SamplingParamsError
from engine.serve_command import ServerOptions, build_engine

log = logging.getLogger("aspen.server")
SERVICE_NAMES = tuple(s.full_name for s in pb.DESCRIPTOR.services_by_name.values())
MAX_REQUEST_ID_CHARS = 256
_OPTIONAL_PARAMS = ("max_new_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty",
                    "presence_penalty", "frequency_penalty", "seed", "min_new_tokens", "logprobs",
                    "skip_special_tokens")
_FINISH = {"length": pb.FINISH_REASON_LENGTH, "eos": pb.FINISH_REASON_EOS, "stop": pb.FINISH_REASON_STOP,
           "aborted": pb.FINISH_REASON_CANCELLED, "error": pb.FINISH_REASON_ERROR}
_TIER = {"disk": pb.ADAPTER_TIER_DISK, "host": pb.ADAPTER_TIER_HOST, "device": pb.ADAPTER_TIER_DEVICE}
_QUANT = {"none": pb.QUANTIZATION_NONE, "int8": pb.QUANTIZATION_INT8, "nf4": pb.QUANTIZATION_NF4,
          "fp4": pb.QUANTIZATION_FP4}


def params_from_proto(p: pb.SamplingParams) -> SamplingParams:
    """Engine sampling parameters; unset optional fields keep the engine defaults."""
    kw = {name: getattr(p, name) for name in _OPTIONAL_PARAMS if p.HasField(name)}
    return SamplingParams(stop=tuple(p.stop), stop_token_ids=tuple(p.stop_token_ids), ignore_eos=p.ignore_eos,
                          **kw)


def _logprobs(items) -> list[pb.TokenLogprob]:
    return [pb.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob,
                            top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in lp.top]) for lp in items]


def _finish(msg, out) -> None:
    """Fill finish_reason, usage and the stop reason of a final message."""
    msg.finish_reason = _FINISH.get(out.finish_reason, pb.FINISH_REASON_UNSPECIFIED)
    msg.usage.prompt_tokens = out.prompt_tokens
    msg.usage.completion_tokens = out.completion_tokens
    msg.usage.cached_prompt_tokens = out.num_cached_tokens
    if isinstance(out.stop_reason, str):
        msg.stop_sequence = out.stop_reason
    elif isinstance(out.stop_reason, int):
        msg.stop_token_id = out.stop_reason


class _Call:
    """What the error mapping of one call needs to know about it."""

    adapter_field = "adapter_id"
    adapter_id = ""
    prompt_field = "prompt"


class AspenServer:
    """One gRPC server over one engine. See the module docstring for the lifecycle."""

    def __init__(self, options: ServerOptions, engine_factory: Callable[[], LLMEngine] | None = None) -> None:
        self.options = options
        self._factory = engine_factory or (lambda: build_engine(options))
        self.state = "starting"  # -> serving (-> failed) -> draining -> stopped
        self.health = health.aio.HealthServicer()
        self.metrics = ServerMetrics(options.model_name)
        self.llm: LLMEngine | None = None
        self.engine: AsyncLLMEngine | None = None
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._loader: threading.Thread | None = None
        self._active_ids: set[str] = set()
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
        address = f"{o.host}:{o.port}"
        try:
            if o.tls_cert or o.tls_key:
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
        if not (o.tls_cert and o.tls_key):
            raise ValueError("TLS needs both --tls-cert and --tls-key")

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
                llm = self._factory()
            except BaseException as e:  # noqa: BLE001 -- handed to the awaiting coroutine
                loop.call_soon_threadsafe(settle, done.set_exception, e)
            else:
                loop.call_soon_threadsafe(settle, done.set_result, llm)

        self._loader = threading.Thread(target=work, name="aspen-load", daemon=True)
        self._loader.start()
        self.llm = await done
        self.engine = AsyncLLMEngine(self.llm).start()
        self.metrics.bind_engine(self.llm)
        if self.state == "starting":
            self.state = "serving"
            for name in ("",) + SERVICE_NAMES:
                await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    @property
    def adapter_root(self) -> str | None:
        """The engine's (real) adapter root, redacted from client-facing error messages."""
        return self.llm.adapter_dir if self.llm is not None else None

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
        if self.engine is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.engine.shutdown)
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
    @contextlib.asynccontextmanager
    async def call(self, context):
        """Admit a call (UNAVAILABLE unless serving), count it in flight, map its exceptions to statuses."""
        if self.state == "serving" and not self.engine.is_running:  # the engine loop died: stop advertising
            self.state = "failed"
            log.error("the engine loop is not running; reporting NOT_SERVING")
            for name in ("",) + SERVICE_NAMES:
                await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.state != "serving":
            why = {"starting": "the server is starting (loading the model); retry shortly",
                   "failed": "the engine stopped after an internal error; retry on another replica"}.get(
                       self.state, "the server is shutting down; retry on another replica")
            await context.abort_with_status(errs.unavailable(why))
        self._inflight += 1
        self._idle.clear()
        call = _Call()
        try:
            yield call
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as e:  # noqa: BLE001 -- every exception becomes a status; unexpected ones INTERNAL
            await context.abort_with_status(errs.status_for_exception(
                e, adapter_field=call.adapter_field, adapter_id=call.adapter_id, root=self.adapter_root))
        finally:
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.set()

    async def outputs(self, request: pb.GenerateRequest, call: _Call):
        """Validate a GenerateRequest and stream its engine outputs (aborted in the engine if left early)."""
        prompt = self._prompt(request, call)
        try:
            params = params_from_proto(request.params)
        except SamplingParamsError as e:
            raise errs.InvalidArgument(errs.sampling_field(e), e.reason) from None
        adapter = request.adapter_id or None
        if adapter is not None:
            call.adapter_id = adapter
            validate_adapter_id(adapter)
        rid = request.request_id or uuid.uuid4().hex
        if len(rid) > MAX_REQUEST_ID_CHARS:
            raise errs.InvalidArgument("request_id", f"at most {MAX_REQUEST_ID_CHARS} characters, got {len(rid)}")
        if rid in self._active_ids:
            raise errs.DuplicateRequestError(rid)
        self._active_ids.add(rid)
        tracker = self.metrics.tracker()
        try:
            async with contextlib.aclosing(self.engine.generate(prompt, params, adapter, rid)) as stream:
                async for out in stream:
                    tracker.observe(out)
                    yield out
        except SamplingParamsError as e:  # context checks name the prompt field actually used
            field_path = errs.sampling_field(e)
            raise errs.InvalidArgument(call.prompt_field if field_path == "prompt" else field_path,
                                       e.reason) from None
        finally:
            self._active_ids.discard(rid)
            tracker.close()

    def _prompt(self, request: pb.GenerateRequest, call: _Call):
        kind = request.WhichOneof("prompt")
        if kind is None:
            raise errs.InvalidArgument("prompt", "set either text or token_ids")
        if kind == "text":
            call.prompt_field = "text"
            if not request.text:
                raise errs.InvalidArgument("text", "the prompt is empty")
            self._check_text_length(request.text, "text")
            return request.text
        call.prompt_field = "token_ids.ids"
        ids = list(request.token_ids.ids)
        if not ids:
            raise errs.InvalidArgument("token_ids.ids", "the prompt is empty")
        vocab = self.llm.model.config.vocab_size
        bad = [t for t in ids if t >= vocab]
        if bad:
            raise errs.InvalidArgument("token_ids.ids", f"token ids must be in [0, {vocab}), got {bad[:5]}")
        return ids

    def _check_text_length(self, text: str, field_name: str) -> None:
        """Refuse, without tokenizing it, a text too long to ever fit the context (see LLMEngine.max_prompt_chars)."""
        limit = self.llm.max_prompt_chars
        if len(text) > limit:
            raise errs.InvalidArgument(field_name, f"{len(text)} characters can never fit the context of "
                                                   f"{self.llm.max_model_len} tokens (at most {limit} characters)")


class GenerationServicer(pb_grpc.GenerationServiceServicer):
    def __init__(self, server: AspenServer) -> None:
        self.s = server

    async def Generate(self, request, context):
        async with self.s.call(context) as call:
            final = None
            async with contextlib.aclosing(self.s.outputs(request, call)) as outs:
                async for out in outs:
                    final = out
            if final.finish_reason == "error":
                status, _ = errs.engine_error(final.error, final.request_id, request.adapter_id, self.s.adapter_root)
                await context.abort_with_status(status)
            msg = pb.GenerateResponse(request_id=final.request_id, adapter_id=final.adapter_id or "",
                                      text=final.text, token_ids=final.token_ids,
                                      logprobs=_logprobs(final.logprobs))
            _finish(msg, final)
            return msg

    async def GenerateStream(self, request, context):
        async with self.s.call(context) as call, contextlib.aclosing(self.s.outputs(request, call)) as outs:
            streamed = False
            async for out in outs:
                if not (out.delta_text or out.delta_token_ids or out.finished):
                    continue
                if out.finish_reason == "error" and not streamed:
                    # failed before its first token (e.g. its adapter vanished before admission): the status the
                    # unary call would get (NOT_FOUND, ...), not an OK stream whose only message is an error
                    await context.abort_with_status(
                        errs.engine_error(out.error, out.request_id, request.adapter_id, self.s.adapter_root)[0])
                streamed = True
                msg = pb.GenerateStreamResponse(request_id=out.request_id, text=out.delta_text,
                                                token_ids=out.delta_token_ids,
                                                logprobs=_logprobs(out.delta_logprobs))
                if out.finished:
                    _finish(msg, out)
                    if out.finish_reason == "error":
                        msg.error = errs.engine_error(out.error, out.request_id, request.adapter_id,
                                                      self.s.adapter_root)[1]
                yield msg

    async def Tokenize(self, request, context):
        async with self.s.call(context):
            llm = self.s.llm
            self.s._check_text_length(request.text, "text")

            def work():
                ids = llm.tokenize(request.text) if request.text else []
                return ids, llm.tokenizer.convert_ids_to_tokens(ids)

            ids, tokens = await self.s.engine.run_blocking(work)
            return pb.TokenizeResponse(token_ids=ids, tokens=[str(t) for t in tokens])

    async def GetModelInfo(self, request, context):
        async with self.s.call(context):
            llm, cfg = self.s.llm, self.s.llm.config
            mc = llm.model.config
            stats = llm.adapters.stats() if llm.adapters is not None else None
            return pb.GetModelInfoResponse(
                base_model=self.s.options.model_name, model_family=mc.family,
                dtype=str(llm.model.dtype).removeprefix("torch."),
                quantization=_QUANT.get(llm.model.quantize, pb.QUANTIZATION_UNSPECIFIED),
                device=str(llm.model.device), max_context_tokens=llm.max_model_len, vocab_size=mc.vocab_size,
                max_num_seqs=cfg.max_num_seqs, max_queue=cfg.max_waiting,
                kv_cache_blocks=llm.block_manager.num_blocks, kv_block_size=cfg.block_size,
                adapters_enabled=stats is not None,
                adapter_cache_device_pages=stats.num_device_pages if stats else 0,
                adapter_cache_host_bytes=stats.host_budget_bytes if stats else 0,
                server_version=_version())


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("aspen-serve")
    except PackageNotFoundError:
        return "unknown"


def adapter_info_proto(llm: LLMEngine, info, registered: bool) -> pb.AdapterInfo:
    """Proto AdapterInfo, with rank / target modules / alpha read from adapter_config.json (best effort)."""
    from aspen.peft_config import read_adapter_config

    msg = pb.AdapterInfo(adapter_id=info.adapter_id, tier=_TIER.get(info.tier, pb.ADAPTER_TIER_UNSPECIFIED),
                         registered=registered,
                         active_requests=info.pins, host_bytes=info.nbytes or 0, device_pages=info.num_pages or 0,
                         generation=info.generation, path=os.path.relpath(info.path, llm.adapter_dir))
    try:
        check_confined(llm.adapter_dir, info.path)  # never read a config through a symlink out of the root
        raw = read_adapter_config(info.path)
    except Exception:  # noqa: BLE001 -- a broken config only leaves these fields empty in a listing
        return msg
    if isinstance(raw.get("r"), int):
        msg.rank = raw["r"]
    if isinstance(raw.get("lora_alpha"), (int, float)):
        msg.lora_alpha = raw["lora_alpha"]
    targets = raw.get("target_modules")
    msg.target_modules.extend([targets] if isinstance(targets, str) else sorted(map(str, targets or ())))
    return msg


class AdapterServicer(pb_grpc.AdapterServiceServicer):
    def __init__(self, server: AspenServer) -> None:
        self.s = server

    async def LoadAdapter(self, request, context):
        async with self.s.call(context) as call:
            call.adapter_id = request.adapter_id
            validate_adapter_id(request.adapter_id)
            call.adapter_field = "path" if request.path else "adapter_id"
            llm = self.s.llm

            def work():
                info = llm.load_adapter(request.adapter_id, request.path or None)
                return adapter_info_proto(llm, info, True)

            info = await self.s.engine.run_blocking(work)
            log.info("adapter %r loaded (tier %s)", request.adapter_id, pb.AdapterTier.Name(info.tier))
            return pb.LoadAdapterResponse(adapter=info)

    async def UnloadAdapter(self, request, context):
        async with self.s.call(context) as call:
            call.adapter_id = request.adapter_id
            validate_adapter_id(request.adapter_id)
            await self.s.engine.run_blocking(self.s.llm.unload_adapter, request.adapter_id)
            log.info("adapter %r unloaded", request.adapter_id)
            return pb.UnloadAdapterResponse()

    async def ListAdapters(self, request, context):
        async with self.s.call(context):
            llm = self.s.llm

            def work():
                registered = {i.adapter_id for i in llm.adapters.info()} if llm.adapters is not None else set()
                return [adapter_info_proto(llm, i, i.adapter_id in registered) for i in llm.list_adapters()]

            return pb.ListAdaptersResponse(adapters=await self.s.engine.run_blocking(work))
