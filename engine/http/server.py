"""The HTTP server (uvicorn) of the OpenAI-compatible API, on the event loop of the server that owns the engine.

:class:`HttpServer` is started and stopped by :class:`engine.server.app.AspenServer`: :meth:`HttpServer.bind`
listens at once (every call answered 503 until the model is loaded, like gRPC's UNAVAILABLE), and
:meth:`HttpServer.stop` runs after the drain: new calls were answered 503 meanwhile, and in-flight ones have
finished or are cancelled now (a cancelled stream aborts its engine requests). Uvicorn's own signal handling is
not used: the process's SIGTERM / SIGINT belong to ``aspen serve``, which drains gRPC and HTTP together.
TLS (and mutual TLS) uses the gRPC server's certificate, key and client CA.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl

import uvicorn

from engine.http.app import create_app
from engine.http.generation import Host

log = logging.getLogger("aspen.http")
#: Seconds a stopping server gives open connections to send what they have before their tasks are cancelled
#: (the drain has already waited for the in-flight calls).
CLOSE_TIMEOUT_S = 1


class HttpServer:
    def __init__(self, host: Host) -> None:
        o = host.options
        self.options = o
        self.config = uvicorn.Config(
            create_app(host), host=o.host, port=o.http_port, lifespan="off", log_config=None, access_log=False,
            timeout_graceful_shutdown=CLOSE_TIMEOUT_S, ssl_certfile=o.tls_cert, ssl_keyfile=o.tls_key,
            ssl_ca_certs=o.tls_client_ca, ssl_cert_reqs=ssl.CERT_REQUIRED if o.tls_client_ca else ssl.CERT_NONE)
        self.server: uvicorn.Server | None = None
        self.port: int | None = None
        self._socket: socket.socket | None = None
        self._ticks: asyncio.Task | None = None

    @property
    def url(self) -> str:
        scheme = "https" if self.options.tls_cert else "http"
        return f"{scheme}://{self.options.host}:{self.port}/v1"

    async def bind(self) -> int:
        """Listen on ``host:http_port`` and serve; returns the port. OSError when the address is taken."""
        o = self.options
        try:
            self._socket = socket.create_server((o.host, o.http_port), reuse_port=False)
        except OSError as e:
            raise OSError(f"cannot listen on {o.host}:{o.http_port} (--http-port): {e.strerror or e}") from None
        self.port = self._socket.getsockname()[1]
        self.config.load()
        self.server = server = uvicorn.Server(self.config)
        server.lifespan = self.config.lifespan_class(self.config)
        await server.startup(sockets=[self._socket])
        self._ticks = asyncio.ensure_future(server.main_loop())  # keeps the Date header current
        return self.port

    async def stop(self) -> None:
        """Close the listener and every connection (what is still running is cancelled)."""
        server = self.server
        if server is None:
            return
        self.server = None
        server.should_exit = True
        if self._ticks is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticks
        await server.shutdown(sockets=[self._socket])
