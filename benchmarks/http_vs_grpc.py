"""HTTP (the OpenAI-compatible API) vs gRPC on one server: throughput and p99 TTFT of the same closed-loop
multi-adapter workload, in one run.

    python -m benchmarks.http_vs_grpc [--tiny] [--device cpu|cuda] [--requests 160] [--concurrency 8] [--out FILE]

Target: HTTP output-token throughput >= 0.9x gRPC's.

One ``aspen serve`` subprocess (the 125M bench model, ``--num-adapters`` (8) synthetic rank-16 adapters on all
seven projections, ``--max-num-seqs`` 32) serves both protocols from its one engine. The load tester
(:mod:`clients.loadtest`) sends the same requests over each: ``--requests`` per protocol (32 prompt tokens, 32 new
tokens, greedy, EOS ignored, streamed), spread uniformly over the adapters, by ``--concurrency`` closed-loop users.
Two requests per protocol warm the server up first (not measured). The runs are interleaved: each protocol's
workload is cut into ``--slices`` (8) slices of consecutive requests, and slice i of both runs before slice i + 1
of either, the order alternating, so that the machine's other load falls on both alike. Throughput is output
tokens over the summed wall time of a protocol's slices; TTFT is measured by the client (stream start to first
token: the first gRPC message with tokens, the first SSE chunk). The client runs on the same machine as the
server and shares its cores.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import platform
import socket
import sys

from benchmarks.common import ReportFile, bench_model, device_name

CPU_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16",
             "amx_tile", "amx_bf16", "asimd", "sve")


def cpu() -> dict:
    """The CPU model, its SIMD flags (of :data:`CPU_FLAGS`) and its logical cores, from /proc/cpuinfo."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    model = value.strip()
                elif key.strip() in ("flags", "Features"):
                    flags |= set(value.split())
    except OSError:
        pass
    return {"model": model, "flags": [f for f in CPU_FLAGS if f in flags], "logical_cpus": os.cpu_count(),
            "loadavg_1m": round(os.getloadavg()[0], 2)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> dict:
    from aspen.lora.peft.synthetic import adapter_name
    from aspen.model.config import ModelConfig
    from benchmarks.adapter_churn import Server, merge, rebase, slice_bounds
    from benchmarks.engine_lora import bench_adapters
    from clients.loadtest.driver import (
        DriverConfig,
        LengthSpec,
        RunResult,
        WorkloadConfig,
        build_workload,
        drive,
    )
    from clients.loadtest.report import summarize

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--num-adapters", type=int, default=None, help="adapters the requests spread over (default 8)")
    ap.add_argument("--requests", type=int, default=None, help="requests per protocol (default 160; tiny 16)")
    ap.add_argument("--concurrency", type=int, default=8, help="closed-loop users (default 8)")
    ap.add_argument("--input-len", type=int, default=None, help="prompt tokens (default 32; tiny 8)")
    ap.add_argument("--output-len", type=int, default=None, help="new tokens (default 32; tiny 4)")
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--slices", type=int, default=None, help="interleave the runs in this many slices (default 8; "
                    "tiny 2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    tiny = args.tiny
    shape = "tiny" if tiny else "125m"
    num = args.num_adapters or (4 if tiny else 8)
    n_req = args.requests or (16 if tiny else 160)
    in_len, out_len = args.input_len or (8 if tiny else 32), args.output_len or (4 if tiny else 32)
    slices = args.slices or (2 if tiny else 8)
    model = bench_model(shape)
    cfg = ModelConfig.from_dir(model)
    root = bench_adapters(shape, num, progress=not tiny)
    http_port = free_port()
    server = Server(model, root, args.device, 256, args.max_num_seqs, ("--http-port", str(http_port)))
    report = ReportFile("http_vs_grpc", args.out)
    try:
        addresses = {"grpc": server.address, "http": f"127.0.0.1:{http_port}"}
        wl = WorkloadConfig(num_requests=n_req, num_adapters=num, seed=args.seed,
                            adapter_ids=tuple(adapter_name(i) for i in range(num)),
                            input_len=LengthSpec(in_len, in_len), output_len=LengthSpec(out_len, out_len))
        specs = build_workload(wl, cfg.vocab_size, cfg.max_position_embeddings)
        drivers = {p: DriverConfig(address=a, protocol=p, mode="closed", concurrency=args.concurrency,
                                   progress=False, timeout_s=600) for p, a in addresses.items()}
        for p, d in drivers.items():  # warm-up, not measured
            asyncio.run(drive(specs[:2], DriverConfig(**{**d.__dict__, "concurrency": 2}), f"warm-up {p}"))
        runs = {p: RunResult(p, None) for p in drivers}
        order = list(drivers)
        for i, (lo, hi) in enumerate(slice_bounds(n_req, slices)):
            for p in order[i % 2:] + order[:i % 2]:
                merge(runs[p], asyncio.run(drive(rebase(specs[lo:hi]), drivers[p], f"{p} {i + 1}/{slices}")))
    finally:
        server.stop()
    summaries = {p: summarize(run) for p, run in runs.items()}
    report.measured({
        "shape": shape, "device": device_name(args.device), "cpu": cpu(), "python": sys.version.split()[0],
        "adapters": num, "rank": 16, "requests_per_protocol": n_req, "concurrency": args.concurrency,
        "input_len": in_len, "output_len": out_len, "max_num_seqs": args.max_num_seqs, "slices": slices,
        "runs": {p: {"output_token_throughput": round(s["output_token_throughput"], 2),
                     "request_throughput": round(s["request_throughput"], 3), "wall_s": round(s["wall_s"], 2),
                     "ttft_p50_ms": _ms(s["ttft"]["p50"]), "ttft_p99_ms": _ms(s["ttft"]["p99"]),
                     "tpot_p50_ms": _ms(s["tpot"]["p50"]), "ok": s["ok"], "errors": s["errors"]}
                 for p, s in summaries.items()},
    })
    with report.guarded():
        g, h = summaries["grpc"], summaries["http"]
        ratio = h["output_token_throughput"] / g["output_token_throughput"] if g["output_token_throughput"] else None
        ttft = h["ttft"]["p99"] / g["ttft"]["p99"] if g["ttft"]["p99"] and h["ttft"]["p99"] else None
        figures = {"http_over_grpc_throughput": None if ratio is None else round(ratio, 3),
                   "http_over_grpc_p99_ttft": None if ttft is None else round(ttft, 3),
                   "target": ">= 0.9", "meets_target": ratio is not None and ratio >= 0.9}
    return report.complete(figures)


def _ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1e3, 1)


if __name__ == "__main__":
    main()
