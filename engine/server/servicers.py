"""The gRPC servicers: ``aspen.v1.GenerationService`` and ``aspen.v1.AdapterService`` methods.

Each method runs inside the server's :meth:`~Serving.call` (admission, in-flight count, exception -> status
mapping). Generate and GenerateStream take the engine stream from :meth:`~Serving.outputs`; other blocking engine
work (tokenizing, adapter loads and listings) runs on a worker thread via :meth:`~Serving.run_blocking`. The
engine validates what it is given; the servicers only build messages (:mod:`engine.server.proto_convert`).
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

import aspen
from clients.aspen.v1 import aspen_pb2 as pb
from clients.aspen.v1 import aspen_pb2_grpc as pb_grpc
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.server import status as errs
from engine.server.options import ServerOptions
from engine.server.proto_convert import adapter_info_proto, fill_finish, logprobs_proto, quantization_proto

log = logging.getLogger("aspen.server")


class Serving(Protocol):
    """What the servicers use of the server (:class:`engine.server.app.AspenServer` provides it)."""

    options: ServerOptions
    engine: LLMEngine | None  # None until the model is loaded; calls are admitted only after

    @property
    def adapter_root(self) -> str | None: ...

    def call(self, context) -> contextlib.AbstractAsyncContextManager[errs.CallFields]: ...

    def outputs(self, request: pb.GenerateRequest, call: errs.CallFields) -> AsyncIterator[RequestOutput]: ...

    async def run_blocking(self, fn: Callable[..., Any], *args: Any) -> Any: ...


class GenerationServicer(pb_grpc.GenerationServiceServicer):
    def __init__(self, server: Serving) -> None:
        self.server = server

    async def Generate(self, request, context):
        async with self.server.call(context) as call:
            final = None
            async with contextlib.aclosing(self.server.outputs(request, call)) as outs:
                async for out in outs:
                    final = out
            if final.finish_reason == "error":
                status, _ = errs.engine_error(final.error, final.request_id, request.adapter_id,
                                              self.server.adapter_root)
                await context.abort_with_status(status)
            msg = pb.GenerateResponse(request_id=final.request_id, adapter_id=final.adapter_id or "",
                                      text=final.text, token_ids=final.token_ids,
                                      logprobs=logprobs_proto(final.logprobs))
            fill_finish(msg, final)
            return msg

    async def GenerateStream(self, request, context):
        server = self.server
        async with server.call(context) as call, contextlib.aclosing(server.outputs(request, call)) as outs:
            streamed = False
            async for out in outs:
                if not (out.delta_text or out.delta_token_ids or out.finished):
                    continue
                if out.finish_reason == "error" and not streamed:
                    # failed before its first token (e.g. its adapter vanished before admission): the status the
                    # unary call would get (NOT_FOUND, ...), not an OK stream whose only message is an error
                    await context.abort_with_status(
                        errs.engine_error(out.error, out.request_id, request.adapter_id, server.adapter_root)[0])
                streamed = True
                msg = pb.GenerateStreamResponse(request_id=out.request_id, text=out.delta_text,
                                                token_ids=out.delta_token_ids,
                                                logprobs=logprobs_proto(out.delta_logprobs))
                if out.finished:
                    fill_finish(msg, out)
                    if out.finish_reason == "error":
                        msg.error = errs.engine_error(out.error, out.request_id, request.adapter_id,
                                                      server.adapter_root)[1]
                yield msg

    async def Tokenize(self, request, context):
        async with self.server.call(context) as call:
            engine = self.server.engine
            call.prompt_field = "text"  # the engine's tokenize refuses a text too long to ever fit the context

            def work():
                ids = engine.tokenize(request.text) if request.text else []
                return ids, engine.tokenizer.convert_ids_to_tokens(ids)

            ids, tokens = await self.server.run_blocking(work)
            return pb.TokenizeResponse(token_ids=ids, tokens=[str(t) for t in tokens])

    async def GetModelInfo(self, request, context):
        async with self.server.call(context):
            engine = self.server.engine
            cfg, mc = engine.config, engine.model.config
            cache = engine.adapter_cache
            stats = cache.stats() if cache is not None else None
            return pb.GetModelInfoResponse(
                base_model=self.server.options.model_name, model_family=mc.family,
                dtype=str(engine.model.dtype).removeprefix("torch."),
                quantization=quantization_proto(engine.model.quantize),
                device=str(engine.model.device), max_context_tokens=engine.max_model_len, vocab_size=mc.vocab_size,
                max_num_seqs=cfg.max_num_seqs, max_queue=cfg.max_waiting,
                kv_cache_blocks=engine.block_manager.num_blocks, kv_block_size=cfg.block_size,
                adapters_enabled=stats is not None,
                adapter_cache_device_pages=stats.num_device_pages if stats else 0,
                adapter_cache_host_bytes=stats.host_budget_bytes if stats else 0,
                server_version=aspen.__version__, chat_template=engine.chat_templates.base_template is not None)


class AdapterServicer(pb_grpc.AdapterServiceServicer):
    def __init__(self, server: Serving) -> None:
        self.server = server

    async def LoadAdapter(self, request, context):
        async with self.server.call(context) as call:
            call.adapter_id = request.adapter_id
            call.adapter_field = "path" if request.path else "adapter_id"
            engine = self.server.engine

            def work():
                info = engine.load_adapter(request.adapter_id, request.path or None)
                return adapter_info_proto(engine, info, True)

            info = await self.server.run_blocking(work)
            log.info("adapter %r loaded (tier %s)", request.adapter_id, pb.AdapterTier.Name(info.tier))
            return pb.LoadAdapterResponse(adapter=info)

    async def UnloadAdapter(self, request, context):
        async with self.server.call(context) as call:
            call.adapter_id = request.adapter_id
            await self.server.run_blocking(self.server.engine.unload_adapter, request.adapter_id)
            log.info("adapter %r unloaded", request.adapter_id)
            return pb.UnloadAdapterResponse()

    async def ListAdapters(self, request, context):
        async with self.server.call(context):
            engine = self.server.engine

            def work():
                cache = engine.adapter_cache
                registered = {i.adapter_id for i in cache.info()} if cache is not None else set()
                return [adapter_info_proto(engine, i, i.adapter_id in registered) for i in engine.list_adapters()]

            return pb.ListAdaptersResponse(adapters=await self.server.run_blocking(work))
