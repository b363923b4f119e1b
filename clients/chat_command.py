"""``aspen chat``: an interactive chat with a running server, streaming each answer, keeping the history.

    aspen chat --server 127.0.0.1:50051 [--adapter ID] [--system TEXT] [sampling flags]

Each line typed is a user message; the whole conversation so far is sent with it (``GenerateRequest.messages``,
rendered by the server with the model's or the adapter's chat template) and the answer streams to the terminal.
``/reset`` forgets the history, ``/exit`` (or end of input) quits. Ctrl-C during an answer cancels it (the call
and the request on the server) and keeps the conversation up to the question.
"""
from __future__ import annotations

import argparse
import sys

from clients.cli import (
    add_connection_arguments,
    add_sampling_arguments,
    connect,
    conversation,
    report_rpc_error,
    sampling_params,
)

COMMANDS_HELP = "/reset forgets the conversation, /exit quits"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", default=None, help="adapter id (default: the base model)")
    p.add_argument("--system", default=None, help="a system message that opens the conversation")
    add_connection_arguments(p)
    add_sampling_arguments(p)


def _read(prompt: str, interactive: bool) -> str | None:
    try:
        return input(prompt if interactive else "")
    except EOFError:
        return None


def run(args: argparse.Namespace) -> int:
    import grpc

    from clients.aspen.v1 import aspen_pb2 as pb

    params = sampling_params(args)
    interactive = sys.stdin.isatty()
    turns: list[dict] = []
    try:
        with connect(args) as client:
            info = client.model_info()
            if not info.chat_template:
                print(f"aspen chat: error: the served model {info.base_model!r} has no chat template; use "
                      "`aspen generate` with a text prompt", file=sys.stderr)
                return 1
            if interactive:
                who = f"adapter {args.adapter}" if args.adapter else "the base model"
                print(f"chatting with {info.base_model} ({who}) at {args.server}; {COMMANDS_HELP}",
                      file=sys.stderr)
            while (line := _read("you> ", interactive)) is not None:
                text = line.strip()
                if text in ("/exit", "/quit"):
                    break
                if text == "/reset":
                    turns.clear()
                    continue
                if not text:
                    continue
                asked = turns + [{"role": "user", "content": text}]
                answer, last = [], None
                try:
                    for msg in client.stream(conversation(args.system, asked), args.adapter, **params):
                        sys.stdout.write(msg.text)
                        sys.stdout.flush()
                        answer.append(msg.text)
                        last = msg
                except KeyboardInterrupt:
                    sys.stdout.write("\n[cancelled]\n")
                    continue
                sys.stdout.write("\n")
                sys.stdout.flush()
                if last is not None and last.finish_reason == pb.FINISH_REASON_ERROR:
                    print(f"aspen chat: error: {last.error or 'generation failed'}", file=sys.stderr)
                    continue
                turns = asked + [{"role": "assistant", "content": "".join(answer)}]
    except grpc.RpcError as e:
        return report_rpc_error("chat", e)
    except KeyboardInterrupt:
        sys.stdout.write("\n")
    return 0
