"""``aspen train``: fine-tune several LoRA adapters at once on one base model.

    aspen train --config train.yaml [--base-model PATH] [--quantize none|int8|nf4|fp4] [--server HOST:PORT]
                [--resume] [--out DIR]

The config is our YAML/JSON schema or an original ASPEN JSON config (see :mod:`aspen.train.config`). Each
adapter is saved in PEFT format to ``<out>/<name>`` with a ``training_log.json``; with ``--server`` it is then
loaded into the running server (``LoadAdapter``) so it is served without a restart. The library does not talk
to servers itself: :func:`run` takes that step as an ``after_save`` hook, which the ``aspen`` console script
(:mod:`aspen.cli`) builds from the gRPC client.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from collections.abc import Callable

import aspen
from aspen.language_model import DTYPES
from aspen.model.quantize import QUANT_MODES
from aspen.train.config import TrainConfigError, load_config
from aspen.train.trainer import Trainer

log = logging.getLogger(__name__)
#: ``after_save(adapter_name, path)``: called after each adapter is saved; an exception is logged and makes the
#: exit status 1, training goes on.
AfterSave = Callable[[str, str], None]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="training config (YAML or JSON; ours or the ASPEN format)")
    p.add_argument("--base-model", default=None, help="base checkpoint directory or .gguf file (overrides the config's)")
    p.add_argument("--quantize", default=None, choices=QUANT_MODES,
                   help="quantize the frozen base (overrides the config's)")
    p.add_argument("--server", default=None, metavar="HOST:PORT",
                   help="after each adapter is saved, load it into this running server")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in the output directory")
    p.add_argument("--out", default=None, help="output directory (overrides the config's output_dir)")
    p.add_argument("--dtype", default="float32", choices=tuple(DTYPES), help="base model dtype (default float32)")
    p.add_argument("--device", default="cpu", help="device (default cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace, after_save: AfterSave | None = None) -> int:
    """Train; ``after_save`` is required with ``--server`` (it is what loads each adapter into the server)."""
    if args.server and after_save is None:
        raise TrainConfigError(f"--server {args.server}: no hook loads adapters into a server here; run "
                               "through the aspen console script, which wires it to the gRPC client")
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
        if after_save is None:
            return
        try:
            after_save(name, path)
            print(f"loaded {name!r} into the server at {args.server}")
        except Exception as e:  # noqa: BLE001 -- training output is saved; report and go on
            log.error("could not load adapter %r into the server at %s: %s", name, args.server, e)
            failures.append(name)

    lm = aspen.load_model(config.base_model, dtype=args.dtype, quantize=config.quantize, device=args.device,
                          progress=not args.no_progress)
    Trainer(lm, config, progress=not args.no_progress, resume=args.resume, on_saved=on_saved).train()
    return 1 if failures else 0
