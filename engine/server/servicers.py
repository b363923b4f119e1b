"""The gRPC servicers: ``aspen.v1.GenerationService`` and ``aspen.v1.AdapterService`` methods.

Each method runs inside :meth:`AspenServer.call <engine.server.app.AspenServer.call>` (admission, in-flight count,
exception -> status mapping). Generate and GenerateStream leave request validation and the engine stream to
:meth:`AspenServer.outputs <engine.server.app.AspenServer.outputs>`; other blocking engine work (tokenizing, adapter
loads and listings) runs on the engine thread via ``run_blocking``. Message building: :mod:`engine.server.proto_convert`.
"""
from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING

from clients.aspen.v1 import aspen_pb2 as pb
from clients.aspen.v1 import aspen_pb2_grpc as pb_grpc
from engine.adapters.paths import validate_adapter_id
from engine.server import status as errs
from engine.server.proto_convert import adapter_info_proto, fill_finish, logprobs_proto, quantization_proto

if TYPE_CHECKING:
    from engine.server.app import AspenServer

log = logging.getLogger("aspen.server")


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
                                      logprobs=logprobs_proto(final.logprobs))
            fill_finish(msg, final)
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
                                                logprobs=logprobs_proto(out.delta_logprobs))
                if out.finished:
                    fill_finish(msg, out)
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
            stats = llm.adapter_cache.stats() if llm.adapter_cache is not None else None
            return pb.GetModelInfoResponse(
                base_model=self.s.options.model_name, model_family=mc.family,
                dtype=str(llm.model.dtype).removeprefix("torch."),
                quantization=quantization_proto(llm.model.quantize),
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
                registered = {i.adapter_id for i in llm.adapter_cache.info()} if llm.adapter_cache is not None else set()
                return [adapter_info_proto(llm, i, i.adapter_id in registered) for i in llm.list_adapters()]

            return pb.ListAdaptersResponse(adapters=await self.s.engine.run_blocking(work))
