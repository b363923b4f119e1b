"""``aspen train``: fine-tune several LoRA adapters at once on one base model.

    aspen train --config train.yaml [--base-model PATH] [--quantize none|int8|nf4|fp4] [--server HOST:PORT]
                [--resume] [--out DIR]

The config is our YAML/JSON schema or an original ASPEN JSON config (see :mod:`aspen.train.config`). Each
adapter is saved in PEFT format to ``<out>/<name>`` with a ``training_log.json``; with ``--server`` it is then
loaded into the running server (``LoadAdapter``) so it is served without a restart.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="training config (YAML or JSON; ours or the ASPEN format)")
    p.add_argument("--base-model", default=None, help="base checkpoint directory (overrides the config's)")
    p.add_argument("--quantize", default=None, metavar="none|int8|nf4|fp4",
                   help="quantize the frozen base (overrides the config's)")
    p.add_argument("--server", default=None, metavar="HOST:PORT",
                   help="after each adapter is saved, load it into this running server")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in the output directory")
    p.add_argument("--out", default=None, help="output directory (overrides the config's output_dir)")
    p.add_argument("--dtype", default="float32", help="base model dtype (default float32)")
    p.add_argument("--device", default="cpu", help="device (default cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def notify_server(address: str, adapter_id: str, path: str) -> None:
    """Ask the server at ``address`` to load the adapter directory ``path`` as ``adapter_id`` (LoadAdapter)."""
    from clients.client import AspenClient  # lazily: only --server needs gRPC

    with AspenClient(address, timeout=120) as client:
        client.load_adapter(adapter_id, path)


def run(args: argparse.Namespace) -> int:
    import aspen
    from aspen.train.config import TrainConfigError, load_config
    from aspen.train.trainer import Trainer

    config, _unsupported = load_config(args.config)  # fields not honoured are logged by load_config
    overrides = {k: v for k, v in (("base_model", args.base_model), ("quantize", args.quantize),
                                   ("output_dir", args.out and os.path.abspath(args.out))) if v}
    config = dataclasses.replace(config, **overrides)
    if not config.base_model:
        raise TrainConfigError("no base model: give --base-model (ASPEN configs name none) or base_model in the "
                               "config")
    failures: list[str] = []

    def on_saved(name: str, path: str) -> None:
        print(f"saved adapter {name!r} to {path}")
        if args.server:
            try:
                notify_server(args.server, name, path)
                print(f"loaded {name!r} into the server at {args.server}")
            except Exception as e:  # noqa: BLE001 -- training output is saved; report and go on
                log.error("could not load adapter %r into the server at %s: %s", name, args.server, e)
                failures.append(name)

    lm = aspen.load_model(config.base_model, dtype=args.dtype, quantize=config.quantize, device=args.device,
                          progress=not args.no_progress)
    Trainer(lm, config, progress=not args.no_progress, resume=args.resume, on_saved=on_saved).train()
    return 1 if failures else 0
