"""Errors of the HTTP API as OpenAI error objects: ``{"error": {"message", "type", "param", "code"}}`` with the
HTTP status of the failure.

The classification is the gRPC front's (:func:`engine.server.status.classify`): one place decides what each engine
error means for a client; this module only renders a :class:`~engine.server.status.Failure` over HTTP, with the
standard google.rpc code -> HTTP status table, ``param`` naming the body field at fault (the engine's field names
translated by :class:`HttpCallFields`) and ``Retry-After`` on 429 / 503.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import grpc
from starlette.responses import Response

from engine.http.responses import ErrorDetail, ErrorResponse
from engine.server.status import CallFields, Failure

#: google.rpc code -> HTTP status (the table of google/rpc/code.proto).
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
}
#: HTTP status -> OpenAI error ``type``.
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
               405: "invalid_request_error", 409: "invalid_request_error", 413: "invalid_request_error",
               429: "rate_limit_error", 503: "service_unavailable_error"}
#: The OpenAI body field of each engine sampling field whose name differs.
_PARAMS = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens"}


@dataclass
class HttpCallFields(CallFields):
    """:class:`CallFields` of an HTTP call: engine field paths become the body's field names (``prompt`` the
    body's prompt field, ``params.max_new_tokens`` -> ``max_tokens`` or ``max_completion_tokens``,
    ``response_format.json_schema`` -> the format field the body used, ``adapter_id`` -> ``model``, list
    indices as the body validation names them: ``messages.0.role``)."""

    adapter_field: str = "model"
    renamed: dict[str, str] = field(default_factory=dict)  # engine sampling field -> body field, per request
    format_field: str = "response_format"

    def path_of(self, engine_field: str) -> str:
        if engine_field == "prompt":
            return self.prompt_field
        if engine_field.startswith("params."):
            name = engine_field.removeprefix("params.")
            return self.renamed.get(name) or _PARAMS.get(name, name)
        if engine_field.startswith("response_format"):
            return self.format_field
        if engine_field == "adapter_id":
            return "model"
        return re.sub(r"\[(\d+)\]", r".\1", engine_field)  # messages[0].role -> messages.0.role, as pydantic


class ApiError(Exception):
    """An HTTP error with its OpenAI error body (raised by handlers, rendered by :func:`error_response`)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.retry_after_s = retry_after_s

    @classmethod
    def of(cls, failure: Failure, adapter_param: str | None = None) -> ApiError:
        """The HTTP error of a classified failure; ``adapter_param``: the body field naming the adapter (the
        ``param`` of an adapter that is not found)."""
        status = HTTP_STATUS.get(failure.code, 500)
        param = failure.violations[0][0] if failure.violations else None
        code = None
        if failure.code is grpc.StatusCode.NOT_FOUND:
            adapter = failure.resource is not None and failure.resource[0] == "adapter"
            code, param = ("model_not_found", adapter_param) if adapter else ("not_found", None)
        elif failure.precondition is not None:
            code = failure.precondition[0].lower()
        elif failure.code is grpc.StatusCode.RESOURCE_EXHAUSTED:
            code = "queue_full"
        message = f"invalid {param}: {failure.violations[0][1]}" if failure.violations else failure.message
        return cls(status, message, param, code, failure.retry_after_s)

    def body(self) -> ErrorResponse:
        kind = ERROR_TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        return ErrorResponse(error=ErrorDetail(message=self.message, type=kind, param=self.param, code=self.code))


def error_response(error: ApiError) -> Response:
    headers = {}
    if error.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, math.ceil(error.retry_after_s)))
    return Response(error.body().model_dump_json(), status_code=error.status, headers=headers,
                    media_type="application/json")
