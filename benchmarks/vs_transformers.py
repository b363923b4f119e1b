"""Base model only: our LLMEngine vs Hugging Face transformers ``generate`` on the same requests (target >= 1.2x).

    python -m benchmarks.vs_transformers [--tiny] [--device cpu|cuda] [--batch-size 32] [--out report.json]

Workload (shared with benchmarks.vs_peft; fixed seed): ``--requests`` (64) requests, prompts of 32-64 random
token ids, output lengths uniform in 16-128 tokens, greedy, EOS ignored.

* transformers: the requests in order, in batches of ``--batch-size`` (32), left-padded; each batch runs
  ``generate(max_new_tokens=m, min_new_tokens=m, do_sample=False)`` with m = the longest output of the batch
  (HF stops a batch only at its longest member, and ``min_new_tokens`` masks EOS so lengths are honest).
* ours: ``LLMEngine.generate`` on all requests at once (max_num_seqs = requests, prefix caching off so repeated
  timings cannot reuse KV, a KV pool that holds every request: no preemption), ``max_new_tokens`` = each
  request's own length, ``ignore_eos``.

Throughput = useful tokens / wall time, useful tokens = the sum of each request's own requested length for
both systems (the extra tokens HF computes for shorter requests in a batch are not counted). One warm-up of
each system on a small batch; then ``--repeats`` alternating timed runs (ours, theirs, ours, ...); the best
run of each gives the ratio.
"""
from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass

import torch

from benchmarks.common import ReportFile, bench_model, best, device_name, median


@dataclass(frozen=True)
class BenchRequest:
    prompt: list[int]
    max_new_tokens: int
    adapter: int  # adapter index (vs_peft), -1 = base


def make_requests(num: int, vocab: int, seed: int = 0, prompt_len: tuple[int, int] = (32, 64),
                  output_len: tuple[int, int] = (16, 128), num_adapters: int = 0) -> list[BenchRequest]:
    """Fixed-seed requests; request i uses adapter i % num_adapters (or none)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(num):
        plen = int(torch.randint(prompt_len[0], prompt_len[1] + 1, (1,), generator=g))
        olen = int(torch.randint(output_len[0], output_len[1] + 1, (1,), generator=g))
        prompt = torch.randint(4, vocab, (plen,), generator=g).tolist()
        out.append(BenchRequest(prompt, olen, i % num_adapters if num_adapters else -1))
    return out


def useful_tokens(requests: list[BenchRequest]) -> int:
    return sum(r.max_new_tokens for r in requests)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def left_pad(prompts: list[list[int]], pad_id: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids.to(device), mask.to(device)


def hf_generate(model, batch: list[BenchRequest], pad_id: int, device: str, **kwargs) -> int:
    """One left-padded greedy batch run to its longest output; returns the tokens computed (batch x m)."""
    m = max(r.max_new_tokens for r in batch)
    ids, mask = left_pad([r.prompt for r in batch], pad_id, device)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=m, min_new_tokens=m,
                             do_sample=False, pad_token_id=pad_id, **kwargs)
    if out.shape[1] - ids.shape[1] != m:
        raise RuntimeError(f"transformers generated {out.shape[1] - ids.shape[1]} tokens, expected {m}")
    return len(batch) * m


def batches(requests: list[BenchRequest], size: int) -> list[list[BenchRequest]]:
    return [requests[i:i + size] for i in range(0, len(requests), size)]


def load_hf(path: str, device: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    model.generation_config.eos_token_id = None  # with min_new_tokens = max_new_tokens EOS cannot stop anyway
    return model


def make_engine(path: str, device: str, requests: list[BenchRequest], adapter_dir: str | None = None, **options):
    """An LLMEngine sized for ``requests``: every one admitted at once, KV for all (no preemption)."""
    from aspen.model.config import ModelConfig
    from engine.llm_engine import LLMEngine

    block = 16
    blocks = sum(-(-(len(r.prompt) + r.max_new_tokens) // block) for r in requests) + 8
    blocks = max(blocks, -(-ModelConfig.from_dir(path).max_position_embeddings // block))  # engine minimum
    opts = {"max_num_seqs": len(requests), "num_kv_blocks": blocks, "block_size": block,
            "enable_prefix_caching": False}
    opts.update(options)
    return LLMEngine(model=path, adapter_dir=adapter_dir, device=device, progress=False, **opts)


def engine_generate(llm, requests: list[BenchRequest], adapter_ids: list[str] | None = None) -> None:
    from engine.scheduling.sampling_params import SamplingParams

    params = [SamplingParams(max_new_tokens=r.max_new_tokens, temperature=0.0, ignore_eos=True) for r in requests]
    adapters = [adapter_ids[r.adapter] if adapter_ids and r.adapter >= 0 else None for r in requests]
    outs = llm.generate([r.prompt for r in requests], params, adapters)
    got = [len(o.token_ids) for o in outs]
    if got != [r.max_new_tokens for r in requests]:
        raise RuntimeError("the engine did not generate the requested lengths")


def timed(fn, device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def common_args(description: str, batch_size: int = 32) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--tiny", action="store_true", help="the tiny model and a few short requests (smoke test)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--requests", type=int, default=None, help="number of requests (default 64; tiny 8)")
    ap.add_argument("--batch-size", type=int, default=None, help=f"HF batch size (default {batch_size}; tiny 4)")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs of each system (default 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    return ap


def workload_from_args(args, num_adapters: int = 0) -> tuple[str, list[BenchRequest], int]:
    """(model path, requests, HF batch size) for --tiny or the 125M configuration."""
    shape = "tiny" if args.tiny else "125m"
    path = bench_model(shape)
    from aspen.model.config import ModelConfig

    vocab = ModelConfig.from_dir(path).vocab_size
    if args.tiny:
        reqs = make_requests(args.requests or 8, vocab, args.seed, (8, 16), (4, 12), num_adapters)
        return path, reqs, args.batch_size or 4
    return path, make_requests(args.requests or 64, vocab, args.seed, num_adapters=num_adapters), args.batch_size or 32


def machine() -> dict:
    return {"torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "loadavg_1m": round(os.getloadavg()[0], 2)}


def main(argv: list[str] | None = None) -> dict:
    args = common_args(__doc__.splitlines()[0]).parse_args(argv)
    path, reqs, bs = workload_from_args(args)
    pad = 3
    hf = load_hf(path, args.device)
    llm = make_engine(path, args.device, reqs)
    warm = reqs[:2]
    engine_generate(llm, [BenchRequest(r.prompt, 4, -1) for r in warm])
    hf_generate(hf, [BenchRequest(r.prompt, 4, -1) for r in warm], pad, args.device)
    load0 = machine()
    t_ours, t_hf, computed = [], [], 0
    for _ in range(args.repeats):
        t_ours.append(timed(lambda: engine_generate(llm, reqs), args.device))
        computed = 0

        def run_hf() -> None:
            nonlocal computed
            for b in batches(reqs, bs):
                computed += hf_generate(hf, b, pad, args.device)

        t_hf.append(timed(run_hf, args.device))
    report = ReportFile("vs_transformers", args.out)
    tokens = useful_tokens(reqs)
    report.measured({
        "shape": "tiny" if args.tiny else "125m", "device": device_name(args.device),
        "requests": len(reqs), "hf_batch_size": bs, "useful_tokens": tokens, "hf_computed_tokens": computed,
        "repeats": args.repeats, "engine_seconds": [round(t, 3) for t in t_ours],
        "transformers_seconds": [round(t, 3) for t in t_hf],
        "machine_before": load0, "machine_after": machine(),
    })
    with report.guarded():
        ours, theirs = tokens / best(t_ours), tokens / best(t_hf)
        ratio = ours / theirs
        figures = {
            "engine_tok_s": round(ours, 2), "transformers_tok_s": round(theirs, 2),
            "engine_tok_s_median": round(tokens / median(t_ours), 2),
            "transformers_tok_s_median": round(tokens / median(t_hf), 2),
            "speedup": round(ratio, 3), "target": ">= 1.2", "meets_target": ratio >= 1.2,
        }
    return report.complete(figures)


if __name__ == "__main__":
    main()
