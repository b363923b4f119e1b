"""The ``aspen`` console script. Each subcommand lives next to what it drives and exposes
``add_arguments(parser)`` and ``run(args) -> int``; this table only names them (imported lazily, so
``aspen --help`` stays fast)."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

# subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("engine.demo_command", "build the embedded demo model (cached) and print generations"),
    "train": ("aspen.train.command", "fine-tune several LoRA adapters at once on one base"),
    "serve": ("engine.server.command", "serve the base model and its LoRA adapters over gRPC"),
    "generate": ("clients.generate_command", "generate text from a running server (streams to the terminal)"),
    "adapters": ("clients.adapters_command", "list, load or unload adapters on a running server"),
    "loadtest": ("clients.loadtest.command", "drive a running server with a synthetic multi-adapter workload"),
    "bench": ("benchmarks.bench_command", "run a benchmark (see BENCHMARKS.md)"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported (all of them when None)."""
    parser = argparse.ArgumentParser(prog="aspen", description="ASPEN serve: one base model, many LoRA adapters.")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        if command is None or name == command:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if a in COMMANDS), "")  # import just the subcommand that runs
    parser = build_parser(command)
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from aspen.errors import AspenError

    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except AspenError as e:
        print(f"aspen {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
