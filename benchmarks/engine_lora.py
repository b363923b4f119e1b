"""Engine-level LoRA overhead: LLMEngine with 32 distinct rank-16 adapters (all seven projections) in a batch of
32 requests vs the engine with no adapters, same prompts and output lengths (target: tokens/s ratio >= 0.90).

    python -m benchmarks.engine_lora [--tiny] [--device cpu|cuda] [--repeats 3] [--out report.json]
                                     [--default-sizing]

Both engines load the same checkpoint and take the same 32 requests (fixed seed: prompts of 32-64 random token
ids, 32 new tokens each, greedy, EOS ignored) in one ``generate`` call; request i uses adapter i in the LoRA
engine. Prefix caching is off (repeats must not reuse KV) and the KV pool holds every request (no preemption).
``--default-sizing`` builds both engines with no sizing options at all (what a fresh ``LLMEngine`` or ``aspen serve``
gets). The adapters are made once by :mod:`aspen.lora.peft.synthetic` under ``$ASPEN_HOME/bench`` and made resident
by a warm-up call, so loading them is not timed. Runs alternate (base, LoRA, base, ...) after one warm-up each;
the ratio is of the best runs (the medians are reported too).
"""
from __future__ import annotations

import os

from benchmarks.common import ReportFile, bench_home, bench_model, best, device_name, interleaved, median

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def bench_adapters(shape: str, num: int, rank: int = 16, targets: str = "all", progress: bool = True) -> str:
    """The adapter root with (at least) ``num`` synthetic adapters adapter-0000.. for the bench model ``shape``
    (made once, then reused and extended)."""
    from aspen.lora.peft.synthetic import make_adapters

    root = os.path.join(bench_home(), f"adapters-{shape}-r{rank}-{targets}")
    make_adapters(bench_model(shape), root, num, rank=rank, targets=targets, progress=progress)
    return root


def pages_per_adapter(rank: int = 16, targets: tuple[str, ...] = ALL) -> int:
    """LoRA pool pages of one adapter: one page per rank row of each targeted projection."""
    return rank * len(targets)


def main(argv: list[str] | None = None) -> dict:
    import argparse

    from aspen.lora.peft.synthetic import adapter_name
    from benchmarks.vs_transformers import (
        BenchRequest,
        engine_generate,
        machine,
        make_engine,
        make_requests,
        sync,
        useful_tokens,
    )

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="the tiny model, 4 adapters (smoke test)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each engine (default 3)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--adapters", type=int, default=None, help="distinct adapters = requests (default 32; tiny 4)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--output-len", type=int, default=None, help="new tokens per request (default 32; tiny 8)")
    ap.add_argument("--adapter-dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                    help="storage dtype of the LoRA engine's adapter pool (auto: the model's)")
    ap.add_argument("--default-sizing", action="store_true",
                    help="both engines with no sizing options (KV pool, adapter pool and host tier from "
                         "--memory-utilization's default), as a fresh LLMEngine or aspen serve runs")
    args = ap.parse_args(argv)
    shape = "tiny" if args.tiny else "125m"
    n = args.adapters or (4 if args.tiny else 32)
    out_len = args.output_len or (8 if args.tiny else 32)
    path = bench_model(shape)
    from aspen.model.config import ModelConfig

    vocab = ModelConfig.from_dir(path).vocab_size
    plen = (8, 16) if args.tiny else (32, 64)
    reqs = make_requests(n, vocab, args.seed, plen, (out_len, out_len), num_adapters=n)
    root = bench_adapters(shape, n, args.rank)
    ids = [adapter_name(i) for i in range(n)]
    if args.default_sizing:
        from engine.llm_engine import LLMEngine

        def default_engine(adapter_dir):  # prefix caching off: repeats must not reuse KV (not a sizing option)
            return LLMEngine(model=path, adapter_dir=adapter_dir, device=args.device, progress=False,
                             enable_prefix_caching=False, adapter_dtype=args.adapter_dtype)

        base, lora = default_engine(None), default_engine(root)
    else:
        base = make_engine(path, args.device, reqs)
        lora = make_engine(path, args.device, reqs, adapter_dir=root,
                           lora_pool_pages=n * pages_per_adapter(args.rank), adapter_dtype=args.adapter_dtype)
    warm = [BenchRequest(r.prompt[:8], 2, r.adapter) for r in reqs]
    engine_generate(lora, warm, ids)  # every adapter resident before timing
    stats = lora.adapter_cache.stats()
    if stats.pages_device != n * pages_per_adapter(args.rank) and not args.default_sizing:
        raise RuntimeError(f"expected all {n} adapters resident, the pool holds {stats.pages_device} pages")

    def run_base() -> None:
        engine_generate(base, reqs)
        sync(args.device)

    def run_lora() -> None:
        engine_generate(lora, reqs, ids)
        sync(args.device)

    load0 = machine()
    t_base, t_lora = interleaved(run_base, run_lora, args.repeats)
    report = ReportFile("engine_lora", args.out)
    tokens = useful_tokens(reqs)
    report.measured({
        "shape": shape, "device": device_name(args.device), "requests": n,
        "distinct_adapters": n, "rank": args.rank, "targets": list(ALL), "output_len": out_len,
        "adapter_dtype": args.adapter_dtype, "default_sizing": args.default_sizing,
        "kv_blocks": base.block_manager.num_blocks, "lora_pool_pages": lora.capacity.pool_pages,
        "adapter_pages_resident_after_warmup": stats.pages_device,
        "tokens_per_run": tokens, "repeats": args.repeats,
        "base_seconds": [round(t, 3) for t in t_base], "lora_seconds": [round(t, 3) for t in t_lora],
        "machine_before": load0, "machine_after": machine(),
    })
    with report.guarded():
        ratio = best(t_base) / best(t_lora)  # tokens/s of LoRA over tokens/s of base
        figures = {
            "base_tok_s": round(tokens / best(t_base), 2), "lora_tok_s": round(tokens / best(t_lora), 2),
            "lora_over_base_tok_s": round(ratio, 3),
            "lora_over_base_tok_s_median": round(median(t_base) / median(t_lora), 3),
            "target": ">= 0.90", "meets_target": ratio >= 0.90,
        }
    return report.complete(figures)


if __name__ == "__main__":
    main()
