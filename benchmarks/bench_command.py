"""``aspen bench NAME [--tiny] [--device DEV] [--out FILE] [benchmark options...]``: run one benchmark.

Each benchmark is a module of this package with ``main(argv) -> report``; options after NAME that this command
does not know are passed through (``aspen bench vs_peft --batch-size 16``). ``--tiny`` runs the tiny model with
a few requests (a smoke test: its figures mean nothing). A benchmark against a peer library needs the ``[bench]``
extra; without it the command stops before any work with one line naming the extra (:mod:`benchmarks.extras`).
See BENCHMARKS.md for the figures and exact commands.
"""
from __future__ import annotations

import argparse
import importlib

from benchmarks.extras import require

BENCHMARKS = {
    "lora_overhead": "one decode step, 32 rows x 32 adapters vs base (multi-LoRA op)",
    "engine_lora": "LLMEngine with 32 distinct adapters vs no adapters (tokens/s)",
    "vs_peft": "LLMEngine vs PEFT mixed batch and PEFT one adapter at a time (needs the [bench] extra)",
    "vs_transformers": "base-only LLMEngine vs transformers generate",
    "adapter_churn": "1,000 adapters through the gRPC server: p99 TTFT, load time, hit rate",
    "quantized": "int8 / nf4 memory per parameter and throughput vs fp32",
    "compute_efficiency": "decode-step GFLOP/s vs the machine's fp32 GEMM peak",
    "structured": "decode tokens/s with half the rows JSON-Schema constrained vs none; grammar compile p50/p99",
    "http_vs_grpc": "the OpenAI-compatible HTTP API vs gRPC on one server: throughput and p99 TTFT, one workload",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", choices=sorted(BENCHMARKS), metavar="NAME",
                   help="; ".join(f"{k}: {v}" for k, v in BENCHMARKS.items()))
    p.add_argument("--tiny", action="store_true", help="tiny model, few requests (smoke test)")
    p.add_argument("--device", default=None, help="cpu (default) or cuda")
    p.add_argument("--out", default=None, help="write the JSON report here")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="options passed to the benchmark")


def build_argv(args: argparse.Namespace) -> list[str]:
    """The benchmark's own argv for parsed ``aspen bench`` arguments."""
    # argparse's REMAINDER also swallows --tiny / --device / --out written after NAME: pick them out again
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--tiny", action="store_true")
    pre.add_argument("--device", default=None)
    pre.add_argument("--out", default=None)
    known, argv = pre.parse_known_args(list(args.extra or []))
    tiny, device, out = args.tiny or known.tiny, args.device or known.device, args.out or known.out
    if args.name == "lora_overhead":  # lora_overhead spells --tiny as --shape tiny
        if tiny:
            argv += ["--shape", "tiny"]
    elif tiny:
        argv.append("--tiny")
    if device:
        argv += ["--device", device]
    if out:
        argv += ["--out", out]
    return argv


def run(args: argparse.Namespace) -> int:
    require(args.name)  # before the benchmark's module (torch, transformers) is even imported
    module = importlib.import_module(f"benchmarks.{args.name}")
    module.main(build_argv(args))
    return 0
