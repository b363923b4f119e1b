"""Compute efficiency of a decode step: achieved GFLOP/s at decode batch 64 relative to the fp32 GEMM peak of
the same machine, measured in the same run.

    python -m benchmarks.compute_efficiency [--tiny] [--device cpu|cuda] [--repeats 10] [--out report.json]

Achieved = 2 x matmul parameters x tokens per step / step time, where the matmul parameters are every projection
of every layer plus the LM head (embeddings and norms excluded; attention over the KV cache is not counted, so the
figure slightly understates the work done). The step is one decode token for each of ``--rows`` (64) sequences
with ``--context`` (128) tokens already cached, base model only (the LoRA delta is measured by
``benchmarks.lora_overhead`` / ``benchmarks.engine_lora``). Peak = 2 x n^3 / time of one n x n fp32 matmul
(n = 2048, TF32 off on CUDA). Both are the best of ``--repeats`` after a warm-up, alternating.
"""
from __future__ import annotations

import argparse

import torch

import aspen
from aspen.model.batch import SeqChunk
from aspen.model.packed_linear import backend_of
from benchmarks.common import ReportFile, bench_model, best, device_name, interleaved, median


def matmul_params(model) -> int:
    """Parameters that take part in a matmul per token: 2-D weights except the input embedding."""
    embed = model.model.model.embed_tokens.weight if hasattr(model.model, "model") else None
    total, seen = 0, set()
    for name, p in model.model.named_parameters():
        if p.dim() != 2 or id(p) in seen or "embed_tokens" in name:
            continue
        seen.add(id(p))
        total += p.numel()
    lm_head = getattr(model.model, "lm_head", None)
    if lm_head is not None and embed is not None and lm_head.weight is embed:  # tied: count the head once
        total += embed.numel()
    return total


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rows", type=int, default=64, help="decode batch (default 64)")
    ap.add_argument("--context", type=int, default=128, help="tokens already cached per row (default 128)")
    ap.add_argument("--gemm", type=int, default=None, help="peak matmul size n (default 2048; tiny 512)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--packed-backend", choices=("auto", "mkl", "panels"), default="auto",
                    help="packed GEMM layout (auto: our AVX-512 panels where built, else MKL's)")
    ap.add_argument("--no-packed-gemm", action="store_true",
                    help="plain weight layout (the engine packs float32 CPU weights by default)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False
    shape = "tiny" if args.tiny else "125m"
    n = args.gemm or (512 if args.tiny else 2048)
    model = aspen.load_model(bench_model(shape), device=args.device, progress=False)
    params = matmul_params(model)  # counted before packing: packed layers hold no weight parameter
    packed = 0 if args.no_packed_gemm else model.pack_for_inference(args.packed_backend)
    cfg = model.config
    block = 16
    per_row = (args.context + 1 + block - 1) // block
    kv = model.new_kv_cache(args.rows * per_row, block)
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(4, cfg.vocab_size, (args.context + 1,), generator=g).tolist() for _ in range(args.rows)]
    tables = [list(range(i * per_row, (i + 1) * per_row)) for i in range(args.rows)]
    model.step(model.flat_batch([SeqChunk(r[:-1], 0, t) for r, t in zip(rows, tables)], block), kv)  # untimed fill
    decode = [SeqChunk(r[-1:], args.context, t) for r, t in zip(rows, tables)]
    a = torch.randn(n, n, device=args.device)
    b = torch.randn(n, n, device=args.device)

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def step() -> None:
        model.step(model.flat_batch(decode, block), kv)
        sync()

    def gemm() -> None:
        torch.mm(a, b)
        sync()

    t_step, t_gemm = interleaved(step, gemm, args.repeats)
    report = ReportFile("compute_efficiency", args.out)
    report.measured({
        "shape": shape, "device": device_name(args.device), "dtype": "float32",
        "decode_rows": args.rows, "context": args.context, "matmul_params": params, "gemm_n": n,
        "repeats": args.repeats, "packed_gemm_layers": packed, "packed_backend": backend_of(model.model),
        "step_ms": [round(t * 1e3, 3) for t in t_step], "gemm_ms": [round(t * 1e3, 3) for t in t_gemm],
    })
    with report.guarded():
        achieved = 2 * params * args.rows / best(t_step) / 1e9
        peak = 2 * n ** 3 / best(t_gemm) / 1e9
        figures = {
            "step_ms_best": round(best(t_step) * 1e3, 2),
            "step_ms_median": round(median(t_step) * 1e3, 2), "gemm_ms_best": round(best(t_gemm) * 1e3, 2),
            "achieved_gflops": round(achieved, 2), "peak_gemm_gflops": round(peak, 2),
            "achieved_gflops_median": round(2 * params * args.rows / median(t_step) / 1e9, 2),
            "peak_gemm_gflops_median": round(2 * n ** 3 / median(t_gemm) / 1e9, 2),
            "fraction_of_peak": round(achieved / peak, 3),
        }
    return report.complete(figures)


if __name__ == "__main__":
    main()
