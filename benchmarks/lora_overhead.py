"""One decode step for 32 rows with 32 distinct rank-16 adapters on all seven projections, vs the same step with
no adapters (target: LoRA step <= 1.10x the base step).

    python -m benchmarks.lora_overhead [--shape 125m|tiny] [--device cpu|cuda] [--adapter-dtype float16]
        [--phase decode|prefill] [--short-prefill-tokens N] [--out report.json]

``--phase prefill`` times a step of 32 fresh prompts (32-64 tokens) instead, the rows' LoRA work then going
through the batched kernel (short prefills) or per-adapter matmul segments (``--short-prefill-tokens 0``).

``--adapter-dtype`` stores the adapter pool in 16 bits (the model and the LoRA math stay float32): the pool is
what a step with many distinct adapters reads, so this halves the op's memory traffic, at the cost of rounding
the adapter weights (float16 keeps 11 significant bits).
"""
from __future__ import annotations

import argparse

import torch

import aspen
import aspen.lora.op
from aspen.lora.op import LoraBatch
from aspen.lora.peft.writer import random_adapter
from aspen.model.batch import SeqChunk
from aspen.model.config import LORA_TARGETS
from aspen.model.packed_linear import backend_of
from benchmarks.common import ReportFile, bench_model, best, device_name, interleaved, median


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
    ap.add_argument("--phase", default="decode", choices=["decode", "prefill"],
                    help="time a decode step (the target's phase) or a prefill step of --rows prompts of "
                         "--prompt-len tokens")
    ap.add_argument("--prompt-len", default="32-64", help="prefill phase: prompt lengths, 'N' or 'LO-HI'")
    ap.add_argument("--short-prefill-tokens", type=int, default=None,
                    help="override aspen.lora.op's limits on the prefill tokens per adapter that take the "
                         "batched kernel (0: every prefill by matmul segments)")
    ap.add_argument("--packed-backend", choices=("auto", "mkl", "panels"), default="auto",
                    help="packed GEMM layout (auto: our AVX-512 panels where built, else MKL's)")
    ap.add_argument("--no-packed-gemm", action="store_true",
                    help="plain weight layout (the engine packs float32 CPU weights by default)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.short_prefill_tokens is not None:
        aspen.lora.op.SHORT_PREFILL_TOKENS = aspen.lora.op.SGMV_PREFILL_TOKENS = args.short_prefill_tokens

    model = aspen.load_model(bench_model(args.shape), device=args.device, progress=False)
    packed = 0 if args.no_packed_gemm else model.pack_for_inference(args.packed_backend)  # as the engine does
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
    slots = [i % args.adapters for i in range(args.rows)]
    if args.phase == "decode":
        # fill every row's KV cache with its context (prefill, untimed)
        model.step(model.flat_batch([SeqChunk(r[:-1], 0, t) for r, t in zip(rows, tables)], block), kv)
        base_chunks = [SeqChunk(r[-1:], args.context, t) for r, t in zip(rows, tables)]
        lora_chunks = [SeqChunk(r[-1:], args.context, t, adapter_slot=s) for r, t, s in zip(rows, tables, slots)]
    else:
        lo, _, hi = args.prompt_len.partition("-")
        lens = torch.randint(int(lo), int(hi or lo) + 1, (args.rows,), generator=g).tolist()
        if max(lens) > args.context + 1:
            raise SystemExit(f"--prompt-len {args.prompt_len} exceeds --context {args.context} + 1")
        base_chunks = [SeqChunk(r[:n], 0, t) for r, t, n in zip(rows, tables, lens)]
        lora_chunks = [SeqChunk(r[:n], 0, t, adapter_slot=s) for r, t, n, s in zip(rows, tables, lens, slots)]

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def base_step():  # a step as the engine's runner takes it: the flat batch, then the model
        model.step(model.flat_batch(base_chunks, block), kv)
        sync()

    def lora_step():  # ... with the LoRA batch built in between
        batch = model.flat_batch(lora_chunks, block)
        model.step(batch, kv, LoraBatch.for_step(batch, pooled, pool, model.dtype))
        sync()

    t_base, t_lora = interleaved(base_step, lora_step, args.repeats)
    report = ReportFile("lora_overhead", args.out)
    report.measured({
        "shape": args.shape, "device": device_name(args.device),
        "rows": args.rows, "distinct_adapters": args.adapters, "rank": args.rank, "targets": list(LORA_TARGETS),
        "phase": args.phase, "context": args.context, "repeats": args.repeats,
        "prompt_tokens": sum(len(c.token_ids) for c in lora_chunks) if args.phase == "prefill" else None,
        "short_prefill_tokens": aspen.lora.op.short_prefill_tokens(),
        "base_step_ms": [round(t * 1e3, 3) for t in t_base], "lora_step_ms": [round(t * 1e3, 3) for t in t_lora],
        "packed_gemm_layers": packed, "packed_backend": backend_of(model.model),
        "pool_mib": round(pool.nbytes / 2**20, 1), "adapter_dtype": str(pool.data.dtype).removeprefix("torch."),
    })
    with report.guarded():
        ratio = best(t_lora) / best(t_base)
        figures = {
            "base_step_ms_best": round(best(t_base) * 1e3, 2), "lora_step_ms_best": round(best(t_lora) * 1e3, 2),
            "base_step_ms_median": round(median(t_base) * 1e3, 2),
            "lora_step_ms_median": round(median(t_lora) * 1e3, 2),
            "lora_over_base": round(ratio, 3), "lora_over_base_median": round(median(t_lora) / median(t_base), 3),
            "target": "<= 1.10" if args.phase == "decode" else None,
            "meets_target": ratio <= 1.10 if args.phase == "decode" else None,
        }
    return report.complete(figures)


if __name__ == "__main__":
    main()
