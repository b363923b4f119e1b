"""One decode step for 32 rows with 32 distinct rank-16 adapters on all seven projections, vs the same step with
no adapters (issue: multi-LoRA op; target: LoRA step <= 1.10x the base step).

    python -m benchmarks.lora_overhead [--shape 125m|tiny] [--device cpu|cuda] [--adapter-dtype float16]
        [--out report.json]

``--adapter-dtype`` stores the adapter pool in 16 bits (the model and the LoRA math stay float32): the pool is
what a step with many distinct adapters reads, so this halves the op's memory traffic, at the cost of rounding
the adapter weights (float16 keeps 11 significant bits).
"""
from __future__ import annotations

import argparse

import torch

import aspen
from aspen.batch import SeqChunk
from aspen.config import LORA_TARGETS
from aspen.lora_op import LoraBatch
from aspen.peft_io import random_adapter
from benchmarks.common import bench_model, best, device_name, interleaved, median, write_report


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="125m", choices=["125m", "tiny"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--adapters", type=int, default=32)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--context", type=int, default=128, help="tokens already in each row's KV cache")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--adapter-dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                    help="storage dtype of the adapter pool (auto: the model's); the math stays in the model's")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    model = aspen.load_model(bench_model(args.shape), device=args.device, progress=False)
    cfg = model.config
    adapters = [random_adapter(cfg, args.rank, LORA_TARGETS, seed=i) for i in range(args.adapters)]
    pool, pooled = model.pool_adapters(adapters, None if args.adapter_dtype == "auto" else args.adapter_dtype)
    block = 16
    blocks_per_row = (args.context + 1 + block - 1) // block
    kv = model.new_kv_cache(args.rows * blocks_per_row, block)
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(4, min(cfg.vocab_size, 300), (args.context + 1,), generator=g).tolist()
            for _ in range(args.rows)]
    tables = [list(range(i * blocks_per_row, (i + 1) * blocks_per_row)) for i in range(args.rows)]
    # fill every row's KV cache with its context (prefill, untimed)
    model.step([SeqChunk(r[:-1], 0, t) for r, t in zip(rows, tables)], kv)
    slots = [i % args.adapters for i in range(args.rows)]
    base_chunks = [SeqChunk(r[-1:], args.context, t) for r, t in zip(rows, tables)]
    lora_chunks = [SeqChunk(r[-1:], args.context, t, adapter_slot=s) for r, t, s in zip(rows, tables, slots)]
    make_lora = lambda b: LoraBatch.for_step(b, pooled, pool)

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def base_step():
        model.step(base_chunks, kv)
        sync()

    def lora_step():
        model.step(lora_chunks, kv, make_lora)
        sync()

    t_base, t_lora = interleaved(base_step, lora_step, args.repeats)
    ratio = best(t_lora) / best(t_base)
    report = {
        "benchmark": "lora_overhead", "shape": args.shape, "device": device_name(args.device),
        "rows": args.rows, "distinct_adapters": args.adapters, "rank": args.rank, "targets": list(LORA_TARGETS),
        "context": args.context, "repeats": args.repeats,
        "base_step_ms_best": round(best(t_base) * 1e3, 2), "lora_step_ms_best": round(best(t_lora) * 1e3, 2),
        "base_step_ms_median": round(median(t_base) * 1e3, 2), "lora_step_ms_median": round(median(t_lora) * 1e3, 2),
        "lora_over_base": round(ratio, 3), "lora_over_base_median": round(median(t_lora) / median(t_base), 3),
        "target": "<= 1.10", "meets_target": ratio <= 1.10,
        "pool_mib": round(pool.nbytes / 2**20, 1), "adapter_dtype": str(pool.data.dtype).removeprefix("torch."),
    }
    write_report(args.out, report)
    return report


if __name__ == "__main__":
    main()
