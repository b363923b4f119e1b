"""Quantized base models (bitsandbytes int8 / nf4): memory per projection parameter and engine throughput
relative to fp32, on the same requests.

    python -m benchmarks.quantized [--tiny] [--device cpu|cuda] [--modes int8,nf4] [--out report.json]

Memory per parameter = :func:`aspen.model.quantize.weight_bytes` summed over every projection module (the quantized
ones: qkv, o, gate_up, down of each layer; quantization state such as absmax / SCB included) / their parameter
count (in x out features, + bias). Embeddings, norms and the LM head stay fp32 in every mode and are excluded.
Throughput = generated tokens / wall time of one ``LLMEngine.generate`` over ``--requests`` (16) requests of 32
random prompt tokens and ``--output-len`` (16) new tokens (greedy, EOS ignored, prefix caching off); one short
warm-up per engine, then ``--repeats`` alternating runs, best of each. On CPU bitsandbytes dequantises the
weights on every call, so quantized engines are expected to be slower there: quantization buys memory, not speed.
"""
from __future__ import annotations

import argparse

from benchmarks.common import ReportFile, bench_model, best, device_name, median


def projection_bytes(llm) -> tuple[int, int]:
    """(bytes stored, parameters) over the projection modules of every layer."""
    from aspen.model.quantize import _GROUPS, weight_bytes

    stored = params = 0
    for layer in llm.model.model.model.layers:
        for block_name, proj in _GROUPS:
            m = getattr(getattr(layer, block_name), proj)
            stored += weight_bytes(m)
            params += m.in_features * m.out_features + (m.out_features if m.bias is not None else 0)
    return stored, params


def main(argv: list[str] | None = None) -> dict:
    from benchmarks.vs_transformers import (
        BenchRequest,
        engine_generate,
        machine,
        make_engine,
        make_requests,
        timed,
        useful_tokens,
    )

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--modes", default="int8,nf4", help="comma-separated quantization modes (default int8,nf4)")
    ap.add_argument("--requests", type=int, default=None, help="default 16; tiny 4")
    ap.add_argument("--output-len", type=int, default=None, help="default 16; tiny 4")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    shape = "tiny" if args.tiny else "125m"
    path = bench_model(shape)
    from aspen.model.config import ModelConfig

    vocab = ModelConfig.from_dir(path).vocab_size
    out_len = args.output_len or (4 if args.tiny else 16)
    plen = 8 if args.tiny else 32
    reqs = make_requests(args.requests or (4 if args.tiny else 16), vocab, args.seed, (plen, plen), (out_len, out_len))
    modes = ["none"] + [m for m in args.modes.split(",") if m and m != "none"]
    engines = {m: make_engine(path, args.device, reqs, quantize=None if m == "none" else m) for m in modes}
    memory = {}
    for m, llm in engines.items():
        stored, params = projection_bytes(llm)
        memory[m] = {"projection_bytes": stored, "projection_params": params,
                     "bytes_per_param": round(stored / params, 4)}
        engine_generate(llm, [BenchRequest(r.prompt, 2, -1) for r in reqs[:2]])  # warm-up
    load0 = machine()
    times: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(args.repeats):
        for m, llm in engines.items():
            times[m].append(timed(lambda llm=llm: engine_generate(llm, reqs), args.device))
    report = ReportFile("quantized", args.out)
    tokens = useful_tokens(reqs)
    report.measured({
        "shape": shape, "device": device_name(args.device), "requests": len(reqs), "output_len": out_len,
        "prompt_len": plen, "tokens_per_run": tokens, "repeats": args.repeats,
        "modes": {m: {**memory[m], "seconds": [round(t, 3) for t in times[m]]} for m in modes},
        "machine_before": load0, "machine_after": machine(),
    })
    with report.guarded():
        fp32 = tokens / best(times["none"])
        results = {}
        for m in modes:
            tok_s = tokens / best(times[m])
            results[m] = {**memory[m], "seconds": [round(t, 3) for t in times[m]], "tok_s": round(tok_s, 2),
                          "tok_s_median": round(tokens / median(times[m]), 2),
                          "throughput_vs_fp32": round(tok_s / fp32, 3),
                          "memory_vs_fp32": round(memory[m]["bytes_per_param"] / memory["none"]["bytes_per_param"],
                                                  4)}
    return report.complete({"modes": results})


if __name__ == "__main__":
    main()
