"""Shared pieces of the benchmarks: locally made models (no hub), timing helpers, JSON reports."""
from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator

import torch

from clients.loadtest.report import write_json  # atomic: a reader never sees a half-written report

# The 12-layer, hidden-768 Llama-shaped model (about 125M parameters) the benchmarks measure on.
SHAPES = {
    "125m": {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 12,
                 "num_key_value_heads": 12, "vocab_size": 32000, "max_position_embeddings": 2048},
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                 "num_key_value_heads": 2, "vocab_size": 320, "max_position_embeddings": 512},
}


def bench_home() -> str:
    from aspen.demo import default_home

    return os.path.join(default_home(), "bench")


def bench_model(shape: str = "125m") -> str:
    """A random Llama-shaped checkpoint (saved once, then reused) with a small local tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from benchmarks.local_tokenizer import make_tokenizer

    path = os.path.join(bench_home(), f"llama-{shape}")
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        return path
    torch.manual_seed(0)
    config = LlamaConfig(bos_token_id=1, eos_token_id=2, pad_token_id=3, **SHAPES[shape])
    model = LlamaForCausalLM(config)
    tmp = path + ".tmp"
    model.save_pretrained(tmp, safe_serialization=True)
    make_tokenizer(tmp)
    os.replace(tmp, path)
    return path


def timed(fn: Callable[[], object], repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def interleaved(a: Callable[[], object], b: Callable[[], object], repeats: int, warmup: int = 1
                ) -> tuple[list[float], list[float]]:
    """Time a and b alternately (a, b, a, b, ...) so machine noise hits both alike."""
    for _ in range(warmup):
        a()
        b()
    ta, tb = [], []
    for _ in range(repeats):
        ta += timed(a, 1)
        tb += timed(b, 1)
    return ta, tb


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def best(xs: list[float]) -> float:
    """The fastest run: background load on a shared machine only ever adds time, so ratios of best runs are the
    steadiest comparison; reports give medians too."""
    return min(xs)


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()} CPU x{torch.get_num_threads()} threads"


#: Marks a report file that holds the measurements only (the step deriving the figures has not finished).
PARTIAL = "measurements only: the figures derived from them are not computed yet"


class ReportFile:
    """A benchmark's JSON report, on disk from the moment its measurements exist.

    :meth:`measured` writes the raw measurements (with ``"partial": PARTIAL``) as soon as they are taken (again
    as more are taken); :meth:`guarded` wraps what follows, the computation of the figures or a later stage of
    measurements, and when that fails says where the measurements are before the error propagates;
    :meth:`complete` adds the figures, rewrites the file without ``partial`` and prints the report. Every write is atomic. Without ``path`` (no ``--out``) the report goes to
    ``$ASPEN_HOME/bench/reports/NAME-<UTC time>.json``.
    """

    def __init__(self, benchmark: str, path: str | None) -> None:
        self.benchmark = benchmark
        self.path = path or os.path.join(bench_home(), "reports",
                                         f"{benchmark}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json")
        self.fields: dict = {"benchmark": benchmark}

    def measured(self, fields: dict) -> None:
        self.fields.update(fields)
        write_json(self.path, {**self.fields, "partial": PARTIAL})
        print(f"{self.benchmark}: measurements written to {self.path}", file=sys.stderr)

    @contextlib.contextmanager
    def guarded(self) -> Iterator[None]:
        try:
            yield
        except BaseException as e:
            print(f"{self.benchmark}: failed after its measurements were written to {self.path} "
                  f"({type(e).__name__}: {e})", file=sys.stderr)
            raise

    def complete(self, fields: dict) -> dict:
        """Add the derived ``fields``, write the whole report and print it; returns the report."""
        self.fields.update(fields)
        write_json(self.path, self.fields)
        print(json.dumps(self.fields, indent=2))
        return dict(self.fields)

