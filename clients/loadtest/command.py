"""``aspen loadtest run``: drive a running server with a synthetic multi-adapter workload.

    aspen loadtest make-adapters --model PATH --out DIR --num 1000 --rank 16 --targets all
    aspen serve --model PATH --adapter-dir DIR --port 50051 &
    aspen loadtest run --server 127.0.0.1:50051 --num-adapters 1000 --popularity power --alpha 0.3 \\
        --rates 1,2,4 --num-requests 200 --input-len 8-512 --output-len 8-512 --out-dir loadtest-out
    aspen loadtest run --protocol http --server 127.0.0.1:8000 ...   # the same workload over the HTTP API

It prints a table (one line per offered rate), and writes ``report.json``, ``latency_cdf.png`` and, for several
rates, ``sweep.png`` (throughput and p99 TTFT over offered load) into ``--out-dir``; ``report.json`` is written
first, as soon as the runs end, and stays when a later step fails (:func:`clients.loadtest.report.write_outputs`).
Without matplotlib the plots are skipped with a message saying so. The exit status is 0 even when requests failed
(they are counted by status code); 1 when the server cannot be reached or a step after ``report.json`` failed. ``make-adapters``
writes adapters with the model library (:mod:`aspen.lora.peft.make_adapters_command`); the ``aspen`` console
script routes each subcommand to its module.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

from clients.cli import TOKEN_ENV
from clients.loadtest.driver import (
    DEFAULT_PREFIX,
    MODES,
    POPULARITIES,
    PROTOCOLS,
    DriverConfig,
    LengthSpec,
    WorkloadConfig,
    model_info,
    run_sweep,
)
from clients.loadtest.report import format_table, write_outputs


def _rate(text: str) -> float:
    return math.inf if text.strip().lower() in ("inf", "max") else float(text)


def add_arguments(r: argparse.ArgumentParser) -> None:
    c = r.add_argument_group("connection")
    c.add_argument("--protocol", choices=PROTOCOLS, default="grpc",
                   help="the gRPC API, or the OpenAI-compatible HTTP API (POST /v1/completions); default grpc")
    c.add_argument("--server", default=None, help="HOST:PORT (default 127.0.0.1:50051, with --protocol http "
                   "127.0.0.1:8000)")
    c.add_argument("--token-file", default=None, help="file holding the bearer token (or $ASPEN_AUTH_TOKEN)")
    c.add_argument("--tls-ca", default=None, help="PEM CA bundle: connect with TLS")
    c.add_argument("--timeout", type=float, default=300.0, help="per-request deadline in seconds (default 300)")
    a = r.add_argument_group("arrivals and bounds")
    a.add_argument("--mode", choices=MODES, default="open",
                   help="open loop (arrival process) or closed loop (--concurrency users); default open")
    a.add_argument("--rate", type=_rate, default=math.inf, help="requests/s for open loop ('inf': all at once)")
    a.add_argument("--rates", default=None, help="comma-separated offered rates to sweep, e.g. 1,2,4")
    a.add_argument("--cv", type=float, default=1.0,
                   help="coefficient of variation of inter-arrival gaps: 1 = Poisson, else gamma (default 1)")
    a.add_argument("--concurrency", type=int, default=8, help="closed-loop users (default 8)")
    a.add_argument("--num-requests", type=int, default=100, help="requests per run (default 100)")
    a.add_argument("--duration", type=float, default=None, help="send no request after this many seconds")
    w = r.add_argument_group("workload")
    w.add_argument("--num-adapters", type=int, default=0, help="adapters adapter-0000.. to spread requests over "
                   "(0 = base model only)")
    w.add_argument("--adapter-prefix", default=DEFAULT_PREFIX,
                   help=f"id prefix of --num-adapters (default {DEFAULT_PREFIX})")
    w.add_argument("--adapter-ids", default=None, help="comma-separated adapter ids (instead of --num-adapters)")
    w.add_argument("--popularity", choices=POPULARITIES, default="uniform")
    w.add_argument("--alpha", type=float, default=1.0,
                   help="power: X ~ power(alpha), 1 = uniform, small = skewed (S-LoRA); zipf: exponent")
    w.add_argument("--input-len", default="32", help="prompt tokens: N or LO-HI (uniform, inclusive)")
    w.add_argument("--output-len", default="32", help="max_new_tokens: N or LO-HI (uniform, inclusive)")
    w.add_argument("--prompt-file", default=None, help='JSONL of {"prompt": ...} or {"token_ids": [...]} '
                   '(optional "output_len") instead of random token ids')
    w.add_argument("--unary", action="store_true", help="use Generate instead of GenerateStream (no TTFT)")
    w.add_argument("--temperature", type=float, default=0.0)
    w.add_argument("--no-ignore-eos", action="store_true", help="let EOS end requests early")
    w.add_argument("--seed", type=int, default=0)
    o = r.add_argument_group("report")
    o.add_argument("--slo-ttft", type=float, default=None, help="TTFT target in seconds for SLO attainment")
    o.add_argument("--slo-tpot", type=float, default=None, help="TPOT target in seconds for SLO attainment")
    o.add_argument("--out-dir", default="loadtest-out", help="where report.json and the plots go")
    o.add_argument("--no-progress", action="store_true")


def _token(args) -> str | None:
    if args.token_file:
        with open(args.token_file, encoding="utf-8") as f:
            return f.read().strip() or None
    return os.environ.get(TOKEN_ENV) or None


DEFAULT_SERVERS = {"grpc": "127.0.0.1:50051", "http": "127.0.0.1:8000"}


def run(args: argparse.Namespace) -> int:
    import grpc  # here, not at the top: `aspen loadtest --help` stays fast
    import httpx

    rates = [_rate(x) for x in args.rates.split(",")] if args.rates else None
    workload = WorkloadConfig(
        num_requests=args.num_requests, rate=args.rate, cv=args.cv, num_adapters=args.num_adapters,
        adapter_prefix=args.adapter_prefix,
        adapter_ids=tuple(s.strip() for s in args.adapter_ids.split(",") if s.strip()) if args.adapter_ids else None,
        popularity=args.popularity, alpha=args.alpha, input_len=LengthSpec.parse(args.input_len),
        output_len=LengthSpec.parse(args.output_len), prompt_file=args.prompt_file, seed=args.seed)
    args.server = args.server or DEFAULT_SERVERS[args.protocol]
    driver = DriverConfig(address=args.server, protocol=args.protocol, mode=args.mode, concurrency=args.concurrency, stream=not args.unary,
                          duration_s=args.duration, timeout_s=args.timeout, temperature=args.temperature,
                          ignore_eos=not args.no_ignore_eos, progress=not args.no_progress, token=_token(args),
                          tls_ca=args.tls_ca)
    try:
        info = model_info(driver)
    except grpc.RpcError as e:
        print(f"aspen loadtest: cannot reach {args.server}: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    except httpx.HTTPError as e:
        print(f"aspen loadtest: cannot reach {args.server} over HTTP: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    runs = run_sweep(workload, driver, rates, info.vocab_size, info.max_context_tokens)
    config = {"server": args.server, "model": info.base_model, "device": info.device,
              "workload": {k: (str(v) if isinstance(v, LengthSpec) else v) for k, v in workload.__dict__.items()},
              "driver": {k: v for k, v in driver.__dict__.items() if k != "token"}, "rates": rates}
    out = write_outputs(runs, config, args.out_dir, args.slo_ttft, args.slo_tpot)
    try:
        if out.summaries:
            print(format_table(out.summaries))
        print("wrote " + ", ".join(out.files.values()))
    except Exception:
        print(f"aspen loadtest: the measurements are in {out.files['json']}", file=sys.stderr)
        raise
    for note in out.skipped:
        print(f"aspen loadtest: {note}", file=sys.stderr)
    for failure in out.failed:
        print(f"aspen loadtest: {failure}; the measurements are in {out.files['json']}", file=sys.stderr)
    return 1 if out.failed else 0
