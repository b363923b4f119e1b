"""``aspen serve``: run the gRPC server (and the OpenAI-compatible HTTP API beside it) until SIGTERM / SIGINT.

The server listens first (health NOT_SERVING, calls UNAVAILABLE), loads the model, then logs one line::

    ASPEN serve ready on 127.0.0.1:50051 (model demo, adapters /home/me/.cache/aspen/demo/adapters, tls off, auth off)

(``--port 0`` picks a free port; the line shows the real one, plus the metrics URL when ``--metrics-port`` is
set, and the OpenAI-compatible HTTP API's base URL unless ``--http-port 0``). The first SIGTERM / SIGINT drains: health NOT_SERVING, new calls UNAVAILABLE, in-flight requests get
``--grace-period`` seconds to finish, then the process exits 0. A second signal cancels what is still running
and exits at once (status 1).
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from aspen.demo import default_home
from engine.server import flags
from engine.server.app import AspenServer
from engine.server.options import MODEL, NETWORK, ServerOptions

log = logging.getLogger("aspen.server")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of every :class:`ServerOptions` field (:mod:`engine.server.flags`), plus the two that do not map
    to a field one to one: the token's file and the demo adapters' opt-out."""
    sections = flags.add_arguments(p, ServerOptions)
    sections[MODEL].add_argument("--no-demo-adapters", action="store_true",
                                 help="with --model demo: do not train the demo adapters on first start")
    sections[NETWORK].add_argument("--auth-token-file", default=None,
                                   help="file holding a bearer token every call must present (health and "
                                        "reflection stay open)")


def options_from_args(args: argparse.Namespace) -> ServerOptions:
    """ServerOptions for parsed arguments (reads the token file; never logs the token). With ``--model demo``
    and no ``--adapter-dir`` the adapter root is ``$ASPEN_HOME/demo/adapters``, where the demo adapters are
    trained on first start unless ``--no-demo-adapters``."""
    adapter_dir = args.adapter_dir
    demo_root = args.model == "demo" and adapter_dir is None
    if demo_root:
        adapter_dir = os.path.join(default_home(), "demo", "adapters")
        os.makedirs(adapter_dir, exist_ok=True)
    token = None
    if args.auth_token_file:
        with open(args.auth_token_file, encoding="utf-8") as f:
            token = f.read().strip()
        if not token:
            raise ValueError(f"--auth-token-file {args.auth_token_file!r} is empty")
    return flags.from_args(ServerOptions, args, adapter_dir=adapter_dir, auth_token=token,
                           train_demo_adapters=demo_root and not args.no_demo_adapters)


def ready_line(server: AspenServer) -> str:
    o = server.options
    line = (f"ASPEN serve ready on {o.host}:{server.port} (model {o.model_name}, "
            f"adapters {o.adapter_dir or 'none'}, tls {'on' if o.tls_cert else 'off'}, "
            f"auth {'on' if o.auth_token else 'off'})")
    if server.metrics_port is not None:
        line += f"; metrics on http://{o.metrics_host}:{server.metrics_port}/metrics"
    if server.http is not None:
        line += f"; OpenAI-compatible HTTP API on {server.http.url}"
    return line


async def serve(options: ServerOptions, holder: list | None = None) -> int:
    """Run until a signal; 0 after a graceful drain, 1 when a second signal forced the exit. The server is
    appended to ``holder`` (when given) so the caller can inspect it afterwards."""
    server = AspenServer(options)
    if holder is not None:
        holder.append(server)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = {"count": 0}

    def on_signal(signum: int) -> None:
        signals["count"] += 1
        if signals["count"] == 1:
            log.info("%s received: draining (grace period %.0fs; signal again to force)",
                     signal.Signals(signum).name, options.grace_period)
            stop.set()
        else:
            log.warning("second signal: cancelling in-flight requests and exiting")
            server.force()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    await server.bind()
    log.info("listening on %s:%d; loading model %s", options.host, server.port, options.model_name)
    loading = asyncio.ensure_future(server.load())
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait([loading, stopping], return_when=asyncio.FIRST_COMPLETED)
    if loading.done() and loading.exception() is not None:
        stopping.cancel()
        await server.stop(0)
        raise loading.exception()
    if loading.done():
        log.info("%s", ready_line(server))
        await stopping
    else:
        log.info("stopped before the model finished loading")
        loading.cancel()
    drained = await server.stop()
    log.info("server stopped (%s)", "drained" if drained else "in-flight requests cancelled")
    return 0 if signals["count"] < 2 else 1


def run(args: argparse.Namespace) -> int:
    try:
        options = options_from_args(args)
        holder: list = []
        code = asyncio.run(serve(options, holder))
    except (ValueError, OSError) as e:  # bad options, unreadable files, a port in use
        print(f"aspen serve: error: {e}", file=sys.stderr)
        return 1
    if holder and holder[0].loading:
        # Stopped while the model was still loading: interpreter teardown under a thread that is inside native
        # code (torch, tokenizers) can abort the process, so leave without it.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
