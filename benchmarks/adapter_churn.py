"""Adapter churn through the gRPC server: 1,000 adapters on disk, a device cache of 64, power-law popularity.

    python -m benchmarks.adapter_churn [--tiny] [--device cpu|cuda] [--rate 2] [--requests 200] [--out report.json]

Targets: p99 TTFT with many adapters <= 2x the same load on a single adapter; disk -> device load of one rank-16
all-module adapter of the 125M model <= 10 ms; plus the device-cache hit rate.

1. ``--num-adapters`` (1000) synthetic rank-16 adapters on all seven projections (11.2 MB each for the 125M
   model) are made once under ``$ASPEN_HOME/bench`` (:mod:`aspen.lora.peft.synthetic`).
2. Adapter load time, in process: ``LLMEngine.load_adapter`` (read + validate the safetensors file, copy into
   the LoRA pool) timed for ``--load-samples`` adapters never read before by that engine, once with the files
   in the OS page cache ("warm") and once after ``posix_fadvise(DONTNEED)`` dropped them from it ("cold").
3. Three load tests, each against its own ``aspen serve`` subprocess (port 0, ``--lora-pool-mb`` sized for
   ``--cache-adapters`` (64) such adapters: 64 x 112 pages of 132 KiB = 924 MiB; host tier at its 2 GiB
   default; ``--max-num-seqs`` 32): the same open-loop Poisson arrivals at ``--rate`` req/s, prompts and
   lengths (fixed seed; 32 prompt tokens, 16 new tokens, greedy, EOS ignored, streamed), with every request on
   adapter-0000 ("single"), then spread over all adapters with S-LoRA's power law, alpha 1.0 (uniform) and 0.3
   (skewed). Two base-model requests warm each server up first (not measured). The three servers are all up
   before any is measured, and the runs are interleaved: each workload is cut into ``--slices`` (10) slices of
   consecutive requests (arrivals rebased to the slice's start) and slice i of every configuration runs before
   slice i + 1 of any, the order rotating each round, so that noise from the shared machine falls on all three
   alike (run one after another, the p99 ratio of identical code swings with the machine's other load). Idle servers use no CPU
   while another is measured; each keeps its own adapter cache across its slices. Cache counters come from the
   server's ``/metrics`` (``aspen:adapter_cache_hits_total`` / ``..._misses_total`` / ``..._load_seconds_total``
   / ``..._device_loads_total``, ``..._request_hits_total`` / ``..._request_misses_total``). The hit rate
   reported is per request: the requests whose adapter was on the device when they arrived (the acquire
   hits/misses count scheduler acquires, which come after ``add_request`` already prefetched the adapter, so
   their ratio is ~1 whatever the churn; it is reported as ``acquire_hit_rate``).

The default rate is what this 2-core CPU sustains with the 125M model (see BENCHMARKS.md); on a GPU raise it.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import itertools
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

from benchmarks.common import ReportFile, bench_model, device_name


def metric_sum(text: str, name: str) -> float:
    """Sum of every sample of ``aspen:<name>`` (all label sets) in a Prometheus text exposition."""
    pat = re.compile(rf"^aspen:{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", re.MULTILINE)
    return sum(float(v) for v in pat.findall(text))


def slice_bounds(n: int, slices: int) -> list[tuple[int, int]]:
    """``slices`` consecutive index ranges covering ``range(n)`` (sizes differ by at most one)."""
    slices = max(1, min(slices, n))
    cuts = [round(i * n / slices) for i in range(slices + 1)]
    return list(itertools.pairwise(cuts))


def rebase(specs: list) -> list:
    """The same requests with arrival times shifted so that the first one arrives at 0."""
    t0 = specs[0].arrival if specs else 0.0
    return [dataclasses.replace(s, arrival=s.arrival - t0) for s in specs]


def merge(into, part) -> None:
    """Append a slice's RunResult to the configuration's RunResult (wall time adds up)."""
    into.results.extend(part.results)
    into.not_sent += part.not_sent
    into.wall_s += part.wall_s


def cache_metrics(metrics_port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    hits, misses = metric_sum(text, "adapter_cache_hits_total"), metric_sum(text, "adapter_cache_misses_total")
    device_loads = metric_sum(text, "adapter_cache_device_loads_total")
    seconds = metric_sum(text, "adapter_load_seconds_total")
    acquires = hits + misses
    req_hits = metric_sum(text, "adapter_cache_request_hits_total")
    requests = req_hits + metric_sum(text, "adapter_cache_request_misses_total")
    return {"request_hits": int(req_hits), "request_misses": int(requests - req_hits),
            "request_hit_rate": round(req_hits / requests, 4) if requests else None,
            "hits": int(hits), "misses": int(misses), "acquire_hit_rate": round(hits / acquires, 4) if acquires else None,
            "disk_loads": int(metric_sum(text, "adapter_cache_loads_total")),
            "device_loads": int(device_loads),
            "device_evictions": int(metric_sum(text, "adapter_cache_evictions_total")),
            "load_seconds_total": round(seconds, 4),
            "load_ms_per_device_load": round(1e3 * seconds / device_loads, 3) if device_loads else None}


#: The servers' host adapter tier, fixed so the figures do not depend on the machine's free memory.
HOST_TIER_MB = 2048


class Server:
    """An ``aspen serve`` subprocess on a free loopback port; stopped with SIGTERM."""

    def __init__(self, model: str, adapter_dir: str, device: str, pool_mb: int, max_num_seqs: int,
                 extra: tuple[str, ...] = ()) -> None:
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115 -- the server's log for its lifetime; see stop()
            "w+", prefix="aspen-serve-", suffix=".log", delete=False)
        cmd = [sys.executable, "-m", "aspen.cli", "serve", "--model", model, "--adapter-dir", adapter_dir,
               "--port", "0", "--http-port", "0", "--metrics-port", "0", "--device", device, "--lora-pool-mb", str(pool_mb),
               "--max-num-seqs", str(max_num_seqs), "--host-adapter-mb", str(HOST_TIER_MB), "--grace-period", "5",
               *extra]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline, match = time.monotonic() + 180, None
        while match is None and time.monotonic() < deadline and self.proc.poll() is None:
            time.sleep(0.2)
            with open(self.log.name, encoding="utf-8", errors="replace") as f:
                match = re.search(r"ready on ([\d.]+):(\d+) .*metrics on http://[\d.]+:(\d+)/metrics", f.read())
        if match is None:
            self.stop()
            with open(self.log.name, encoding="utf-8", errors="replace") as f:
                raise RuntimeError(f"aspen serve did not start:\n{f.read()[-3000:]}")
        self.address, self.metrics_port = f"{match.group(1)}:{match.group(2)}", int(match.group(3))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        os.unlink(self.log.name)


def drop_from_page_cache(directory: str) -> None:
    """Ask the kernel to forget the cached pages of every file in ``directory`` (no root needed)."""
    for name in os.listdir(directory):
        fd = os.open(os.path.join(directory, name), os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_into_page_cache(directory: str) -> None:
    """Read every file of ``directory`` once, so the next read of it comes from the page cache."""
    for name in os.listdir(directory):
        with open(os.path.join(directory, name), "rb") as f:
            while f.read(1 << 22):
                pass


def time_adapter_loads(model: str, root: str, ids: list[str], device: str, pages: int, cold: bool,
                       fill_ids: tuple[str, ...] = (), host_bytes: int | None = None) -> list[float]:
    """Seconds of ``LLMEngine.load_adapter`` (disk -> host -> device pool) for each id, on a fresh engine, with the
    adapter's files in the page cache (``cold`` False: read before the engine is built; other work on the machine
    may have evicted them since they were written) or dropped from it (``cold``).

    ``fill_ids`` are loaded first, untimed, into a host tier of ``host_bytes``: when they overfill it, every timed
    load evicts an adapter from the host tier as it would in a server that has run for a while, and reads into
    memory the process has used before. Without them, the timed loads fill an empty host tier: every read lands
    in memory fresh from the kernel, whose first touch costs page faults."""
    from engine.llm_engine import LLMEngine

    if not cold:  # before the engine is built, whose loading pushes these files out of the CPU's caches again
        for aid in ids:
            read_into_page_cache(os.path.join(root, aid))
    extra = {} if host_bytes is None else {"host_adapter_bytes": host_bytes}
    llm = LLMEngine(model=model, adapter_dir=root, device=device, progress=False, lora_pool_pages=pages,
                    num_kv_blocks=256, max_model_len=1024, **extra)
    for aid in fill_ids:
        llm.load_adapter(aid)
    llm.load_adapter(ids[0])  # warm-up: first-use costs (imports, allocator) are not a per-adapter cost
    evicted_before = llm.adapter_cache.stats().evictions_host
    out = []
    for aid in ids[1:]:
        if cold:
            drop_from_page_cache(os.path.join(root, aid))
        t0 = time.perf_counter()
        llm.load_adapter(aid)
        if device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
        if llm.adapter_cache.tier(aid) != "device":
            raise RuntimeError(f"{aid} did not reach the device tier")
    evicted = llm.adapter_cache.stats().evictions_host - evicted_before
    if fill_ids and evicted < len(out):
        raise RuntimeError(f"{evicted} host-tier evictions in {len(out)} timed loads: the host tier was not full")
    return out


def ms_stats(xs: list[float]) -> dict:
    ys = sorted(x * 1e3 for x in xs)
    return {"n": len(ys), "min": round(ys[0], 3), "median": round(statistics.median(ys), 3),
            "p90": round(ys[min(len(ys) - 1, int(0.9 * len(ys)))], 3), "max": round(ys[-1], 3)}


def main(argv: list[str] | None = None) -> dict:
    from aspen.lora.peft.synthetic import adapter_name
    from aspen.lora.pool import LoraPool
    from aspen.model.config import ModelConfig
    from benchmarks.engine_lora import bench_adapters, pages_per_adapter
    from clients.loadtest.driver import (
        DriverConfig,
        LengthSpec,
        RunResult,
        WorkloadConfig,
        build_workload,
        drive,
    )
    from clients.loadtest.report import summarize, write_outputs

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--num-adapters", type=int, default=None, help="adapters on disk (default 1000; tiny 24)")
    ap.add_argument("--cache-adapters", type=int, default=None, help="device cache size (default 64; tiny 4)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--requests", type=int, default=None, help="requests per run (default 200; tiny 16)")
    ap.add_argument("--rate", type=float, default=None, help="offered req/s (default 2; tiny 20)")
    ap.add_argument("--alphas", default="1.0,0.3", help="power-law exponents to run (default 1.0,0.3)")
    ap.add_argument("--input-len", type=int, default=None, help="prompt tokens (default 32; tiny 8)")
    ap.add_argument("--output-len", type=int, default=None, help="new tokens (default 16; tiny 4)")
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--load-samples", type=int, default=None, help="adapters timed per load measurement "
                    "(default 20; tiny 4)")
    ap.add_argument("--slices", type=int, default=None, help="interleave the runs in this many slices of "
                    "consecutive requests (default 10; tiny 2; 1 = one run after another)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-packed-gemm", action="store_true",
                    help="servers keep the plain weight layout (default: packed, as `aspen serve` does)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--plots-dir", default=None, help="where the load tester writes its report and CDF plot "
                    "(default: next to --out)")
    args = ap.parse_args(argv)
    tiny = args.tiny
    shape = "tiny" if tiny else "125m"
    num = args.num_adapters or (24 if tiny else 1000)
    cache = args.cache_adapters or (4 if tiny else 64)
    n_req = args.requests or (16 if tiny else 200)
    rate = args.rate or (20.0 if tiny else 2.0)
    samples = args.load_samples or (4 if tiny else 20)
    args.slices = args.slices or (2 if tiny else 10)
    in_len, out_len = args.input_len or (8 if tiny else 32), args.output_len or (4 if tiny else 16)
    model = bench_model(shape)
    cfg = ModelConfig.from_dir(model)
    root = bench_adapters(shape, num, args.rank, progress=not tiny)
    ppa = pages_per_adapter(args.rank)
    pool_mb = math.ceil(cache * ppa * LoraPool.bytes_per_page(cfg, _float32()) / 2**20)

    # 2. adapter load time disk -> device, in process
    sample_ids = [adapter_name(i) for i in range(num - 1, -1, -max(1, num // (samples + 1)))][:samples + 1]
    warm = time_adapter_loads(model, root, sample_ids, args.device, cache * ppa, cold=False)
    cold = time_adapter_loads(model, root, sample_ids, args.device, cache * ppa, cold=True)
    # the same loads into a full host tier of 4 adapters: each evicts one, as in a server that has run a while
    fill = tuple(adapter_name(i) for i in range(6) if adapter_name(i) not in sample_ids)
    host_bytes = 4 * _dir_bytes(os.path.join(root, adapter_name(0)))
    steady_warm = time_adapter_loads(model, root, sample_ids, args.device, cache * ppa, cold=False,
                                     fill_ids=fill, host_bytes=host_bytes)
    steady_cold = time_adapter_loads(model, root, sample_ids, args.device, cache * ppa, cold=True,
                                     fill_ids=fill, host_bytes=host_bytes)
    load_times = {"first_fill_warm": warm, "first_fill_cold": cold, "full_host_tier_warm": steady_warm,
                  "full_host_tier_cold": steady_cold}
    report = ReportFile("adapter_churn", args.out)
    report.measured({
        "shape": shape, "device": device_name(args.device),
        "adapters_on_disk": num, "rank": args.rank, "targets": "all seven projections",
        "adapter_mb_on_disk": round(_dir_bytes(os.path.join(root, adapter_name(0))) / 1e6, 2),
        "device_cache_adapters_requested": cache, "lora_pool_mb": pool_mb,
        "load_ms": {k: [round(t * 1e3, 3) for t in v] for k, v in load_times.items()},
    })

    # 3. load-test runs through the server
    driver = DriverConfig(mode="open", progress=not tiny, timeout_s=600)
    metrics = {}
    configs = [("single", None)] + [(f"alpha={a}", float(a)) for a in args.alphas.split(",") if a]
    capacity = None
    servers: dict[str, Server] = {}
    workloads: dict[str, list] = {}
    with report.guarded(), contextlib.ExitStack() as running:
        from clients.client import AspenClient

        for label, alpha in configs:  # every server up (idle) before any is measured
            servers[label] = server = Server(model, root, args.device, pool_mb, args.max_num_seqs,
                                             ("--no-packed-gemm",) if args.no_packed_gemm else ())
            running.callback(server.stop)
            with AspenClient(server.address, timeout=60) as c:
                capacity = c.model_info().adapter_cache_device_pages
                for _ in range(2):
                    c.generate(list(range(4, 4 + in_len)), max_new_tokens=out_len, temperature=0.0, ignore_eos=True)
            wl = WorkloadConfig(num_requests=n_req, rate=rate, num_adapters=num, seed=args.seed,
                                adapter_ids=(adapter_name(0),) if alpha is None else None,
                                popularity="power", alpha=alpha or 1.0, input_len=LengthSpec(in_len, in_len),
                                output_len=LengthSpec(out_len, out_len))
            workloads[label] = build_workload(wl, cfg.vocab_size, cfg.max_position_embeddings)
        runs = {label: RunResult(label, rate) for label, _ in configs}
        labels = [label for label, _ in configs]
        for i, (lo, hi) in enumerate(slice_bounds(n_req, args.slices)):
            for label in labels[i % len(labels):] + labels[:i % len(labels)]:  # rotate who goes first
                part = rebase(workloads[label][lo:hi])
                cfg_i = DriverConfig(**{**driver.__dict__, "address": servers[label].address})
                merge(runs[label], asyncio.run(drive(part, cfg_i, f"{label} {i + 1}/{args.slices}", rate)))
        for label in labels:
            metrics[label] = cache_metrics(servers[label].metrics_port)
    plots_dir = args.plots_dir or os.path.join(os.path.dirname(os.path.abspath(report.path)), "adapter_churn")
    report.measured({
        "device_pool_pages": capacity, "device_cache_adapters": None if capacity is None else capacity // ppa,
        "requests_per_run": n_req, "slices": args.slices, "offered_rate": rate, "input_len": in_len,
        "output_len": out_len, "max_num_seqs": args.max_num_seqs, "packed_gemm": not args.no_packed_gemm,
        "cache_metrics": metrics, "loadtest_report": os.path.join(plots_dir, "report.json"),
    })
    # the load tester's report.json (every request's record) next, then its summaries and plots
    outputs = write_outputs(list(runs.values()), {"benchmark": "adapter_churn"}, plots_dir)
    for note in outputs.skipped + outputs.failed:
        print(f"adapter_churn: {note}", file=sys.stderr)
    with report.guarded():
        summaries = {label: summarize(run) for label, run in runs.items()}
        single_p99 = summaries["single"]["ttft"]["p99"]
        per_alpha = {}
        for label, _ in configs[1:]:
            s = summaries[label]
            ratio = s["ttft"]["p99"] / single_p99 if s["ttft"]["p99"] and single_p99 else None
            per_alpha[label] = {"p99_ttft_vs_single": None if ratio is None else round(ratio, 3),
                                "meets_target": ratio is not None and ratio <= 2.0}
        figures = {
            "load_ms_warm_page_cache": ms_stats(warm), "load_ms_cold": ms_stats(cold),
            "load_ms_full_host_tier_warm_page_cache": ms_stats(steady_warm),
            "load_ms_full_host_tier_cold": ms_stats(steady_cold),
            "load_target_ms": 10.0,
            "meets_load_target": {k: statistics.median(v) * 1e3 <= 10.0 for k, v in load_times.items()},
            "runs": {label: {"ttft_p50_ms": _ms(s["ttft"]["p50"]), "ttft_p99_ms": _ms(s["ttft"]["p99"]),
                             "tpot_p50_ms": _ms(s["tpot"]["p50"]), "e2e_p99_ms": _ms(s["e2e"]["p99"]),
                             "request_throughput": round(s["request_throughput"], 3),
                             "output_token_throughput": round(s["output_token_throughput"], 2),
                             "ok": s["ok"], "errors": s["errors"], "distinct_adapters": s["distinct_adapters"],
                             "cache": metrics[label]}
                     for label, s in summaries.items()},
            "p99_ttft_target": "<= 2x single", "per_alpha": per_alpha,
            "meets_ttft_target": all(v["meets_target"] for v in per_alpha.values()),
            "loadtest_files": outputs.files, "loadtest_not_written": outputs.skipped + outputs.failed,
        }
    return report.complete(figures)


def _ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1e3, 1)


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def _float32():
    import torch

    return torch.float32


if __name__ == "__main__":
    main()
