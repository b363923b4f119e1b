"""``aspen serve``: run the gRPC server until SIGTERM / SIGINT.

The server listens first (health NOT_SERVING, calls UNAVAILABLE), loads the model, then logs one line::

    ASPEN serve ready on 127.0.0.1:50051 (model demo, adapters /home/me/.cache/aspen/demo/adapters, tls off, auth off)

(``--port 0`` picks a free port; the line shows the real one, plus the metrics URL when ``--metrics-port`` is
set). The first SIGTERM / SIGINT drains: health NOT_SERVING, new calls UNAVAILABLE, in-flight requests get
``--grace-period`` seconds to finish, then the process exits 0. A second signal cancels what is still running
and exits at once (status 1).
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
from dataclasses import dataclass, field

MiB = 1 << 20
log = logging.getLogger("aspen.server")


@dataclass
class ServerOptions:
    """Everything ``aspen serve`` configures. ``engine_options`` are :class:`EngineConfig` fields."""

    model: str = "demo"
    adapter_dir: str | None = None
    host: str = "127.0.0.1"
    port: int = 50051
    quantize: str | None = None
    dtype: str = "float32"
    device: str = "cpu"
    engine_options: dict = field(default_factory=dict)
    grace_period: float = 30.0
    max_message_bytes: int = 16 * MiB
    keepalive_time_s: float = 60.0
    keepalive_timeout_s: float = 20.0
    keepalive_min_ping_interval_s: float = 10.0
    keepalive_permit_without_calls: bool = False
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    auth_token: str | None = field(default=None, repr=False)  # a secret: never in a repr or a log line
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    train_demo_adapters: bool = False  # --model demo: train the demo adapters into adapter_dir if missing

    @property
    def model_name(self) -> str:
        return "demo" if self.model == "demo" else os.path.basename(os.path.normpath(self.model))


def build_engine(options: ServerOptions):
    """The LLMEngine that ``options`` describe (loads the model: slow)."""
    from engine.llm_engine import LLMEngine

    if options.model == "demo" and options.train_demo_adapters and options.adapter_dir:
        from aspen.demo import ensure_demo_base
        from aspen.demo.adapters import ensure_demo_adapters

        # first run only (cached): about a minute or two on a 2-core CPU, while health says NOT_SERVING
        ensure_demo_adapters(ensure_demo_base(), options.adapter_dir)
    return LLMEngine(model=options.model, adapter_dir=options.adapter_dir, quantize=options.quantize,
                     dtype=options.dtype, device=options.device, progress=False, **options.engine_options)


def add_arguments(p: argparse.ArgumentParser) -> None:
    m = p.add_argument_group("model and engine")
    m.add_argument("--model", default="demo", help="base checkpoint directory, or 'demo' (default)")
    m.add_argument("--adapter-dir", default=None,
                   help="adapter root: adapter ids are paths below it (default for --model demo: "
                        "$ASPEN_HOME/demo/adapters; otherwise no adapters)")
    m.add_argument("--no-demo-adapters", action="store_true",
                   help="with --model demo: do not train the demo adapters on first start")
    m.add_argument("--quantize", choices=("none", "int8", "nf4", "fp4"), default=None)
    m.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    m.add_argument("--device", default="cpu", help="e.g. cpu, cuda, cuda:1")
    m.add_argument("--max-num-seqs", type=int, default=None, help="sequences per batch")
    m.add_argument("--max-num-batched-tokens", type=int, default=None, help="tokens per step")
    m.add_argument("--max-model-len", type=int, default=None, help="context length cap")
    m.add_argument("--kv-cache-mb", type=int, default=None, help="KV cache size in MiB")
    m.add_argument("--block-size", type=int, default=None, help="tokens per KV block")
    m.add_argument("--lora-pool-mb", type=int, default=None, help="device adapter pool in MiB")
    m.add_argument("--adapter-dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"),
                   help="storage dtype of the device adapter pool (auto: the model's); 16 bits halve the memory "
                        "traffic of many-adapter decode steps, rounding the adapter weights")
    m.add_argument("--no-packed-gemm", action="store_true",
                   help="keep float32 CPU weights in the plain layout (default: packed, in AVX-512 panels or for "
                        "MKL's GEMM: faster decode steps, same memory)")
    m.add_argument("--host-adapter-mb", type=int, default=None,
                   help="host-memory adapter tier in MiB (resident memory: adapters are read into private "
                        "buffers, not mapped; default 2048)")
    m.add_argument("--max-queue", type=int, default=0,
                   help="waiting-queue cap; beyond it calls get RESOURCE_EXHAUSTED (0 = unbounded)")
    m.add_argument("--no-prefix-caching", action="store_true")
    m.add_argument("--allow-pickle-adapters", action="store_true",
                   help="also read legacy pickled adapter_model.bin files (with torch.load(weights_only=True)); "
                        "off by default: only safetensors adapters are read")
    m.add_argument("--seed", type=int, default=None, help="seed of the shared sampler generator")
    n = p.add_argument_group("network")
    n.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    n.add_argument("--port", type=int, default=50051, help="0 picks a free port (default 50051)")
    n.add_argument("--grace-period", type=float, default=30.0,
                   help="seconds in-flight requests may take to finish after SIGTERM (default 30)")
    n.add_argument("--max-message-bytes", type=int, default=16 * MiB)
    n.add_argument("--keepalive-time", type=float, default=60.0, help="seconds between keepalive pings")
    n.add_argument("--keepalive-timeout", type=float, default=20.0, help="seconds to wait for a ping ack")
    n.add_argument("--keepalive-min-ping-interval", type=float, default=10.0,
                   help="the shortest client ping interval accepted, in seconds")
    n.add_argument("--keepalive-permit-without-calls", action="store_true")
    n.add_argument("--tls-cert", default=None, help="PEM certificate chain (enables TLS with --tls-key)")
    n.add_argument("--tls-key", default=None, help="PEM private key")
    n.add_argument("--tls-client-ca", default=None, help="PEM CA bundle: require client certificates (mTLS)")
    n.add_argument("--auth-token-file", default=None,
                   help="file holding a bearer token every call must present (health/reflection stay open)")
    n.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus /metrics on this port")
    n.add_argument("--metrics-host", default="127.0.0.1")


def options_from_args(args: argparse.Namespace):
    """ServerOptions for parsed arguments (reads the token file; never logs the token)."""
    adapter_dir = args.adapter_dir
    if adapter_dir is None and args.model == "demo":
        from aspen.demo import default_home

        adapter_dir = os.path.join(default_home(), "demo", "adapters")
        os.makedirs(adapter_dir, exist_ok=True)
    engine: dict = {"max_waiting": args.max_queue, "adapter_dtype": getattr(args, "adapter_dtype", "auto"),
                    "packed_gemm": not getattr(args, "no_packed_gemm", False)}
    for name, key, scale in (("max_num_seqs", "max_num_seqs", 1), ("max_num_batched_tokens",
                             "max_num_batched_tokens", 1), ("max_model_len", "max_model_len", 1),
                             ("kv_cache_mb", "kv_cache_bytes", MiB), ("block_size", "block_size", 1),
                             ("lora_pool_mb", "lora_pool_bytes", MiB), ("host_adapter_mb", "host_adapter_bytes", MiB),
                             ("seed", "seed", 1)):
        value = getattr(args, name)
        if value is not None:
            engine[key] = value * scale
    if args.no_prefix_caching:
        engine["enable_prefix_caching"] = False
    if getattr(args, "allow_pickle_adapters", False):
        engine["allow_pickle_adapters"] = True
    token = None
    if args.auth_token_file:
        with open(args.auth_token_file, encoding="utf-8") as f:
            token = f.read().strip()
        if not token:
            raise ValueError(f"--auth-token-file {args.auth_token_file!r} is empty")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ValueError("TLS needs both --tls-cert and --tls-key")
    if args.tls_client_ca and not args.tls_cert:
        raise ValueError("--tls-client-ca (mTLS) needs --tls-cert and --tls-key")
    return ServerOptions(
        model=args.model, adapter_dir=adapter_dir, host=args.host, port=args.port,
        quantize=None if args.quantize in (None, "none") else args.quantize, dtype=args.dtype, device=args.device,
        engine_options=engine, grace_period=args.grace_period, max_message_bytes=args.max_message_bytes,
        keepalive_time_s=args.keepalive_time, keepalive_timeout_s=args.keepalive_timeout,
        keepalive_min_ping_interval_s=args.keepalive_min_ping_interval,
        keepalive_permit_without_calls=args.keepalive_permit_without_calls, tls_cert=args.tls_cert,
        tls_key=args.tls_key, tls_client_ca=args.tls_client_ca, auth_token=token, metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        train_demo_adapters=args.model == "demo" and args.adapter_dir is None and not args.no_demo_adapters)


def ready_line(server) -> str:
    o = server.options
    line = (f"ASPEN serve ready on {o.host}:{server.port} (model {o.model_name}, "
            f"adapters {o.adapter_dir or 'none'}, tls {'on' if o.tls_cert else 'off'}, "
            f"auth {'on' if o.auth_token else 'off'})")
    if server.metrics_port is not None:
        line += f"; metrics on http://{o.metrics_host}:{server.metrics_port}/metrics"
    return line


async def serve(options: ServerOptions, holder: list | None = None) -> int:
    """Run until a signal; 0 after a graceful drain, 1 when a second signal forced the exit. The server is
    appended to ``holder`` (when given) so the caller can inspect it afterwards."""
    from engine.server.app import AspenServer

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
    import sys

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
