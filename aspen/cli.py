"""The ``aspen`` console script: the one module that dispatches across layers.

Each subcommand lives next to what it drives and exposes ``add_arguments(parser)`` and ``run(args) -> int``;
:data:`COMMANDS` only names them, and they are imported lazily (importlib), so ``aspen --help`` stays fast and
the model library never imports the apps built on it. Where a command of a lower layer needs a higher one
(``aspen train --server`` loads each saved adapter into a server through the gRPC client), this module builds
that step and hands it to the command's ``run`` as a hook (:data:`HOOKS`).
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from aspen import __version__
from aspen.errors import AspenError


@dataclass(frozen=True)
class Command:
    """A subcommand: the module that implements it, or (``module`` None) a group of subcommands."""

    help: str
    module: str | None = None
    subcommands: dict[str, Command] = field(default_factory=dict)


COMMANDS: dict[str, Command] = {
    "demo": Command("build the embedded demo model (cached) and print generations", "engine.demo_command"),
    "train": Command("fine-tune several LoRA adapters at once on one base", "aspen.train.command"),
    "serve": Command("serve the base model and its LoRA adapters over gRPC and an OpenAI-compatible HTTP API", "engine.server.command"),
    "generate": Command("generate text from a running server (streams to the terminal)",
                        "clients.generate_command"),
    "chat": Command("chat with a running server in the terminal (streaming, with history)",
                    "clients.chat_command"),
    "adapters": Command("list, load or unload adapters on a running server", "clients.adapters_command"),
    "loadtest": Command("drive a running server with a synthetic multi-adapter workload, or make the adapters",
                        subcommands={
                            "run": Command("drive a running server", "clients.loadtest.command"),
                            "make-adapters": Command("write N random PEFT adapters for a base checkpoint",
                                                     "aspen.lora.peft.make_adapters_command"),
                        }),
    "bench": Command("run a benchmark (see BENCHMARKS.md)", "benchmarks.bench_command"),
}


def _train_hooks(args: argparse.Namespace) -> dict[str, Callable]:
    """``aspen train --server ADDRESS``: after each adapter is saved, load it into that server (LoadAdapter)."""
    if not args.server:
        return {}
    client = importlib.import_module("clients.client")

    def load_into_server(adapter_id: str, path: str) -> None:
        with client.AspenClient(args.server, timeout=LOAD_TIMEOUT_S) as server:
            server.load_adapter(adapter_id, path)

    return {"after_save": load_into_server}


LOAD_TIMEOUT_S = 120.0  # a LoadAdapter reads and validates the adapter on the server
#: Per command module: builds the keyword arguments (hooks into other layers) its ``run`` takes.
HOOKS: dict[str, Callable[[argparse.Namespace], dict[str, Callable]]] = {"aspen.train.command": _train_hooks}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s modules are imported (all of them when None)."""
    parser = argparse.ArgumentParser(prog="aspen", description="ASPEN serve: one base model, many LoRA adapters.")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    parser.add_argument("--version", action="version", version=f"aspen-serve {__version__}")
    _add_commands(parser, COMMANDS, "command", "COMMAND", lambda name: command is None or name == command)
    return parser


def _add_commands(parser: argparse.ArgumentParser, commands: dict[str, Command], dest: str, metavar: str,
                  wanted: Callable[[str], bool]) -> None:
    sub = parser.add_subparsers(dest=dest, metavar=metavar)
    for name, cmd in commands.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.help)
        if cmd.module is None:
            p.set_defaults(_module=None, _group=p)
            if wanted(name):
                _add_commands(p, cmd.subcommands, f"{name}_command", "SUBCOMMAND", lambda _: True)
            continue
        p.set_defaults(_module=cmd.module)
        if wanted(name):
            importlib.import_module(cmd.module).add_arguments(p)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if a in COMMANDS), "")  # import just the subcommand that runs
    parser = build_parser(command)
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    if args._module is None:  # a group named without one of its subcommands
        args._group.print_help(sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        hooks = HOOKS[args._module](args) if args._module in HOOKS else {}
        return int(importlib.import_module(args._module).run(args, **hooks) or 0)
    except AspenError as e:
        print(f"aspen {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
