"""Structured output: decode throughput with half the rows constrained by JSON Schemas vs no row constrained
(target: tokens/s ratio >= 0.90), and grammar compile time p50 / p99 over a set of realistic schemas.

    python -m benchmarks.structured [--tiny] [--device cpu|cuda] [--repeats 3] [--batch 16] [--output-len 64]
                                    [--out report.json]

The model is the 125M bench model with a 32,000-token byte-level BPE tokenizer trained here on the Python
standard library's sources (the bench model's own tokenizer has only 320 tokens, and the grammar engine's mask
cost grows with the tokenizer), made once under ``$ASPEN_HOME/bench``.

Throughput: ``--batch`` requests with random 32-token prompts, ``--output-len`` new tokens each, sampled at
temperature 1 with per-request seeds, in two engines on the same model: in one, every second request has a
response format (a JSON array of at least ``output-len`` records of one of the realistic schemas, so no
constrained row can complete and every run decodes exactly ``batch x output-len`` tokens); in the other the same
requests have none (and ignore EOS, as the free half of the constrained engine does). The two engines' steps
alternate, one step each, the order flipping every step, so load from elsewhere on a shared machine hits both
alike; the figure is the median over decode steps of (free step time / constrained step time), i.e. the
constrained engine's tokens/s over the free one's, after one warm-up run. The time the constrained engine spends
computing and applying masks (``Sampler._apply_formats``) is reported per step and per constrained row.

Grammar engines (``--compare-engines``, which needs ``xgrammar`` installed beside ``llguidance``): the measurements
behind the choice of llguidance (:mod:`engine.structured`), on the same tokenizer: compile time of the realistic
schemas and of two hard cases, mean / p99 time of one next-token mask along random walks through each schema, and
the JSON Schema keywords each refuses or accepts without enforcing them (:func:`compare_engines`).

Compile time: each realistic schema in ``--variants`` variants (a different ``description`` each, so every
compile misses the cache) through a fresh :class:`~engine.structured.compiler.GrammarCompiler` on the same
tokenizer, timed at ``GrammarCompiler.matcher`` (the compile plus the first mask, as ``add_request`` pays it);
the tokenizer's one-off preparation and a cache hit are reported separately.
"""
from __future__ import annotations

import copy
import glob
import json
import os
import statistics
import sys
import time

from benchmarks.common import ReportFile, bench_home, bench_model, best, device_name, median

TOKENIZER_VOCAB = 32_000

_STR = {"type": "string"}
_INT = {"type": "integer"}
SCHEMAS: dict[str, dict] = {
    "person": {"type": "object", "properties": {"name": _STR, "age": {"type": "integer", "minimum": 0,
                                                                      "maximum": 150},
                                                "email": {"type": "string", "format": "email"}},
               "required": ["name", "age"], "additionalProperties": False},
    "product": {"type": "object", "properties": {
        "id": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"}, "price": {"type": "number", "minimum": 0},
        "tags": {"type": "array", "items": _STR, "maxItems": 5}, "status": {"enum": ["active", "discontinued",
                                                                                     "draft"]}},
        "required": ["id", "price", "status"], "additionalProperties": False},
    "address": {"type": "object", "$defs": {"addr": {"type": "object", "properties": {
        "street": _STR, "city": _STR, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
        "required": ["street", "city", "zip"], "additionalProperties": False}},
        "properties": {"home": {"$ref": "#/$defs/addr"}, "work": {"$ref": "#/$defs/addr"}},
        "required": ["home"], "additionalProperties": False},
    "tool_call": {"type": "object", "properties": {"name": {"const": "get_weather"}, "arguments": {
        "type": "object", "properties": {"location": _STR, "unit": {"enum": ["celsius", "fahrenheit"]},
                                         "days": {"type": "integer", "minimum": 1, "maximum": 14}},
        "required": ["location"], "additionalProperties": False}}, "required": ["name", "arguments"],
        "additionalProperties": False},
    "event": {"type": "object", "properties": {
        "title": {"type": "string", "minLength": 1}, "start": {"type": "string", "format": "date-time"},
        "attendees": {"type": "array", "items": {"type": "object", "properties": {
            "name": _STR, "rsvp": {"type": "boolean"}}, "required": ["name", "rsvp"],
            "additionalProperties": False}, "minItems": 1, "maxItems": 4}},
        "required": ["title", "start", "attendees"], "additionalProperties": False},
    "classification": {"type": "object", "properties": {
        "label": {"enum": ["positive", "negative", "neutral"]},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1}},
        "required": ["label", "confidence"], "additionalProperties": False},
    "shape": {"type": "object", "properties": {"shape": {"anyOf": [
        {"type": "object", "properties": {"kind": {"const": "circle"}, "r": {"type": "number"}},
         "required": ["kind", "r"], "additionalProperties": False},
        {"type": "object", "properties": {"kind": {"const": "rect"}, "w": {"type": "number"},
                                          "h": {"type": "number"}},
         "required": ["kind", "w", "h"], "additionalProperties": False}]}},
        "required": ["shape"], "additionalProperties": False},
    "tree": {"$defs": {"node": {"type": "object", "properties": {
        "value": _INT, "children": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 3}},
        "required": ["value"], "additionalProperties": False}}, "$ref": "#/$defs/node"},
    "invoice": {"type": "object", "properties": {
        "number": {"type": "string", "pattern": "^INV-[0-9]{6}$"}, "date": {"type": "string", "format": "date"},
        "currency": {"enum": ["USD", "EUR", "GBP", "JPY"]}, "lines": {"type": "array", "items": {
            "type": "object", "properties": {"sku": _STR, "qty": {"type": "integer", "minimum": 1},
                                             "unit_price": {"type": "number"}},
            "required": ["sku", "qty", "unit_price"], "additionalProperties": False}, "minItems": 1},
        "notes": {"type": ["string", "null"]}},
        "required": ["number", "date", "currency", "lines"], "additionalProperties": False},
    "extraction": {"type": "object", "properties": {
        "entities": {"type": "array", "items": {"type": "object", "properties": {
            "text": _STR, "type": {"enum": ["PERSON", "ORG", "LOC", "DATE", "MONEY"]},
            "start": {"type": "integer", "minimum": 0}, "end": {"type": "integer", "minimum": 0}},
            "required": ["text", "type"], "additionalProperties": False}},
        "language": {"type": "string", "pattern": "^[a-z]{2}$"}},
        "required": ["entities"], "additionalProperties": False},
    "review": {"type": "object", "properties": {
        "rating": {"type": "integer", "minimum": 1, "maximum": 5}, "summary": {"type": "string", "maxLength": 200},
        "pros": {"type": "array", "items": _STR}, "cons": {"type": "array", "items": _STR},
        "recommend": {"type": "boolean"}}, "required": ["rating", "summary", "recommend"],
        "additionalProperties": False},
    "sql_query": {"type": "object", "properties": {
        "table": {"enum": ["users", "orders", "products", "payments"]},
        "columns": {"type": "array", "items": _STR, "minItems": 1},
        "where": {"type": "array", "items": {"type": "object", "properties": {
            "column": _STR, "op": {"enum": ["=", "!=", "<", ">", "<=", ">=", "LIKE"]},
            "value": {"type": ["string", "number", "boolean", "null"]}},
            "required": ["column", "op", "value"], "additionalProperties": False}},
        "limit": {"type": "integer", "minimum": 1, "maximum": 1000}},
        "required": ["table", "columns"], "additionalProperties": False},
}


def tokenizer_corpus() -> list[str]:
    """The Python standard library's sources, in a fixed order (what the 32k tokenizer is trained on)."""
    root = os.path.dirname(os.__file__)
    texts = []
    for path in sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True))[:3000]:
        with open(path, encoding="utf-8", errors="ignore") as f:
            texts.append(f.read())
    return texts


def bench_model_32k() -> str:
    """The 125M bench model with a 32k-token byte-level BPE tokenizer (made once: weights linked, not copied)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    path = os.path.join(bench_home(), "llama-125m-tok32k")
    if os.path.isfile(os.path.join(path, "tokenizer.json")):
        return path
    base = bench_model("125m")
    tmp = path + ".tmp"
    os.makedirs(tmp, exist_ok=True)
    for name in os.listdir(base):
        if not name.startswith(("tokenizer", "special_tokens")) and not os.path.exists(os.path.join(tmp, name)):
            os.symlink(os.path.join(base, name), os.path.join(tmp, name))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(tokenizer_corpus(), trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(tmp)
    os.replace(tmp, path)
    return path


def list_format(name: str, min_items: int):
    """A JSON array of at least ``min_items`` records of schema ``name`` (never complete within the run)."""
    from engine.scheduling.response_format import ResponseFormat

    items = dict(SCHEMAS[name])
    defs = items.pop("$defs", None)  # "#/$defs/..." pointers resolve against the root: the definitions move up
    wrapper = {"type": "array", "items": items, "minItems": min_items}
    return ResponseFormat.json_schema({**wrapper, "$defs": defs} if defs else wrapper)


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def compile_times(tokenizer, vocab: int, eos: list[int], variants: int) -> dict:
    from engine.scheduling.response_format import ResponseFormat
    from engine.structured.compiler import GrammarCompiler

    comp = GrammarCompiler(tokenizer, vocab, eos, cache_size=10_000, timeout_s=60)
    t0 = time.perf_counter()
    comp.matcher(ResponseFormat.regex("x"))  # the tokenizer's one-off preparation
    prepare = time.perf_counter() - t0
    times: dict[str, list[float]] = {}
    for v in range(variants):
        for name, schema in SCHEMAS.items():
            varied = copy.deepcopy(schema)
            varied["description"] = f"{name} variant {v}"
            fmt = ResponseFormat.json_schema(varied)
            t0 = time.perf_counter()
            comp.matcher(fmt)
            times.setdefault(name, []).append(time.perf_counter() - t0)
    hits = []
    for name, schema in SCHEMAS.items():
        fmt = ResponseFormat.json_schema({**schema, "description": f"{name} variant 0"})
        t0 = time.perf_counter()
        comp.matcher(fmt)
        hits.append(time.perf_counter() - t0)
    everything = [t for ts in times.values() for t in ts]
    ms = 1e3
    return {"compiles": len(everything), "schemas": len(SCHEMAS), "variants": variants,
            "tokenizer_prepare_ms": round(prepare * ms, 1),
            "compile_ms_p50": round(pct(everything, 0.5) * ms, 3),
            "compile_ms_p99": round(pct(everything, 0.99) * ms, 3),
            "compile_ms_max": round(max(everything) * ms, 3),
            "compile_ms_p50_by_schema": {k: round(statistics.median(v) * ms, 3) for k, v in times.items()},
            "cache_hit_ms_p50": round(pct(hits, 0.5) * ms, 4), "refused": comp.stats().refused}


# keyword -> (a schema using it, a JSON text that violates it): an engine that compiles the schema and lets the
# text through does not enforce the keyword
KEYWORD_CASES = {
    "not": ({"not": {"type": "string"}}, '"x"'),
    "uniqueItems": ({"type": "array", "items": _INT, "uniqueItems": True}, "[1,1]"),
    "if/then": ({"if": {"properties": {"a": {"const": 1}}}, "then": {"required": ["b"]}}, '{"a":1}'),
    "dependentRequired": ({"type": "object", "properties": {"a": _INT, "b": _INT},
                           "dependentRequired": {"a": ["b"]}}, '{"a":1}'),
    "contains": ({"type": "array", "contains": {"const": 3}}, "[1]"),
    "propertyNames": ({"type": "object", "propertyNames": {"pattern": "^[a-z]+$"}}, '{"A1":1}'),
    "multipleOf": ({"type": "integer", "multipleOf": 5}, "7"),
}
HARD = {"enum_10k": {"enum": [f"value_{i}_xyz" for i in range(10_000)]},
        "email_string": {"type": "string", "format": "email"}}


def _engine_api(name: str, tokenizer, vocab: int):
    """(compile(schema) -> grammar, walker(grammar), allowed() -> the ids the last fill allows) of one engine; a
    walker is (fill(), accept(token) -> bool, done() -> nothing may follow, complete() -> the text so far is a whole
    value)."""
    import torch

    row = torch.zeros((vocab + 31) // 32, dtype=torch.int32)

    def allowed() -> list[int]:
        bits = row.numpy().view("uint8")
        return [t for t in range(vocab) if bits[t >> 3] >> (t & 7) & 1]

    if name == "xgrammar":
        import xgrammar as xgr

        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)
        comp = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        mask = row.view(1, -1)

        def walker(g):
            m = xgr.GrammarMatcher(g)
            return (lambda: m.fill_next_token_bitmask(mask, 0)), m.accept_token, m.is_terminated, m.is_completed

        return (lambda s: comp.compile_json_schema(json.dumps(s))), walker, allowed
    import llguidance.hf
    from llguidance import LLMatcher

    info = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)

    def compile_(s):
        g = LLMatcher.grammar_from_json_schema(s, defaults={"whitespace_flexible": False})
        m = LLMatcher(info, g, log_level=0)
        if m.is_error():
            raise ValueError(m.get_error())
        return g

    def walker(g):
        m = LLMatcher(info, g, log_level=0)
        return ((lambda: m.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * 4)), m.consume_token, m.is_stopped,
                m.is_accepting)

    return compile_, walker, allowed


def compare_engines(tokenizer, vocab: int, steps: int = 60) -> dict:
    """Per grammar engine installed: compile and mask times on ``tokenizer`` and JSON Schema keyword handling."""
    import importlib.metadata
    import importlib.util
    import random

    out = {}
    for name in ("llguidance", "xgrammar"):
        if importlib.util.find_spec(name) is None:
            out[name] = "not installed"
            continue
        t0 = time.perf_counter()
        compile_, walker, allowed = _engine_api(name, tokenizer, vocab)
        prepare = time.perf_counter() - t0
        times, masks, rng = {}, [], random.Random(0)
        for key, schema in SCHEMAS.items():
            t0 = time.perf_counter()
            grammar = compile_(schema)
            times[key] = time.perf_counter() - t0
            fill, accept, done, _ = walker(grammar)
            for _ in range(steps):
                t0 = time.perf_counter()
                fill()
                masks.append(time.perf_counter() - t0)
                ok = allowed()
                if not ok or done() or not accept(rng.choice(ok)) or done():
                    break
        hard = {}
        for key, schema in HARD.items():
            t0 = time.perf_counter()
            compile_(schema)
            hard[key] = round((time.perf_counter() - t0) * 1e3, 1)
        refused, ignored = [], []
        for key, (schema, invalid) in KEYWORD_CASES.items():
            try:
                _, accept, _, complete = walker(compile_(schema))
            except Exception:  # noqa: BLE001 -- a refusal is the answer being measured
                refused.append(key)
                continue
            if all(accept(t) for t in tokenizer(invalid, add_special_tokens=False).input_ids) and complete():
                ignored.append(key)
        out[name] = {"version": importlib.metadata.version(name), "tokenizer_prepare_ms": round(prepare * 1e3, 1),
                     "compile_ms_p50": round(pct(list(times.values()), 0.5) * 1e3, 2),
                     "compile_ms_by_schema": {k: round(v * 1e3, 2) for k, v in times.items()},
                     "hard_compile_ms": hard, "mask_us_mean": round(statistics.mean(masks) * 1e6, 1),
                     "mask_us_p99": round(pct(masks, 0.99) * 1e6, 1), "masks": len(masks),
                     "keywords_refused": refused, "keywords_accepted_not_enforced": ignored}
    return out


def main(argv: list[str] | None = None) -> dict:
    import argparse

    import torch

    from benchmarks.vs_transformers import machine, make_engine, make_requests, sync
    from engine.sampler import Sampler
    from engine.scheduling.sampling_params import SamplingParams

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="the tiny model and its 320-token tokenizer (smoke test)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each configuration (default 3)")
    ap.add_argument("--batch", type=int, default=None, help="requests per run (default 16; tiny 4)")
    ap.add_argument("--output-len", type=int, default=None, help="new tokens per request (default 64; tiny 8)")
    ap.add_argument("--variants", type=int, default=None, help="compiles per schema (default 20; tiny 2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compare-engines", action="store_true", help="only compare the grammar engines installed")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    shape = "tiny" if args.tiny else "125m"
    batch = args.batch or (4 if args.tiny else 16)
    out_len = args.output_len or (8 if args.tiny else 64)
    variants = args.variants or (2 if args.tiny else 20)
    path = bench_model("tiny") if args.tiny else bench_model_32k()
    from aspen.model.config import ModelConfig

    vocab = ModelConfig.from_dir(path).vocab_size
    if args.compare_engines:
        from transformers import AutoTokenizer

        report = ReportFile("structured_engines", args.out)
        return report.complete({"shape": shape, "device": device_name("cpu"), "tokenizer_tokens": vocab,
                                "engines": compare_engines(AutoTokenizer.from_pretrained(path), vocab)})
    reqs = make_requests(batch, vocab, args.seed, (32, 32), (out_len, out_len))
    free_llm, half_llm = make_engine(path, args.device, reqs), make_engine(path, args.device, reqs)
    names = list(SCHEMAS)
    formats = {i: list_format(names[(i // 2) % len(names)], out_len) for i in range(1, batch, 2)}

    def params(i: int, constrained: bool) -> SamplingParams:
        if constrained and i in formats:
            return SamplingParams(max_new_tokens=out_len, temperature=1.0, seed=args.seed + i,
                                  response_format=formats[i])
        return SamplingParams(max_new_tokens=out_len, temperature=1.0, seed=args.seed + i, ignore_eos=True)

    runs = [(free_llm, [params(i, False) for i in range(batch)]), (half_llm, [params(i, True) for i in range(batch)])]
    grammar_s = [0.0]
    real_apply = Sampler._apply_formats

    def timed_apply(self, x, rows, states):
        t0 = time.perf_counter()
        real_apply(self, x, rows, states)
        grammar_s[0] += time.perf_counter() - t0

    def run_pair(rep: int) -> tuple[list[float], list[float]]:
        """Both engines' requests, their steps alternating (the order flips every step); per-step seconds."""
        times: tuple[list[float], list[float]] = ([], [])
        lengths: list[int] = []
        for llm, p in runs:
            for i, (r, sp) in enumerate(zip(reqs, p)):
                llm.add_request(r.prompt, sp, request_id=f"{rep}-{i}")
        k = 0
        while any(llm.has_work() for llm, _ in runs):
            for which in ((0, 1) if k % 2 == 0 else (1, 0)):
                llm = runs[which][0]
                if llm.has_work():
                    t0 = time.perf_counter()
                    outs = llm.step()
                    sync(args.device)
                    times[which].append(time.perf_counter() - t0)
                    lengths += [len(o.token_ids) for o in outs if o.finished]
            k += 1
        if lengths != [out_len] * (2 * batch) or len(times[0]) != len(times[1]):
            raise RuntimeError(f"expected {out_len} tokens per request and as many steps in both engines, got "
                               f"{lengths} and {len(times[0])} / {len(times[1])} steps")
        return times

    Sampler._apply_formats = timed_apply
    try:
        load0 = machine()
        run_pair(-1)  # warm-up
        grammar_s[0] = 0.0
        pairs = [run_pair(rep) for rep in range(args.repeats)]
    finally:
        Sampler._apply_formats = real_apply
    steps = args.repeats * out_len
    constrained_rows = len(formats)
    report = ReportFile("structured", args.out)
    report.measured({
        "shape": shape, "device": device_name(args.device), "tokenizer_tokens": len(half_llm.tokenizer),
        "vocab_size": vocab, "batch": batch, "constrained_rows": constrained_rows, "output_len": out_len,
        "tokens_per_run": batch * out_len, "repeats": args.repeats,
        "free_step_seconds": [[round(t, 5) for t in f] for f, _ in pairs],
        "half_constrained_step_seconds": [[round(t, 5) for t in h] for _, h in pairs],
        "grammar_seconds": round(grammar_s[0], 4),
        "python": sys.version.split()[0], "torch_threads": torch.get_num_threads(),
        "machine_before": load0, "machine_after": machine(),
    })
    with report.guarded():
        compile_report = compile_times(half_llm.tokenizer, vocab, list(half_llm.model.config.eos_token_ids),
                                       variants)
        report.measured({"compile": compile_report})
        # decode steps only: the first step of a run is the prefill (and the first token of every row)
        free_steps = [t for f, _ in pairs for t in f[1:]]
        half_steps = [t for _, h in pairs for t in h[1:]]
        step_ratios = [f / h for fs, hs in pairs for f, h in zip(fs[1:], hs[1:])]
        ratio = median(step_ratios)
        figures = {
            "decode_steps_timed": len(step_ratios),
            "free_run_seconds": [round(sum(f), 3) for f, _ in pairs],
            "half_constrained_run_seconds": [round(sum(h), 3) for _, h in pairs],
            "free_step_ms_median": round(median(free_steps) * 1e3, 2),
            "half_constrained_step_ms_median": round(median(half_steps) * 1e3, 2),
            "free_step_ms_best": round(best(free_steps) * 1e3, 2),
            "half_constrained_step_ms_best": round(best(half_steps) * 1e3, 2),
            "free_tok_s": round(batch / median(free_steps), 2),
            "half_constrained_tok_s": round(batch / median(half_steps), 2),
            "constrained_over_free_tok_s": round(ratio, 3),
            "step_ratio_p10_p90": [round(pct(step_ratios, 0.1), 3), round(pct(step_ratios, 0.9), 3)],
            "constrained_over_free_tok_s_of_medians": round(median(free_steps) / median(half_steps), 3),
            "grammar_ms_per_step": round(grammar_s[0] / steps * 1e3, 3),
            "grammar_us_per_constrained_row": round(grammar_s[0] / (steps * constrained_rows) * 1e6, 1),
            "target": ">= 0.90", "meets_target": ratio >= 0.90,
        }
    return report.complete(figures)


if __name__ == "__main__":
    main()
