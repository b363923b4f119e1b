"""Client subcommands of the ``aspen`` console script: ``aspen generate`` and ``aspen adapters`` (``aspen chat``
is :mod:`clients.chat_command`).

    aspen generate --server 127.0.0.1:50051 --adapter math --max-new-tokens 64 --temperature 0 "2 + 2 ="
    aspen generate --chat --system "Answer briefly." "What is the capital of France?"
    aspen adapters list --server 127.0.0.1:50051
    aspen adapters load math --path team-a/math-v2 --server 127.0.0.1:50051
    aspen adapters unload math --server 127.0.0.1:50051

The bearer token comes from ``--token-file`` or the ``ASPEN_AUTH_TOKEN`` environment variable. gRPC is imported
only when a command runs, so ``aspen --help`` stays fast.
"""
from __future__ import annotations

import argparse
import os
import sys

TOKEN_ENV = "ASPEN_AUTH_TOKEN"


def add_connection_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", default="127.0.0.1:50051", help="HOST:PORT of the server (default 127.0.0.1:50051)")
    p.add_argument("--token-file", default=None, help=f"file holding the bearer token (or set ${TOKEN_ENV})")
    p.add_argument("--tls-ca", default=None, help="PEM CA bundle: connect with TLS and verify the server")
    p.add_argument("--tls-cert", default=None, help="PEM client certificate (mTLS)")
    p.add_argument("--tls-key", default=None, help="PEM client key (mTLS)")
    p.add_argument("--timeout", type=float, default=None, help="deadline of the call in seconds")


def connect(args: argparse.Namespace):
    from clients.client import AspenClient

    token = os.environ.get(TOKEN_ENV) or None
    if args.token_file:
        with open(args.token_file, encoding="utf-8") as f:
            token = f.read().strip()
    tls = args.tls_ca or args.tls_cert
    return AspenClient(args.server, token=token, tls_ca=args.tls_ca if tls else None, timeout=args.timeout,
                       tls_cert=args.tls_cert, tls_key=args.tls_key)


def report_rpc_error(command: str, error) -> int:
    """Print a failed call's status and details; returns the exit status 1."""
    from grpc_status import rpc_status

    line = f"aspen {command}: error: {error.code().name}: {error.details()}"
    status = rpc_status.from_call(error) if hasattr(error, "trailing_metadata") else None
    if status is not None:
        from google.rpc import error_details_pb2 as ed

        for detail in status.details:
            if detail.Is(ed.BadRequest.DESCRIPTOR):
                bad = ed.BadRequest()
                detail.Unpack(bad)
                line += "".join(f"\n  field {v.field}: {v.description}" for v in bad.field_violations)
            elif detail.Is(ed.RetryInfo.DESCRIPTOR):
                info = ed.RetryInfo()
                detail.Unpack(info)
                line += f"\n  retry after {info.retry_delay.ToTimedelta().total_seconds():g}s"
    print(line, file=sys.stderr)
    return 1


# ---------------------------------------------------------------------------------------------- generate
def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="the prompt text (with --chat: the user's message)")
    p.add_argument("--chat", action="store_true",
                   help="send the prompt as a user message, rendered with the model's (or adapter's) chat template")
    p.add_argument("--system", default=None, help="with --chat: a system message before the user's")
    p.add_argument("--adapter", default=None, help="adapter id (default: the base model)")
    add_connection_arguments(p)
    add_sampling_arguments(p)
    p.add_argument("--no-stream", action="store_true", help="one unary call instead of streaming")
    p.add_argument("--verbose", "-v", action="store_true", help="print finish reason and usage to stderr")
    f = p.add_argument_group("response format (at most one; the output is guaranteed to match it)")
    fmt = f.add_mutually_exclusive_group()
    fmt.add_argument("--json-object", action="store_true", help="any JSON object")
    fmt.add_argument("--json-schema", metavar="SCHEMA", help="a JSON Schema: its JSON text, or @FILE")
    fmt.add_argument("--regex", help="a regular expression the whole output matches")
    fmt.add_argument("--grammar", metavar="LARK", help="a Lark grammar: its text, or @FILE")
    fmt.add_argument("--choice", action="append", metavar="TEXT", help="one allowed output (repeatable)")


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--min-new-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--presence-penalty", type=float, default=None)
    p.add_argument("--frequency-penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")


_PARAM_ARGS = ("max_new_tokens", "min_new_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty",
               "presence_penalty", "frequency_penalty", "seed", "stop")


def sampling_params(args: argparse.Namespace) -> dict:
    """The sampling keyword arguments of :func:`add_sampling_arguments`' flags that were given."""
    params = {k: getattr(args, k) for k in _PARAM_ARGS if getattr(args, k) is not None}
    if args.ignore_eos:
        params["ignore_eos"] = True
    return params


def conversation(system: str | None, turns: list[dict]) -> list[dict]:
    """The messages of a chat: the system message (if any), then ``turns``."""
    return ([{"role": "system", "content": system}] if system else []) + turns


def run_generate(args: argparse.Namespace) -> int:
    import grpc

    from clients.aspen.v1 import aspen_pb2 as pb

    params = sampling_params(args)
    if args.system is not None and not args.chat:
        print("aspen generate: error: --system needs --chat", file=sys.stderr)
        return 2
    prompt = conversation(args.system, [{"role": "user", "content": args.prompt}]) if args.chat else args.prompt
    try:
        response_format = _response_format(args)
    except OSError as e:
        print(f"aspen generate: error: {e}", file=sys.stderr)
        return 1
    if response_format is not None:
        params["response_format"] = response_format
    try:
        with connect(args) as client:
            if args.no_stream:
                last = client.generate(prompt, args.adapter, **params)
                sys.stdout.write(last.text)
            else:
                last = None
                for msg in client.stream(prompt, args.adapter, **params):
                    sys.stdout.write(msg.text)
                    sys.stdout.flush()
                    last = msg
            sys.stdout.write("\n")
            sys.stdout.flush()
    except grpc.RpcError as e:
        return report_rpc_error("generate", e)
    if last is not None and args.verbose:
        print(f"[finish_reason={pb.FinishReason.Name(last.finish_reason)} prompt_tokens={last.usage.prompt_tokens} "
              f"completion_tokens={last.usage.completion_tokens}]", file=sys.stderr)
    if last is not None and last.finish_reason == pb.FINISH_REASON_ERROR:
        print(f"aspen generate: error: {getattr(last, 'error', '') or 'generation failed'}", file=sys.stderr)
        return 1
    return 0


def _text_or_file(value: str) -> str:
    """``@FILE`` reads FILE; anything else is the text itself."""
    if value.startswith("@"):
        with open(value[1:], encoding="utf-8") as f:
            return f.read()
    return value


def _response_format(args: argparse.Namespace) -> dict | None:
    """The ``response_format`` the flags ask for (see :func:`clients.client.format_message`), or None."""
    if args.json_object:
        return {"json_object": True}
    if args.json_schema is not None:
        return {"json_schema": _text_or_file(args.json_schema)}
    if args.regex is not None:
        return {"regex": args.regex}
    if args.grammar is not None:
        return {"grammar": _text_or_file(args.grammar)}
    if args.choice:
        return {"choice": args.choice}
    return None


# ---------------------------------------------------------------------------------------------- adapters
def add_adapters_arguments(p: argparse.ArgumentParser) -> None:
    common = argparse.ArgumentParser(add_help=False)
    add_connection_arguments(common)
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    sub.add_parser("list", parents=[common], help="adapters loaded or found under the server's adapter root")
    load = sub.add_parser("load", parents=[common], help="load an adapter now (instead of on first use)")
    load.add_argument("adapter_id")
    load.add_argument("--path", default=None, help="directory inside the server's adapter root (default: the id)")
    unload = sub.add_parser("unload", parents=[common], help="forget an adapter")
    unload.add_argument("adapter_id")


def _row(info, pb) -> list[str]:
    tier = pb.AdapterTier.Name(info.tier).removeprefix("ADAPTER_TIER_").lower()
    return [info.adapter_id, tier, str(info.rank or "?"), ",".join(info.target_modules) or "?",
            str(info.active_requests), "yes" if info.registered else "no"]


def run_adapters(args: argparse.Namespace) -> int:
    import grpc

    from clients.aspen.v1 import aspen_pb2 as pb

    try:
        with connect(args) as client:
            if args.action == "load":
                info = client.load_adapter(args.adapter_id, args.path)
                print(f"loaded {info.adapter_id} (rank {info.rank}, tier "
                      f"{pb.AdapterTier.Name(info.tier).removeprefix('ADAPTER_TIER_').lower()})")
            elif args.action == "unload":
                client.unload_adapter(args.adapter_id)
                print(f"unloaded {args.adapter_id}")
            else:
                rows = [["ADAPTER", "TIER", "RANK", "TARGETS", "ACTIVE", "LOADED"]]
                rows += [_row(i, pb) for i in client.list_adapters()]
                widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
                for r in rows:
                    print("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
    except grpc.RpcError as e:
        return report_rpc_error("adapters", e)
    return 0
