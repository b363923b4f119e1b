"""Fused training of 4 LoRA adapters (``aspen.train``) vs PEFT training the same 4 one after another.

Same base (the 12-layer hidden-768 Llama shape, or ``--tiny``), same data, same per-adapter data order and
micro-batches, same LoRA setup (rank 16 on all seven projections, dropout 0.05, AdamW). Every run is its own
subprocess, so its peak RSS (``resource.getrusage``) is its own: the fused run is compared with the sum of the
four PEFT processes (what running them side by side would take). Targets: tokens/s >= 1.3x the PEFT
runs back to back, peak memory <= 0.5x the four PEFT processes.

    python -m benchmarks.train_fused [--tiny] [--out report.json]

Every system runs ``--rounds`` times (alternating fused, peft 0..3, fused, ...); the fastest run of each counts,
with the highest peak memory any of its runs reached. Tokens are the real (unpadded) tokens of the training sequences; PEFT right-pads each micro-batch, ours packs
it flat. Wall time covers the training loop and saving the adapters, not loading the base.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

from benchmarks.common import ReportFile, bench_home, bench_model, device_name
from benchmarks.extras import require, run_as_script

ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_data(path: str, n: int) -> str:
    """Prompt/completion records cut from the demo corpus' stories: first sentence -> the rest."""
    from aspen.demo.corpus import make_documents

    if os.path.isfile(path):
        return path
    stories = [d for d in make_documents(seed=0, num_sentences=4 * n) if not d.startswith(("Question", "Instr"))]
    records = []
    for story in stories[:n]:
        head, _, rest = story.partition(". ")
        records.append({"prompt": head + ".", "completion": " " + rest})
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(records, f)
    return path


def adapter_specs(args: argparse.Namespace, data: str) -> list[dict]:
    return [{"name": f"a{i}", "data": data, "r": args.rank, "alpha": 2 * args.rank, "dropout": 0.05,
             "target_modules": ALL7, "lr": 1e-4, "batch_size": args.batch_size,
             "micro_batch_size": args.micro_batch_size, "max_steps": args.steps, "cutoff_len": args.cutoff_len,
             "seed": i} for i in range(args.adapters)]


def plan(spec: dict, tokenizer) -> tuple[list, list[list[list[int]]]]:
    """The examples of one adapter and its micro-batches (indices), exactly as the trainer will see them."""
    from aspen.train.config import AdapterConfig
    from aspen.train.data import DataStream, load_dataset

    cfg = AdapterConfig(**{**spec, "target_modules": tuple(spec["target_modules"])})
    train, _ = load_dataset(cfg, tokenizer)
    stream = DataStream(len(train), cfg.batch_size, cfg.micro_batch_size, cfg.seed)
    return train, [stream.next_batch() for _ in range(cfg.max_steps)]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def worker_fused(args: argparse.Namespace, model_path: str, data: str, out: str) -> dict:
    import aspen
    from aspen.train.config import parse_config
    from aspen.train.trainer import Trainer

    lm = aspen.load_model(model_path, device=args.device, progress=False)
    specs = adapter_specs(args, data)
    tokens = 0
    for spec in specs:
        train, steps = plan(spec, lm.tokenizer)
        tokens += sum(len(train[i].ids) for batch in steps for mb in batch for i in mb)
    trainer = Trainer(lm, parse_config({"output_dir": out, "adapters": specs}), progress=False)
    t0 = time.perf_counter()
    trainer.train()
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "tokens": tokens, "final_loss": [t.train_curve[-1][1] for t in trainer.trainees]}


def worker_peft(args: argparse.Namespace, model_path: str, data: str, out: str, index: int) -> dict:
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from aspen.train.data import IGNORE

    tok = AutoTokenizer.from_pretrained(model_path)
    spec = adapter_specs(args, data)[index]
    train, steps = plan(spec, tok)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).to(args.device)
    model = get_peft_model(model, LoraConfig(r=spec["r"], lora_alpha=spec["alpha"], lora_dropout=spec["dropout"],
                                             target_modules=ALL7))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=spec["lr"])
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    tokens, losses = 0, []
    t0 = time.perf_counter()
    for batch in steps:
        denom = sum(train[i].num_targets for mb in batch for i in mb)
        total = 0.0
        for mb in batch:
            exs = [train[i] for i in mb]
            n = max(len(e.ids) for e in exs)
            ids = torch.tensor([list(e.ids) + [pad] * (n - len(e.ids)) for e in exs], device=args.device)
            mask = torch.tensor([[1] * len(e.ids) + [0] * (n - len(e.ids)) for e in exs], device=args.device)
            labels = torch.tensor([[IGNORE] * e.n_prompt + list(e.ids[e.n_prompt:]) + [IGNORE] * (n - len(e.ids))
                                   for e in exs], device=args.device)
            logits = model(input_ids=ids, attention_mask=mask).logits
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                   ignore_index=IGNORE, reduction="sum") / denom
            loss.backward()
            total += loss.item()
            tokens += sum(len(e.ids) for e in exs)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
    model.save_pretrained(os.path.join(out, spec["name"]))
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    return {"seconds": time.perf_counter() - t0, "tokens": tokens, "final_loss": losses[-1]}


def run_worker(argv: list[str], role: str) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.train_fused", *argv, "--worker", role]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run(cmd, cwd=root, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"worker {role} failed ({res.returncode}):\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def best_run(runs: list[dict]) -> dict:
    """The fastest of a role's runs, with the highest peak memory seen in any of them."""
    best = dict(min(runs, key=lambda r: r["seconds"]))
    for key in ("peak_rss_mb", "peak_gpu_mb"):
        if key in best:
            best[key] = max(r[key] for r in runs)
    best["seconds_all_rounds"] = [r["seconds"] for r in runs]
    return best


def main(argv: list[str] | None = None) -> dict | None:
    require("train_fused")  # before anything is built
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="a quick run on the tiny model shape")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per adapter")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--micro-batch-size", type=int, default=4)
    ap.add_argument("--cutoff-len", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2, help="run every system this many times, alternating; "
                    "report each one's fastest run")
    ap.add_argument("--threads", type=int, default=None, help="torch threads in every worker (default: torch's)")
    ap.add_argument("--out", default=None, help="write the JSON report here")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = "tiny" if args.tiny else "125m"
    work = os.path.join(bench_home(), f"train-fused-{shape}")
    data = make_data(os.path.join(bench_home(), "train-fused-data.json"), 256)
    model_path = bench_model(shape)

    if args.worker:  # inside a subprocess: one run, one JSON line on stdout
        out = os.path.join(work, args.worker.replace(":", "-"))
        cuda = args.device.startswith("cuda")
        if args.worker == "fused":
            result = worker_fused(args, model_path, data, out)
        else:
            result = worker_peft(args, model_path, data, out, int(args.worker.split(":")[1]))
        result.update(peak_rss_mb=peak_rss_mb(), threads=torch.get_num_threads())
        if cuda:  # on a GPU the memory that matters is the device's
            result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
        print(json.dumps(result))
        return None

    argv = [a for a in argv if not a.startswith("--out") and a != (args.out or "")]
    roles = ["fused"] + [f"peft:{i}" for i in range(args.adapters)]
    runs: dict[str, list[dict]] = {role: [] for role in roles}
    for _ in range(args.rounds):  # rounds alternate the systems, so machine noise hits both alike
        for role in roles:
            runs[role].append(run_worker(argv, role))
    report = ReportFile("train_fused", args.out)
    report.measured({
        "shape": shape, "device": device_name(args.device),
        "command": "python -m benchmarks.train_fused " + " ".join(argv),
        "setup": {"rounds": args.rounds, "adapters": args.adapters, "rank": args.rank, "targets": ALL7, "dropout": 0.05,
                  "optimizer_steps_per_adapter": args.steps, "batch_size": args.batch_size,
                  "micro_batch_size": args.micro_batch_size, "cutoff_len": args.cutoff_len},
        "all_runs": runs,
    })
    with report.guarded():
        fused, *peft = [best_run(runs[role]) for role in roles]
        peft_seconds = sum(p["seconds"] for p in peft)
        peft_tokens = sum(p["tokens"] for p in peft)
        fused_tps = fused["tokens"] / fused["seconds"]
        peft_tps = peft_tokens / peft_seconds
        mem_key = "peak_gpu_mb" if args.device.startswith("cuda") else "peak_rss_mb"
        peft_mem = sum(p[mem_key] for p in peft)
        figures = {
            "fused": {**fused, "tokens_per_s": fused_tps},
            "peft_sequential": {"runs": peft, "seconds": peft_seconds, "tokens": peft_tokens,
                                "tokens_per_s": peft_tps, f"{mem_key}_sum_of_{args.adapters}_processes": peft_mem},
            "tokens_per_s_ratio": fused_tps / peft_tps,
            "peak_memory_ratio": fused[mem_key] / peft_mem, "memory_measure": mem_key,
            "targets": {"tokens_per_s_ratio": ">= 1.3", "peak_memory_ratio": "<= 0.5"},
        }
    return report.complete(figures)


if __name__ == "__main__":
    run_as_script("train_fused", main)
