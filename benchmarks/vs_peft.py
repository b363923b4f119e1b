"""Multi-adapter serving vs Hugging Face PEFT: 64 requests over 32 rank-16 adapters (all seven projections)
(targets: >= 3x PEFT's mixed-batch throughput, >= 10x PEFT one adapter at a time).

    python -m benchmarks.vs_peft [--tiny] [--device cpu|cuda] [--batch-size 32] [--out report.json]

Workload: that of :mod:`benchmarks.vs_transformers` (fixed seed; prompts 32-64 tokens, outputs 16-128 tokens,
greedy, EOS ignored), request i uses adapter i % 32. The 32 adapters are synthetic PEFT directories
(:mod:`aspen.lora.peft.synthetic`, under ``$ASPEN_HOME/bench``), the same files for every system.

* PEFT mixed batch: one ``PeftModel`` holding all 32 adapters (``from_pretrained`` + ``load_adapter``); the
  requests in order, in left-padded batches of ``--batch-size`` (32: each batch then holds 32 distinct adapters),
  ``generate(adapter_names=[...], max_new_tokens=m, min_new_tokens=m, do_sample=False)``, m = the batch's
  longest output.
* PEFT one adapter at a time: for each adapter, ``set_adapter`` then one left-padded ``generate`` of that
  adapter's requests (2 each), run to their longest output.
* ours: ``LLMEngine.generate`` on all 64 at once (max_num_seqs 64, all 32 adapters resident in the LoRA pool,
  prefix caching off), each request with its own ``max_new_tokens``.

Throughput = useful tokens / wall time, useful tokens = the sum of each request's own requested length for every
system (tokens HF generates past a request's length are not counted). Adapters are loaded before timing in every
system; one small warm-up each; ``--repeats`` timed runs each (default 1: the baselines take minutes on CPU).
"""
from __future__ import annotations

from benchmarks.common import ReportFile, best, device_name, median
from benchmarks.extras import require, run_as_script


def load_peft(path: str, adapter_dirs: list[str], names: list[str], device: str):
    """One PeftModel with every adapter loaded under its name."""
    from peft import PeftModel

    from benchmarks.vs_transformers import load_hf

    model = PeftModel.from_pretrained(load_hf(path, device), adapter_dirs[0], adapter_name=names[0])
    for d, name in zip(adapter_dirs[1:], names[1:]):
        model.load_adapter(d, adapter_name=name)
    return model.to(device).eval()


def main(argv: list[str] | None = None) -> dict:
    require("vs_peft")  # before anything is built
    import os

    from aspen.lora.peft.synthetic import adapter_name
    from benchmarks.engine_lora import bench_adapters, pages_per_adapter
    from benchmarks.vs_transformers import (
        BenchRequest,
        batches,
        common_args,
        engine_generate,
        hf_generate,
        machine,
        make_engine,
        timed,
        useful_tokens,
        workload_from_args,
    )

    ap = common_args(__doc__.splitlines()[0])
    ap.add_argument("--adapters", type=int, default=None, help="distinct adapters (default 32; tiny 4)")
    ap.add_argument("--rank", type=int, default=16)
    args = ap.parse_args(argv)
    n = args.adapters or (4 if args.tiny else 32)
    path, reqs, bs = workload_from_args(args, num_adapters=n)
    shape = "tiny" if args.tiny else "125m"
    root = bench_adapters(shape, n, args.rank)
    ids = [adapter_name(i) for i in range(n)]
    pad = 3
    peft = load_peft(path, [os.path.join(root, i) for i in ids], ids, args.device)
    llm = make_engine(path, args.device, reqs, adapter_dir=root, lora_pool_pages=n * pages_per_adapter(args.rank))

    # warm-ups (untimed): every adapter resident in our pool; PEFT's code paths exercised once
    engine_generate(llm, [BenchRequest(reqs[i].prompt[:8], 2, i) for i in range(n)], ids)
    warm = [BenchRequest(r.prompt, 2, r.adapter) for r in reqs[:2]]
    hf_generate(peft, warm, pad, args.device, adapter_names=[ids[r.adapter] for r in warm])
    by_adapter = {a: [r for r in reqs if r.adapter == a] for a in range(n)}
    load0 = machine()
    computed = {"mixed": 0, "one_at_a_time": 0}

    def run_mixed() -> None:
        computed["mixed"] = 0
        for b in batches(reqs, bs):
            computed["mixed"] += hf_generate(peft, b, pad, args.device, adapter_names=[ids[r.adapter] for r in b])

    def run_one_at_a_time() -> None:
        computed["one_at_a_time"] = 0
        for a, rs in by_adapter.items():
            if rs:
                peft.set_adapter(ids[a])
                computed["one_at_a_time"] += hf_generate(peft, rs, pad, args.device)

    t_ours, t_mixed, t_one = [], [], []
    for _ in range(args.repeats):
        t_ours.append(timed(lambda: engine_generate(llm, reqs, ids), args.device))
        t_mixed.append(timed(run_mixed, args.device))
        t_one.append(timed(run_one_at_a_time, args.device))
    report = ReportFile("vs_peft", args.out)
    tokens = useful_tokens(reqs)
    report.measured({
        "shape": shape, "device": device_name(args.device), "requests": len(reqs),
        "distinct_adapters": n, "rank": args.rank, "targets": "all seven projections", "hf_batch_size": bs,
        "useful_tokens": tokens, "peft_mixed_computed_tokens": computed["mixed"],
        "peft_one_at_a_time_computed_tokens": computed["one_at_a_time"], "repeats": args.repeats,
        "engine_seconds": [round(t, 3) for t in t_ours], "peft_mixed_seconds": [round(t, 3) for t in t_mixed],
        "peft_one_at_a_time_seconds": [round(t, 3) for t in t_one],
        "machine_before": load0, "machine_after": machine(),
    })
    with report.guarded():
        ours, mixed, one = (tokens / best(t) for t in (t_ours, t_mixed, t_one))
        vs_mixed, vs_one = ours / mixed, ours / one
        figures = {
            "engine_tok_s": round(ours, 2), "peft_mixed_tok_s": round(mixed, 2),
            "peft_one_at_a_time_tok_s": round(one, 2),
            "engine_tok_s_median": round(tokens / median(t_ours), 2),
            "speedup_vs_mixed": round(vs_mixed, 3), "speedup_vs_one_at_a_time": round(vs_one, 3),
            "target_vs_mixed": ">= 3", "target_vs_one_at_a_time": ">= 10",
            "meets_target_vs_mixed": vs_mixed >= 3, "meets_target_vs_one_at_a_time": vs_one >= 10,
        }
    return report.complete(figures)


if __name__ == "__main__":
    run_as_script("vs_peft", main)
