"""Running one completion or chat completion request on the engine: its choices as engine requests, the whole
response or a Server-Sent Events stream, and the end of every engine request when the client goes away.

Lifecycle of a request: admitted (503 unless the server is serving) and counted in flight (the drain waits for
it), its jobs (:mod:`engine.http.convert`) started on the engine, the first output awaited, so that a refusal
(bad input, unknown adapter, full queue) is an HTTP error status, never a stream that fails; then either every
output is collected (unary) or each is sent as a chunk (streamed) ending with ``data: [DONE]``. A failure after
the first chunk is sent as an event ``{"error": {...}}`` before ``[DONE]``, as vLLM does. A client that
disconnects cancels the request: each of its engine requests is aborted, freeing its KV blocks and adapter pin
(as a cancelled gRPC stream does).
"""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from engine.http.convert import Job
from engine.http.errors import ApiError, HttpCallFields
from engine.http.render import DONE, Renderer, sse
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.scheduling.sampling_params import SamplingParams
from engine.server.metrics import ServerMetrics
from engine.server.options import ServerOptions
from engine.server.status import RETRY_AFTER_S, classify, classify_engine_error


class Host(Protocol):
    """What the HTTP front uses of the server that owns the engine (:class:`engine.server.app.AspenServer`)."""

    options: ServerOptions
    engine: LLMEngine | None  # None until the model is loaded; calls are admitted only after
    metrics: ServerMetrics

    @property
    def adapter_root(self) -> str | None: ...

    async def refusal(self) -> str | None: ...

    def in_flight(self) -> contextlib.AbstractContextManager[None]: ...

    def stream(self, prompt: Any, params: SamplingParams, adapter_id: str | None,
               request_id: str | None) -> AsyncIterator[RequestOutput]: ...

    async def run_blocking(self, fn: Callable[..., Any], *args: Any) -> Any: ...


async def admit(host: Host) -> None:
    """Refuse with 503 and ``Retry-After`` unless the server is serving (starting, draining, failed)."""
    why = await host.refusal()
    if why is not None:
        raise ApiError(503, why, code="unavailable", retry_after_s=RETRY_AFTER_S)


def adapter_of(host: Host, model: str | None) -> str | None:
    """The adapter a body's ``model`` names: None for the base model (its served name, or no model given)."""
    return None if model is None or model == host.options.model_name else model


class Release:
    """Ends what a streamed response holds, once: its engine requests (closing their outputs aborts the
    unfinished ones) and its in-flight count."""

    def __init__(self, outputs, held: contextlib.ExitStack) -> None:
        self.outputs, self.held, self.done = outputs, held, False

    async def __call__(self) -> None:
        if not self.done:
            self.done = True
            try:
                await self.outputs.aclose()
            finally:
                self.held.close()


class EventStream(StreamingResponse):
    """An SSE response that always releases what it holds when it ends, sent in full or not: a client that
    disconnects cancels the sending, possibly before the event source has started (whose own cleanup then never
    runs), so the release is the response's."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[str], release: Release) -> None:
        super().__init__(events, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.release = release

    async def __call__(self, scope, receive, send) -> None:
        try:
            async with contextlib.aclosing(self.body_iterator):
                await super().__call__(scope, receive, send)
        finally:
            await self.release()


async def choice_outputs(host: Host, jobs: list[Job], adapter: str | None,
                         request_id: str) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(choice index, output) of every job's engine request, in the order they arrive. Closing this generator
    (or a job's refusal) ends every job's engine request."""
    if len(jobs) == 1:
        job = jobs[0]
        async with contextlib.aclosing(host.stream(job.prompt, job.params, adapter, request_id)) as outs:
            async for out in outs:
                yield job.index, out
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(job: Job) -> None:
        try:
            async with contextlib.aclosing(host.stream(job.prompt, job.params, adapter,
                                                       f"{request_id}-{job.index}")) as outs:
                async for out in outs:
                    queue.put_nowait((job.index, out))
        except Exception as e:  # noqa: BLE001 -- handed to the consumer, which re-raises it
            queue.put_nowait((job.index, e))

    tasks = [asyncio.ensure_future(pump(job)) for job in jobs]
    try:
        pending = len(jobs)
        while pending:
            index, item = await queue.get()
            if isinstance(item, Exception):
                raise item
            pending -= item.finished
            yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _disconnected(request: Request) -> None:
    """Returns once the client has gone (the body is read by then: what arrives next is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class Generation:
    """One completion / chat completion request on the engine (see the module docstring)."""

    def __init__(self, host: Host, request: Request, call: HttpCallFields, renderer: Renderer, adapter: str | None,
                 stream: bool) -> None:
        self.host, self.request, self.call, self.renderer = host, request, call, renderer
        self.adapter, self.stream = adapter, stream
        call.adapter_id = adapter or ""

    def failure(self, e: BaseException) -> ApiError:
        return e if isinstance(e, ApiError) else ApiError.of(classify(e, self.call, self.host.adapter_root), "model")

    def engine_failure(self, out: RequestOutput) -> ApiError:
        return ApiError.of(classify_engine_error(out.error, out.request_id, self.adapter or "",
                                                 self.host.adapter_root, adapter_field="model"), "model")

    async def respond(self, make_jobs: Callable[[], Awaitable[list[Job]]]) -> Response:
        """Admit, run and answer the request; ``make_jobs`` converts its body (refusals raise)."""
        await admit(self.host)
        with contextlib.ExitStack() as held:
            held.enter_context(self.host.in_flight())
            try:
                outputs = choice_outputs(self.host, await make_jobs(), self.adapter, self.renderer.id)
                if not self.stream:
                    return await self._unary(outputs)
                first = await self._first(outputs)
            except ApiError:
                raise
            except Exception as e:  # noqa: BLE001 -- classified: client errors get their status, the rest 500
                raise self.failure(e) from None
            # the response now owns the in-flight count and the engine requests
            release = Release(outputs, held.pop_all())
            return EventStream(self._events(first, outputs, release), release)

    async def _first(self, outputs) -> tuple[int, RequestOutput]:
        try:
            index, out = await anext(outputs)
        except BaseException:
            await outputs.aclose()
            raise
        if out.finish_reason == "error":
            await outputs.aclose()
            raise self.engine_failure(out)
        return index, out

    async def _unary(self, outputs) -> Response:
        async def collect() -> dict[int, RequestOutput]:
            finals: dict[int, RequestOutput] = {}
            async with contextlib.aclosing(outputs):
                async for index, out in outputs:
                    if out.finish_reason == "error":
                        raise self.engine_failure(out)
                    if out.finished:
                        finals[index] = out
            return finals

        work = asyncio.ensure_future(collect())
        gone = asyncio.ensure_future(_disconnected(self.request))
        try:
            await asyncio.wait([work, gone], return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not work.done():  # the client went away: nobody to answer; the engine requests end now
                work.cancel()
                await asyncio.gather(work, return_exceptions=True)
        if work.cancelled():
            return Response(status_code=499)  # never sent: the connection is gone
        body = self.renderer.response(work.result())
        return Response(body.model_dump_json(), media_type="application/json")

    async def _events(self, first: tuple[int, RequestOutput], outputs, release: Release) -> AsyncIterator[str]:
        renderer = self.renderer
        finals: dict[int, RequestOutput] = {}
        try:
            for event in renderer.start():
                yield event
            item: tuple[int, RequestOutput] | None = first
            while item is not None:
                index, out = item
                if out.finish_reason == "error":
                    raise self.engine_failure(out)
                if out.delta_text or out.delta_token_ids or out.finished:
                    yield renderer.chunk(index, out)
                if out.finished:
                    finals[index] = out
                item = await anext(outputs, None)
            if renderer.include_usage:
                yield renderer.usage_event(finals)
        except Exception as e:  # noqa: BLE001 -- the status line is sent: the error goes in the stream
            yield sse(self.failure(e).body())
        finally:
            await release()
        yield DONE
