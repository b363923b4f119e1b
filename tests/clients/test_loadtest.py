"""The load tester: pure workload functions, a real bounded run against an in-process server on loopback, the
report files, error counting by status code, and synthetic adapters that PEFT and ASPEN both load."""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os

import numpy as np
import pytest
import torch

from aspen.lora.peft.synthetic import adapter_name, make_adapters, parse_ranks, parse_targets
from clients.loadtest.driver import (
    DriverConfig,
    LengthSpec,
    WorkloadConfig,
    adapter_indices,
    arrival_times,
    build_workload,
    drive,
    interarrival_gaps,
)
from clients.loadtest.report import format_table, summarize
from tests.helpers.server import ServerThread
from tests.helpers.tiny_models import hf_model, make_checkpoint

NUM_ON_DISK = 6
ENGINE = {"num_kv_blocks": 128, "block_size": 16, "max_num_seqs": 16}


# ---------------------------------------------------------------------------------------------- pure functions
def test_power_popularity_is_skewed_for_small_alpha_and_uniform_for_one():
    n, num = 200_000, 100
    rng = np.random.default_rng(0)
    skewed = np.bincount(adapter_indices(n, num, "power", 0.3, rng), minlength=num) / n
    flat = np.bincount(adapter_indices(n, num, "power", 1.0, rng), minlength=num) / n
    # P(index < 10) = P(X < 0.1) = 0.1 ** alpha
    assert skewed[:10].sum() == pytest.approx(0.1 ** 0.3, abs=0.01)
    assert flat[:10].sum() == pytest.approx(0.1, abs=0.01)
    assert skewed[0] > 10 * skewed[-1]  # monotone-ish decay toward high indices
    assert flat.max() / flat.min() < 1.2  # alpha = 1 is uniform
    assert np.all(np.diff(skewed[::10]) < 0)
    zipf = np.bincount(adapter_indices(n, num, "zipf", 1.0, rng), minlength=num)
    assert zipf.argmax() == 0 and zipf[0] / zipf[1] == pytest.approx(2.0, rel=0.05)
    uniform = np.bincount(adapter_indices(n, num, "uniform", 1.0, rng), minlength=num) / n
    assert uniform.max() / uniform.min() < 1.2
    for pop in ("uniform", "power", "zipf"):
        idx = adapter_indices(1000, 7, pop, 0.5, rng)
        assert idx.min() >= 0 and idx.max() <= 6
    with pytest.raises(ValueError):
        adapter_indices(10, 5, "lognormal", 1.0, rng)


@pytest.mark.parametrize("cv", [1.0, 0.5, 4.0])
def test_interarrival_gaps_have_the_asked_mean_and_cv(cv):
    rate = 5.0
    gaps = interarrival_gaps(400_000, rate, cv, np.random.default_rng(1))
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.05)
    times = arrival_times(5, rate, cv, np.random.default_rng(2))
    assert times[0] == 0 and np.all(np.diff(times) >= 0)
    assert np.all(arrival_times(4, math.inf, 1.0, np.random.default_rng(0)) == 0)


def test_length_specs():
    rng = np.random.default_rng(3)
    assert LengthSpec.parse("32") == LengthSpec(32, 32) and str(LengthSpec.parse("8:512")) == "8-512"
    assert set(LengthSpec.parse("32").sample(100, rng)) == {32}
    xs = LengthSpec.parse("8-512").sample(100_000, rng)
    assert xs.min() == 8 and xs.max() == 512 and xs.mean() == pytest.approx(260, rel=0.02)
    for bad in ("0", "9-3", "a-b"):
        with pytest.raises(ValueError):
            LengthSpec.parse(bad)


def test_workload_is_deterministic_across_rates_and_fits_the_context():
    base = {"num_requests": 50, "num_adapters": 20, "popularity": "power", "alpha": 0.3, "seed": 7,
            "input_len": LengthSpec(100, 300), "output_len": LengthSpec(8, 64)}
    a = build_workload(WorkloadConfig(rate=1.0, **base), vocab_size=320, max_context=256)
    b = build_workload(WorkloadConfig(rate=8.0, **base), vocab_size=320, max_context=256)
    assert [(s.adapter, s.prompt, s.max_new_tokens) for s in a] == [(s.adapter, s.prompt, s.max_new_tokens)
                                                                   for s in b]
    assert a[-1].arrival > b[-1].arrival > 0
    assert all(s.prompt_len + s.max_new_tokens <= 256 and 4 <= min(s.prompt) and max(s.prompt) < 320 for s in a)
    assert all(s.adapter.startswith("adapter-00") for s in a)
    base_only = build_workload(WorkloadConfig(num_requests=3), vocab_size=320)
    assert all(s.adapter is None and s.prompt_len == 32 for s in base_only)


def test_prompt_file(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "hello there", "output_len": 5}\n\n{"token_ids": [5, 6, 7]}\n')
    specs = build_workload(WorkloadConfig(num_requests=3, prompt_file=str(path), output_len=LengthSpec(9, 9)), 320)
    assert [s.prompt for s in specs] == ["hello there", [5, 6, 7], "hello there"]
    assert [s.max_new_tokens for s in specs] == [5, 9, 5]


# ---------------------------------------------------------------------------------------------- synthetic adapters
def test_make_adapters_writes_loadable_peft_dirs(tmp_path):
    from peft import PeftModel

    from aspen.lora.peft.reader import load_peft_adapter
    from aspen.model.config import ModelConfig

    base = make_checkpoint(str(tmp_path / "base"), "llama")
    ids = make_adapters(base, str(tmp_path / "ads"), 3, rank="4,8", targets="attn", progress=False)
    assert ids == [adapter_name(i) for i in range(3)] == ["adapter-0000", "adapter-0001", "adapter-0002"]
    assert WorkloadConfig(num_adapters=3).adapter_names() == ids  # the load tester's own naming agrees
    cfg = ModelConfig.from_dir(base)
    loaded = [load_peft_adapter(str(tmp_path / "ads" / i), cfg) for i in ids]
    assert [a.max_rank for a in loaded] == [4, 8, 4]
    assert loaded[0].target_modules == tuple(sorted(parse_targets("attn")))
    again = make_adapters(base, str(tmp_path / "ads"), 3, rank="4,8", targets="attn", progress=False)
    assert again == ids  # kept, not rewritten
    model = PeftModel.from_pretrained(hf_model(base), str(tmp_path / "ads" / ids[1]))
    ids_in = torch.tensor([[5, 6, 7, 8]])
    with torch.inference_mode():
        with_lora = model(ids_in).logits
        with model.disable_adapter():
            plain = model(ids_in).logits
    assert (with_lora - plain).abs().max() > 1e-3
    assert parse_ranks("8,16") == (8, 16) and parse_targets("q_proj,v_proj") == ("q_proj", "v_proj")
    with pytest.raises(ValueError):
        parse_targets("nope")


# ---------------------------------------------------------------------------------------------- against a server
@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("loadtest")
    base = make_checkpoint(str(root / "base"), "llama", max_position_embeddings=256)
    make_adapters(base, str(root / "adapters"), NUM_ON_DISK, rank=4, targets="all", progress=False)
    s = ServerThread({"base": base, "adapters": str(root / "adapters")}, engine=ENGINE, http=True)
    yield s
    s.stop()


def _args(address: str, out_dir: str, **kw) -> argparse.Namespace:
    from aspen.cli import build_parser

    argv = ["loadtest", "run", "--server", address, "--out-dir", out_dir, "--no-progress", "--timeout", "60"]
    for k, v in kw.items():
        argv += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
    return build_parser().parse_args(argv)


def test_open_loop_sweep_counts_missing_adapters_as_not_found(served, tmp_path, capsys):
    from clients.loadtest.command import run

    num_adapters = NUM_ON_DISK + 2  # adapter-0006 and adapter-0007 do not exist: NOT_FOUND
    args = _args(served.address, str(tmp_path / "out"), num_adapters=num_adapters, popularity="power", alpha=0.5,
                 rates="10,40", num_requests=20, input_len="4-24", output_len="2-8", slo_ttft=30, slo_tpot=10,
                 seed=3)
    assert run(args) == 0
    table = capsys.readouterr().out
    assert "rate=10" in table and "rate=40" in table and "TTFT p99" in table
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    for name in ("latency_cdf.png", "sweep.png"):
        data = (tmp_path / "out" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    specs = build_workload(WorkloadConfig(num_requests=20, num_adapters=num_adapters, popularity="power", alpha=0.5,
                                          seed=3), 320)
    missing = sum(int(s.adapter[-4:]) >= NUM_ON_DISK for s in specs)
    assert missing > 0
    assert [r["summary"]["label"] for r in report["runs"]] == ["rate=10", "rate=40"]
    for entry in report["runs"]:
        s = entry["summary"]
        assert s["sent"] == 20 and s["errors"] == {"NOT_FOUND": missing} and s["ok"] == 20 - missing
        assert s["slo"]["attainment"] == pytest.approx((20 - missing) / 20)
        assert s["output_token_throughput"] > 0 and s["request_throughput"] > 0
        assert 0 < s["ttft"]["p50"] <= s["ttft"]["p99"] <= s["e2e"]["max"]
        ok = [r for r in entry["requests"] if r["code"] == "OK"]
        assert all(r["output_tokens"] == r["max_new_tokens"] for r in ok)  # ignore_eos: exact lengths
        assert all(r["prompt_tokens"] == r["prompt_len"] for r in ok)
        assert {"ttft", "tpot", "e2e", "adapter", "code"} <= set(entry["requests"][0])
    assert report["config"]["workload"]["popularity"] == "power"


def test_closed_loop_and_unary(served):
    specs = build_workload(WorkloadConfig(num_requests=8, num_adapters=NUM_ON_DISK, output_len=LengthSpec(3, 3),
                                          input_len=LengthSpec(8, 8)), 320)
    cfg = DriverConfig(address=served.address, mode="closed", concurrency=3, progress=False, timeout_s=60)
    run = asyncio.run(drive(specs, cfg, "closed"))
    assert [r.index for r in run.results] == list(range(8)) and all(r.ok for r in run.results)
    assert all(r.output_tokens == 3 and r.tpot is not None for r in run.results)
    s = summarize(run)
    assert s["offered_rate"] is None and s["ok"] == 8 and s["output_tokens"] == 24
    unary = asyncio.run(drive(specs[:3], DriverConfig(address=served.address, stream=False, progress=False,
                                                      timeout_s=60), "unary", math.inf))
    assert all(r.ok and r.ttft is None and r.output_tokens == 3 for r in unary.results)
    assert "unary" in format_table([summarize(unary, slo_ttft=1.0)])


def test_duration_bound_and_unreachable_server(served, tmp_path):
    specs = build_workload(WorkloadConfig(num_requests=30, rate=10.0, output_len=LengthSpec(2, 2)), 320)
    run = asyncio.run(drive(specs, DriverConfig(address=served.address, duration_s=0.5, progress=False,
                                                timeout_s=60), "bounded", 10.0))
    assert 0 < len(run.results) < 30 and run.not_sent == 30 - len(run.results)
    dead = asyncio.run(drive(specs[:2], DriverConfig(address="127.0.0.1:1", progress=False, timeout_s=5), "dead"))
    assert {r.code for r in dead.results} == {"UNAVAILABLE"}
    assert summarize(dead)["errors"] == {"UNAVAILABLE": 2}
    from clients.loadtest.command import run as run_command

    assert run_command(_args("127.0.0.1:1", str(tmp_path / "x"))) == 1
    assert not os.path.exists(tmp_path / "x")


def test_the_same_workload_over_http(served, tmp_path, capsys):
    """``--protocol http`` sends the same requests to the OpenAI-compatible API: the same prompts and lengths reach
    the engine, a missing adapter is HTTP_404, unary calls work, and an unreachable server is exit status 1."""
    from clients.loadtest.command import run

    num_adapters = NUM_ON_DISK + 2
    kw = {"num_adapters": num_adapters, "popularity": "power", "alpha": 0.5, "mode": "closed", "concurrency": 4,
          "num_requests": 16, "input_len": "4-24", "output_len": "2-6", "seed": 5}
    port = served.http_url.rsplit(":", 1)[1].removesuffix("/v1")
    reports = {}
    for protocol, address in (("grpc", served.address), ("http", f"127.0.0.1:{port}")):
        assert run(_args(address, str(tmp_path / protocol), protocol=protocol, **kw)) == 0
        reports[protocol] = json.loads((tmp_path / protocol / "report.json").read_text())["runs"][0]
    grpc_req, http_req = (sorted(reports[p]["requests"], key=lambda r: r["index"]) for p in ("grpc", "http"))
    missing = sum(r["code"] == "NOT_FOUND" for r in grpc_req)
    assert missing > 0 and reports["http"]["summary"]["errors"] == {"HTTP_404": missing}
    for g, h in zip(grpc_req, http_req):
        assert (g["adapter"], g["max_new_tokens"], g["code"] == "OK") == (h["adapter"], h["max_new_tokens"],
                                                                            h["code"] == "OK")
        if h["code"] == "OK":
            assert (h["prompt_tokens"], h["output_tokens"]) == (g["prompt_tokens"], g["output_tokens"])
            assert h["ttft"] is not None and 0 < h["ttft"] <= h["e2e"]
    specs = build_workload(WorkloadConfig(num_requests=3, num_adapters=NUM_ON_DISK, output_len=LengthSpec(3, 3),
                                          input_len=LengthSpec(8, 8)), 320)
    unary = asyncio.run(drive(specs, DriverConfig(address=f"127.0.0.1:{port}", protocol="http", stream=False,
                                                  progress=False, timeout_s=60), "unary", math.inf))
    assert all(r.ok and r.ttft is None and r.output_tokens == 3 and r.prompt_tokens == 8 for r in unary.results)
    assert run(_args("127.0.0.1:1", str(tmp_path / "x"), protocol="http")) == 1
    assert "over HTTP" in capsys.readouterr().err
