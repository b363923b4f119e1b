"""Map engine exceptions to gRPC statuses with ``google.rpc`` rich error details (via grpcio-status), and the
bearer-token interceptor that answers UNAUTHENTICATED.

Every error a client can cause is classified explicitly, once, into a protocol-neutral :class:`Failure`
(:func:`classify`, :func:`classify_engine_error`), which the gRPC front renders as a status here
(:func:`status_of`) and the HTTP front (:mod:`engine.http.errors`) as an OpenAI error object; the codes and their
details are documented at the top of ``proto/aspen/v1/aspen.proto``. Anything unexpected becomes ``INTERNAL``
with a generic message: the exception and its traceback go to the server log, never to the client.

Clients decode the details with ``grpc_status.rpc_status.from_call(call)`` and unpack the ``Any`` entries into
``google.rpc.error_details_pb2`` messages (``BadRequest``, ``ResourceInfo``, ``RetryInfo``, ...).
"""
from __future__ import annotations

import contextlib
import hmac
import inspect
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from aspen.errors import AdapterError, AdapterNotFoundError, AdapterPathError
from engine.adapters.cache import AdapterBusyError
from engine.async_engine import EngineDeadError
from engine.scheduling.errors import DuplicateRequestError, RequestError
from engine.scheduling.sampling_params import SamplingParamsError
from engine.scheduling.scheduler import QueueFullError

log = logging.getLogger("aspen.server")

#: How long clients are told to back off when the queue is full or the server is starting / draining.
RETRY_AFTER_S = 1.0
GENERIC_INTERNAL = "internal server error; the server log has the details"
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")  # no auth: probes and tooling


class InvalidArgument(ValueError):
    """A field of the wire message is invalid (the server's own checks: parsing the message, not the request's
    rules, which are the engine's); ``field`` is its path in the request message (e.g. ``prompt``)."""

    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"invalid {field}: {reason}")


@dataclass
class CallFields:
    """What the error mapping of one call needs to know about its request: the field an
    :class:`AdapterPathError` blames (``adapter_id`` or ``path``), the adapter concerned, and the prompt field
    the request used (``text``, ``token_ids.ids`` or ``messages.messages``; ``prompt`` while unknown)."""

    adapter_field: str = "adapter_id"
    adapter_id: str = ""
    prompt_field: str = "prompt"

    def path_of(self, engine_field: str) -> str:
        """The request message's path of an engine request field: the prompt is the member of the ``prompt``
        oneof that the request set (``messages[i].role`` is ``messages.messages[i].role``); the other fields have
        the same name in the message."""
        if engine_field == "prompt":
            return self.prompt_field
        if engine_field.startswith("messages"):
            return "messages." + engine_field
        return engine_field


def _pack(message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def make_status(code: grpc.StatusCode, message: str, details: Sequence = ()) -> grpc.Status:
    """A ``grpc.Status`` carrying ``google.rpc.Status`` with the given detail messages."""
    proto = status_pb2.Status(code=getattr(code_pb2, code.name), message=message,
                              details=[_pack(d) for d in details])
    return rpc_status.to_status(proto)


def invalid_argument(message: str, violations: Sequence[tuple[str, str]]) -> grpc.Status:
    """``INVALID_ARGUMENT`` with a ``BadRequest`` listing (field path, description) pairs."""
    bad = error_details_pb2.BadRequest(field_violations=[
        error_details_pb2.BadRequest.FieldViolation(field=f, description=d) for f, d in violations])
    return make_status(grpc.StatusCode.INVALID_ARGUMENT, message, [bad])


def not_found(resource_type: str, name: str, message: str) -> grpc.Status:
    info = error_details_pb2.ResourceInfo(resource_type=resource_type, resource_name=name, description=message)
    return make_status(grpc.StatusCode.NOT_FOUND, message, [info])


def already_exists(resource_type: str, name: str, message: str) -> grpc.Status:
    info = error_details_pb2.ResourceInfo(resource_type=resource_type, resource_name=name, description=message)
    return make_status(grpc.StatusCode.ALREADY_EXISTS, message, [info])


def failed_precondition(kind: str, subject: str, message: str) -> grpc.Status:
    failure = error_details_pb2.PreconditionFailure(violations=[
        error_details_pb2.PreconditionFailure.Violation(type=kind, subject=subject, description=message)])
    return make_status(grpc.StatusCode.FAILED_PRECONDITION, message, [failure])


def _retry_info(seconds: float) -> error_details_pb2.RetryInfo:
    whole = int(seconds)
    return error_details_pb2.RetryInfo(
        retry_delay=duration_pb2.Duration(seconds=whole, nanos=int((seconds - whole) * 1e9)))


def resource_exhausted(message: str, retry_after_s: float = RETRY_AFTER_S) -> grpc.Status:
    return make_status(grpc.StatusCode.RESOURCE_EXHAUSTED, message, [_retry_info(retry_after_s)])


def unavailable(message: str, retry_after_s: float = RETRY_AFTER_S) -> grpc.Status:
    return make_status(grpc.StatusCode.UNAVAILABLE, message, [_retry_info(retry_after_s)])


def unauthenticated(message: str) -> grpc.Status:
    return make_status(grpc.StatusCode.UNAUTHENTICATED, message)


def internal() -> grpc.Status:
    return make_status(grpc.StatusCode.INTERNAL, GENERIC_INTERNAL)


def sampling_field(error: SamplingParamsError) -> str:
    """Field path of a sampling-parameter error; a prompt that alone fills the context is the prompt's fault."""
    if error.field == "max_new_tokens" and "a shorter prompt" in error.reason:
        return "prompt"
    return f"params.{error.field}"


def redact_paths(text: str, root: str | None) -> str:
    """``text`` for a client: paths below the server's adapter root shown relative to it, the root itself hidden
    (the server log keeps the full paths)."""
    if not root or root == os.sep:
        return text
    return text.replace(root.rstrip(os.sep) + os.sep, "").replace(root, "<adapter root>")


@dataclass(frozen=True)
class Failure:
    """What a client is told about a failed call, independent of the protocol: every front end classifies an
    exception once (:func:`classify`, :func:`classify_engine_error`) and renders the result in its own terms (a
    gRPC status with rich details here, an OpenAI error object over HTTP). ``code`` is the classification (the
    gRPC code; HTTP maps it with the standard google.rpc table); ``violations`` are (field path, reason) pairs of
    an INVALID_ARGUMENT; ``resource`` the (type, name) of a NOT_FOUND / ALREADY_EXISTS; ``precondition`` the
    (type, subject) of a FAILED_PRECONDITION; ``retry_after_s`` the back-off of a retryable refusal."""

    code: grpc.StatusCode
    message: str
    violations: tuple[tuple[str, str], ...] = ()
    resource: tuple[str, str] | None = None
    precondition: tuple[str, str] | None = None
    retry_after_s: float | None = None


def status_of(failure: Failure) -> grpc.Status:
    """The gRPC status (with its google.rpc details) of a classified failure."""
    code, text = failure.code, failure.message
    if code is grpc.StatusCode.INVALID_ARGUMENT:
        return invalid_argument(text, failure.violations)
    if code is grpc.StatusCode.NOT_FOUND:
        return not_found(*failure.resource, text)
    if code is grpc.StatusCode.ALREADY_EXISTS:
        return already_exists(*failure.resource, text)
    if code is grpc.StatusCode.FAILED_PRECONDITION:
        return failed_precondition(*failure.precondition, text)
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        return resource_exhausted(text, failure.retry_after_s or RETRY_AFTER_S)
    if code is grpc.StatusCode.UNAVAILABLE:
        return unavailable(text, failure.retry_after_s or RETRY_AFTER_S)
    return make_status(code, text)


def _invalid(text: str, path: str, reason: str) -> Failure:
    return Failure(grpc.StatusCode.INVALID_ARGUMENT, text, ((path, reason),))


def classify(exc: BaseException, call: CallFields | None = None, root: str | None = None) -> Failure:
    """What a client is told for ``exc`` raised while serving ``call`` (field paths and the adapter concerned:
    :class:`CallFields`); ``root`` (the adapter root) is redacted from messages (:func:`redact_paths`). Anything
    outside the contract is logged with its traceback and reported as a generic INTERNAL."""
    call = call or CallFields()
    text = redact_paths(str(exc), root)
    if isinstance(exc, InvalidArgument):
        return _invalid(text, exc.field, exc.reason)
    if isinstance(exc, SamplingParamsError):
        return _invalid(text, call.path_of(sampling_field(exc)), exc.reason)
    if isinstance(exc, DuplicateRequestError):
        return Failure(grpc.StatusCode.ALREADY_EXISTS, text, resource=("request", exc.request_id))
    if isinstance(exc, RequestError):
        path, reason = call.path_of(exc.field), redact_paths(exc.reason, root)
        return _invalid(f"invalid {path}: {reason}", path, reason)
    if isinstance(exc, AdapterPathError):
        return _invalid(text, call.adapter_field, text)
    if isinstance(exc, AdapterNotFoundError):
        return Failure(grpc.StatusCode.NOT_FOUND, text, resource=("adapter", call.adapter_id))
    if isinstance(exc, AdapterBusyError):
        return Failure(grpc.StatusCode.FAILED_PRECONDITION, text,
                       precondition=("ADAPTER_BUSY", f"adapter/{call.adapter_id}"))
    if isinstance(exc, AdapterError):
        return Failure(grpc.StatusCode.FAILED_PRECONDITION, text,
                       precondition=("ADAPTER_INCOMPATIBLE", f"adapter/{call.adapter_id}"))
    if isinstance(exc, QueueFullError):
        return Failure(grpc.StatusCode.RESOURCE_EXHAUSTED, text, retry_after_s=RETRY_AFTER_S)
    if isinstance(exc, EngineDeadError):
        log.error("request refused: %s", exc)
        return Failure(grpc.StatusCode.UNAVAILABLE, "the engine is not running; retry on another replica",
                       retry_after_s=RETRY_AFTER_S)
    log.error("unexpected error while serving a call", exc_info=exc)
    return Failure(grpc.StatusCode.INTERNAL, GENERIC_INTERNAL)


def status_for_exception(exc: BaseException, call: CallFields | None = None,
                         root: str | None = None) -> grpc.Status:
    """The status a client gets for ``exc`` raised while serving ``call`` (see :func:`classify`)."""
    return status_of(classify(exc, call, root))


# Engine-side failures reported as a finished output with finish_reason "error": the error is a string
# "ExceptionName: message". Adapter failures at admission (e.g. the adapter vanished from disk) are the
# client's to see; anything else is a server problem and is reported generically.
_CLIENT_ERRORS = {
    "AdapterNotFoundError": grpc.StatusCode.NOT_FOUND,
    "AdapterPathError": grpc.StatusCode.INVALID_ARGUMENT,
    "AdapterError": grpc.StatusCode.FAILED_PRECONDITION,
    "AdapterBusyError": grpc.StatusCode.FAILED_PRECONDITION,
    "QueueFullError": grpc.StatusCode.RESOURCE_EXHAUSTED,  # a late refusal at the step boundary: retryable
    # the request's grammar could not be followed (e.g. too complex for the matcher's limits): the client's format
    "ResponseFormatError": grpc.StatusCode.INVALID_ARGUMENT,
}


def classify_engine_error(error: str | None, request_id: str, adapter_id: str, root: str | None = None,
                          adapter_field: str = "adapter_id") -> Failure:
    """What a client is told about a request the engine finished with an error (``root``: as for
    :func:`classify`; ``adapter_field``: the request field that names the adapter)."""
    name, _, message = (error or "").partition(": ")
    message = redact_paths(message, root)
    code = _CLIENT_ERRORS.get(name)
    if code is grpc.StatusCode.NOT_FOUND:
        return Failure(code, message, resource=("adapter", adapter_id))
    if code is grpc.StatusCode.INVALID_ARGUMENT:
        # a ResponseFormatError's message starts with its field path ("response_format.regex: ...")
        field = message.partition(": ")[0] if name == "ResponseFormatError" else adapter_field
        return _invalid(message, field, message)
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        return Failure(code, message, retry_after_s=RETRY_AFTER_S)
    if code is not None:
        return Failure(code, message, precondition=("ADAPTER_INCOMPATIBLE", f"adapter/{adapter_id}"))
    log.error("request %r failed inside the engine: %s", request_id, error)  # %r: ids are client text
    text = f"generation failed inside the engine (request {request_id}); the server log has the details"
    return Failure(grpc.StatusCode.INTERNAL, text)


def engine_error(error: str | None, request_id: str, adapter_id: str,
                 root: str | None = None) -> tuple[grpc.Status, str]:
    """Status and client-safe message for a request the engine finished with an error (see
    :func:`classify_engine_error`)."""
    failure = classify_engine_error(error, request_id, adapter_id, root)
    return status_of(failure), failure.message


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Requires ``authorization: Bearer <token>`` on every call but health checks and reflection."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_METHOD_PREFIXES):
            return handler
        given = [v for k, v in (details.invocation_metadata or ()) if k == "authorization"]
        value = given[0].encode() if given and isinstance(given[0], str) else b""
        if len(given) == 1 and hmac.compare_digest(value, self._expected):
            return handler
        reason = "missing 'authorization: Bearer <token>' metadata" if not given else "invalid bearer token"
        status = unauthenticated(reason)

        async def deny(_request, context):
            await context.abort_with_status(status)

        kind = ("unary_unary" if handler.unary_unary else "unary_stream" if handler.unary_stream
                else "stream_unary" if handler.stream_unary else "stream_stream")
        make = getattr(grpc, f"{kind}_rpc_method_handler")
        return make(deny, request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer)


class _Unparsable:
    """Stands in for a request message that could not be decoded (see :class:`ParseErrorInterceptor`)."""

    def __init__(self, error: Exception) -> None:
        self.error = error


class ParseErrorInterceptor(grpc.aio.ServerInterceptor):
    """Answers INVALID_ARGUMENT for request bytes that do not decode as the method's message.

    grpc answers UNKNOWN ("Unexpected DecodeError ...") when a request deserializer raises, e.g. for corrupt wire
    data or a string field holding invalid UTF-8; that is client input, so it gets a documented status instead.
    Only ``aspen.v1`` methods (all unary-request) are wrapped; health and reflection pass through unchanged."""

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None or handler.request_streaming \
                or not details.method.startswith("/aspen."):
            return handler
        parse = handler.request_deserializer

        def safe_parse(raw: bytes):
            try:
                return parse(raw)
            except Exception as e:  # noqa: BLE001 -- DecodeError and friends: reported to the client below
                return _Unparsable(e)

        def refusal(request: _Unparsable) -> grpc.Status:
            reason = f"the request message could not be decoded ({type(request.error).__name__}: {request.error})"
            return invalid_argument(reason, [("request", reason)])

        if handler.unary_unary:
            behavior = handler.unary_unary

            async def unary(request, context):
                if isinstance(request, _Unparsable):
                    await context.abort_with_status(refusal(request))
                return await behavior(request, context)

            return grpc.unary_unary_rpc_method_handler(unary, request_deserializer=safe_parse,
                                                       response_serializer=handler.response_serializer)
        behavior = handler.unary_stream

        async def stream(request, context):
            if isinstance(request, _Unparsable):
                await context.abort_with_status(refusal(request))
            result = behavior(request, context)
            if inspect.isasyncgen(result):
                async with contextlib.aclosing(result):  # a cancelled call closes the handler at once, not at GC
                    async for message in result:
                        yield message
            else:  # a coroutine handler (e.g. the auth interceptor's refusal) writes or aborts itself
                await result

        return grpc.unary_stream_rpc_method_handler(stream, request_deserializer=safe_parse,
                                                    response_serializer=handler.response_serializer)
