"""The OpenAI-compatible HTTP API (FastAPI on uvicorn) beside the gRPC server, over the same engine: bodies
(:mod:`~engine.http.requests`, :mod:`~engine.http.responses`), their conversion to engine requests
(:mod:`~engine.http.convert`, :mod:`~engine.http.chat`), running them (:mod:`~engine.http.generation`,
:mod:`~engine.http.render`), errors (:mod:`~engine.http.errors`), the routes (:mod:`~engine.http.app`) and the
server's lifecycle (:mod:`~engine.http.server`)."""
