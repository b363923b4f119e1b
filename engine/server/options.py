"""What a server is configured with: the model source, the engine's :class:`~engine.config.EngineConfig` and the
network. Every field carries its :class:`~engine.config.Setting`, so its check and its ``aspen serve`` flag
(:mod:`engine.server.flags`) come from the field itself."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from aspen.language_model import DTYPES
from aspen.model.quantize import QUANT_MODES
from engine.config import EngineConfig, MiB, Setting, check_settings, setting

MODEL = "model source"
ENGINE = "engine"
NETWORK = "network"


@dataclass(frozen=True)
class ServerOptions:
    """Everything ``aspen serve`` configures; checked on construction."""

    model: str = setting("demo", help="base checkpoint directory, a .gguf file, or 'demo' (the embedded demo model)",
                         group=MODEL)
    adapter_dir: str | None = setting(None, help="adapter root: adapter ids are paths below it (default for "
                                                 "--model demo: $ASPEN_HOME/demo/adapters; otherwise no adapters)",
                                      group=MODEL)
    quantize: str = setting("none", help="quantize the frozen base weights", choices=QUANT_MODES, group=MODEL)
    dtype: str = setting("float32", help="dtype of the base weights", choices=tuple(DTYPES), group=MODEL)
    device: str = setting("cpu", help="device to run on, e.g. cpu, cuda, cuda:1", group=MODEL)
    # set by `aspen serve` when it chose the demo adapter root itself (see engine.server.command)
    train_demo_adapters: bool = setting(False, help="with --model demo: train the demo adapters into adapter_dir "
                                                    "when they are missing", cli=False)
    engine: EngineConfig = field(default_factory=EngineConfig,
                                 metadata={"setting": Setting(help="the engine's configuration", group=ENGINE)})
    host: str = setting("127.0.0.1", help="address to listen on", group=NETWORK)
    port: int = setting(50051, help="port to listen on; 0 picks a free port", minimum=0, group=NETWORK)
    http_port: int = setting(8000, help="port of the OpenAI-compatible HTTP API (/v1/completions, "
                                        "/v1/chat/completions, ...), served from the same engine and process, with "
                                        "the same TLS and token; 0 turns it off", minimum=0, group=NETWORK)
    grace_period: float = setting(30.0, help="seconds in-flight requests may take to finish after SIGTERM",
                                  minimum=0, group=NETWORK)
    max_message_bytes: int = setting(16 * MiB, help="largest request or response message in bytes", minimum=1,
                                     group=NETWORK)
    keepalive_time_s: float = setting(60.0, help="seconds between keepalive pings", flag="--keepalive-time",
                                      minimum=0, group=NETWORK)
    keepalive_timeout_s: float = setting(20.0, help="seconds to wait for a ping ack", flag="--keepalive-timeout",
                                         minimum=0, group=NETWORK)
    keepalive_min_ping_interval_s: float = setting(10.0, help="the shortest client ping interval accepted, in "
                                                              "seconds", flag="--keepalive-min-ping-interval",
                                                   minimum=0, group=NETWORK)
    keepalive_permit_without_calls: bool = setting(False, help="keepalive pings while no call is open",
                                                   group=NETWORK)
    tls_cert: str | None = setting(None, help="PEM certificate chain (enables TLS with --tls-key)", group=NETWORK)
    tls_key: str | None = setting(None, help="PEM private key", group=NETWORK)
    tls_client_ca: str | None = setting(None, help="PEM CA bundle: require client certificates (mTLS)",
                                        group=NETWORK)
    # a secret: never in a repr or a log line; `aspen serve` reads it from --auth-token-file
    auth_token: str | None = setting(None, help="bearer token every call must present (health and reflection "
                                                "stay open)", cli=False, repr=False)
    metrics_port: int | None = setting(None, help="serve Prometheus /metrics on this port (0 picks a free port)",
                                       minimum=0, group=NETWORK)
    metrics_host: str = setting("127.0.0.1", help="address of the /metrics endpoint", group=NETWORK)

    def __post_init__(self) -> None:
        check_settings(self)
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("TLS needs both a certificate and a key (--tls-cert and --tls-key)")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("client certificates (--tls-client-ca, mTLS) need TLS: give --tls-cert and --tls-key")
        if self.http_port and self.http_port == self.port:
            raise ValueError(f"--http-port {self.http_port} is also --port: give the HTTP API a port of its own "
                             "(or 0 to turn it off)")
        if self.auth_token is not None and not self.auth_token:
            raise ValueError("the bearer token is empty")

    @property
    def model_name(self) -> str:
        return "demo" if self.model == "demo" else os.path.basename(os.path.normpath(self.model))
