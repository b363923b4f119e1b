"""Errors of a request that the engine refuses, each naming the request field at fault.

The engine validates a request once, where it enters (``LLMEngine.add_request``); a front end (gRPC, HTTP) only
maps these to its own status and field path.
"""
from __future__ import annotations


class RequestError(ValueError):
    """A request field is invalid: ``field`` names it ("prompt", "request_id", ...), ``reason`` says why."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class DuplicateRequestError(RequestError):
    """A request id is already in use by a request that has not finished."""

    def __init__(self, request_id: str) -> None:
        super().__init__("request_id", f"request id {request_id!r} is already in use")
        self.request_id = request_id
