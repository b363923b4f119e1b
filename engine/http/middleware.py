"""ASGI middleware of the HTTP API: the bearer token (the gRPC server's, checked the same way) and the body size
limit (``max_message_bytes``, the gRPC message limit). The token is checked first, so an unauthenticated caller
learns nothing, not even whether its body is too large."""
from __future__ import annotations

import hmac

from starlette.exceptions import HTTPException

from engine.http.errors import ApiError, error_response

#: Paths served without a token (probes), as gRPC health and reflection are.
OPEN_PATHS = frozenset({"/health"})


class TokenAuth:
    """Requires ``Authorization: Bearer <token>`` (what the ``openai`` client sends as its ``api_key``) on every
    path but :data:`OPEN_PATHS`; 401 with an OpenAI error body otherwise."""

    def __init__(self, app, token: str) -> None:
        self.app = app
        self._expected = f"Bearer {token}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        given = [v for k, v in scope["headers"] if k == b"authorization"]
        if len(given) == 1 and hmac.compare_digest(given[0], self._expected):
            return await self.app(scope, receive, send)
        reason = "missing 'Authorization: Bearer <token>' header" if not given else "invalid bearer token"
        await error_response(ApiError(401, reason, code="invalid_api_key"))(scope, receive, send)


class BodyTooLarge(HTTPException):
    """A request body over the limit (an HTTPException, so the framework's body reading passes it through)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is larger than max_message_bytes={limit}")


class BodyLimit:
    """Refuses a body over ``limit`` bytes with 413: at once from its ``Content-Length``, else (chunked) as soon
    as the bytes received pass the limit."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if length is not None and length.isdigit() and int(length) > self.limit:
            error = ApiError(413, f"the request body is larger than max_message_bytes={self.limit}")
            return await error_response(error)(scope, receive, send)
        received = 0

        async def limited():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        await self.app(scope, limited, send)
