"""Every benchmark runs on its tiny configuration and writes a JSON report with the expected keys.

These are smoke tests, not timed tests: on the tiny model the figures mean nothing and are not checked. Models
and adapters go to a temporary ``$ASPEN_HOME`` (the benchmarks cache them under ``$ASPEN_HOME/bench``).
"""
from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("bench-home")
    mp.setenv("ASPEN_HOME", str(root))
    yield root
    mp.undo()


def _report(path) -> dict:
    return json.loads(path.read_text())


def test_bench_command_dispatches_lora_overhead(home, tmp_path):
    from aspen.cli import main

    out = tmp_path / "lo.json"
    assert main(["bench", "lora_overhead", "--tiny", "--repeats", "2", "--out", str(out)]) == 0
    r = _report(out)
    assert r["benchmark"] == "lora_overhead" and r["shape"] == "tiny"
    assert {"base_step_ms_best", "lora_step_ms_best", "lora_over_base", "meets_target"} <= set(r)
    assert r["phase"] == "decode" and r["target"] == "<= 1.10"


def test_lora_overhead_prefill_phase(home, tmp_path):
    import aspen.lora.op
    from benchmarks.lora_overhead import main

    defaults = aspen.lora.op.SHORT_PREFILL_TOKENS, aspen.lora.op.SGMV_PREFILL_TOKENS
    try:
        r = main(["--shape", "tiny", "--repeats", "1", "--phase", "prefill", "--prompt-len", "5-9",
                  "--short-prefill-tokens", "0", "--out", str(tmp_path / "p.json")])
    finally:
        aspen.lora.op.SHORT_PREFILL_TOKENS, aspen.lora.op.SGMV_PREFILL_TOKENS = defaults
    assert r["phase"] == "prefill" and 32 * 5 <= r["prompt_tokens"] <= 32 * 9
    assert r["short_prefill_tokens"] == 0 and r["target"] is None and r["lora_over_base"] > 0


def test_engine_lora(home, tmp_path):
    from benchmarks.engine_lora import main

    r = main(["--tiny", "--repeats", "1", "--out", str(tmp_path / "r.json")])
    assert _report(tmp_path / "r.json") == r
    assert r["distinct_adapters"] == r["requests"] == 4 and r["tokens_per_run"] == 4 * r["output_len"]
    assert r["base_tok_s"] > 0 and r["lora_tok_s"] > 0 and isinstance(r["meets_target"], bool)
    assert {"lora_over_base_tok_s", "lora_over_base_tok_s_median", "target", "device"} <= set(r)


def test_vs_peft(home, tmp_path):
    from benchmarks.vs_peft import main

    r = main(["--tiny", "--out", str(tmp_path / "r.json")])
    assert _report(tmp_path / "r.json") == r
    assert r["requests"] == 8 and r["distinct_adapters"] == 4 and r["hf_batch_size"] == 4
    assert r["peft_mixed_computed_tokens"] >= r["useful_tokens"]
    assert r["peft_one_at_a_time_computed_tokens"] >= r["useful_tokens"]
    for k in ("engine_tok_s", "peft_mixed_tok_s", "peft_one_at_a_time_tok_s", "speedup_vs_mixed",
              "speedup_vs_one_at_a_time"):
        assert r[k] > 0, k
    assert {"meets_target_vs_mixed", "meets_target_vs_one_at_a_time"} <= set(r)


def test_vs_transformers(home, tmp_path):
    from benchmarks.vs_transformers import main

    r = main(["--tiny", "--out", str(tmp_path / "r.json")])
    assert _report(tmp_path / "r.json") == r
    assert r["engine_tok_s"] > 0 and r["transformers_tok_s"] > 0 and r["speedup"] > 0
    assert r["hf_computed_tokens"] >= r["useful_tokens"] and {"target", "meets_target"} <= set(r)


def test_adapter_churn(home, tmp_path):
    from benchmarks.adapter_churn import main

    r = main(["--tiny", "--requests", "8", "--alphas", "0.3", "--load-samples", "3", "--out",
              str(tmp_path / "r.json")])
    assert _report(tmp_path / "r.json") == r
    assert r["adapters_on_disk"] == 24 and r["device_cache_adapters"] >= 4
    assert set(r["runs"]) == {"single", "alpha=0.3"}
    for run in r["runs"].values():
        assert run["ok"] == 8 and run["errors"] == {} and run["ttft_p99_ms"] > 0
        assert 0 <= run["cache"]["request_hit_rate"] <= 1 and run["cache"]["device_loads"] >= 1
    assert r["runs"]["single"]["distinct_adapters"] == 1 and r["slices"] == 2  # 2 interleaved slices of 4
    assert r["load_ms_cold"]["n"] == r["load_ms_warm_page_cache"]["n"] == 3
    assert r["load_ms_full_host_tier_cold"]["n"] == r["load_ms_full_host_tier_warm_page_cache"]["n"] == 3
    assert set(r["meets_load_target"]) == {"first_fill_warm", "first_fill_cold", "full_host_tier_warm",
                                           "full_host_tier_cold"}
    assert set(r["per_alpha"]) == {"alpha=0.3"} and r["per_alpha"]["alpha=0.3"]["p99_ttft_vs_single"] > 0
    for f in r["loadtest_files"].values():
        assert (tmp_path / "adapter_churn" / f.rsplit("/", 1)[-1]).exists()


def test_quantized(home, tmp_path):
    from benchmarks.quantized import main

    r = main(["--tiny", "--repeats", "1", "--out", str(tmp_path / "r.json")])
    assert _report(tmp_path / "r.json") == r
    modes = r["modes"]
    assert set(modes) == {"none", "int8", "nf4"} and modes["none"]["bytes_per_param"] == 4.0
    assert modes["nf4"]["bytes_per_param"] < modes["int8"]["bytes_per_param"] < 4.0
    assert all(m["tok_s"] > 0 and "throughput_vs_fp32" in m for m in modes.values())


def test_compute_efficiency(home, tmp_path):
    from benchmarks.compute_efficiency import main

    r = main(["--tiny", "--repeats", "2", "--rows", "16", "--gemm", "256", "--out", str(tmp_path / "r.json")])
    assert _report(tmp_path / "r.json") == r
    # tiny: 2 layers x (64x128 qkv + 64x64 o + 64x256 gate_up + 128x64 down) + 320x64 lm_head
    assert r["matmul_params"] == 2 * (64 * 128 + 64 * 64 + 64 * 256 + 128 * 64) + 320 * 64
    assert r["achieved_gflops"] > 0 and r["peak_gemm_gflops"] > 0 and 0 < r["fraction_of_peak"]


def test_train_fused(home, tmp_path):
    from benchmarks.train_fused import main

    r = main(["--tiny", "--rounds", "1", "--steps", "1", "--adapters", "2", "--out", str(tmp_path / "r.json")])
    assert _report(tmp_path / "r.json") == r
    assert r["fused"]["tokens"] == r["peft_sequential"]["tokens"] > 0  # the same sequences on both sides
    assert len(r["peft_sequential"]["runs"]) == 2 and r["setup"]["rounds"] == 1
    assert r["tokens_per_s_ratio"] > 0 and r["peak_memory_ratio"] > 0


def test_churn_slices_cover_the_workload_and_rebase_arrivals():
    from benchmarks.adapter_churn import rebase, slice_bounds
    from clients.loadtest.driver import RequestSpec

    assert slice_bounds(10, 3) == [(0, 3), (3, 7), (7, 10)] and slice_bounds(2, 5) == [(0, 1), (1, 2)]
    specs = [RequestSpec(i, 1.5 + i, None, [4], 1, 2) for i in range(3)]
    assert [s.arrival for s in rebase(specs[1:])] == [0.0, 1.0] and rebase([]) == []


def test_structured(home, tmp_path):
    from benchmarks.structured import main

    r = main(["--tiny", "--repeats", "1", "--out", str(tmp_path / "r.json")])
    assert _report(tmp_path / "r.json") == r
    assert r["constrained_rows"] == r["batch"] // 2 and r["tokens_per_run"] == r["batch"] * r["output_len"]
    assert r["free_tok_s"] > 0 and r["half_constrained_tok_s"] > 0 and isinstance(r["meets_target"], bool)
    c = r["compile"]
    assert c["compiles"] == c["schemas"] * c["variants"] and c["refused"] == 0
    assert 0 < c["compile_ms_p50"] <= c["compile_ms_p99"] <= c["compile_ms_max"]


def test_http_vs_grpc(home, tmp_path):
    from benchmarks.http_vs_grpc import main

    r = main(["--tiny", "--out", str(tmp_path / "r.json")])
    assert _report(tmp_path / "r.json") == r
    assert set(r["runs"]) == {"grpc", "http"} and r["requests_per_protocol"] == 16
    for run in r["runs"].values():
        assert run["ok"] == 16 and not run["errors"] and run["output_token_throughput"] > 0
        assert run["ttft_p99_ms"] >= run["ttft_p50_ms"] > 0
    assert r["http_over_grpc_throughput"] > 0 and isinstance(r["meets_target"], bool)
    assert r["cpu"]["logical_cpus"] >= 1 and "model" in r["cpu"]
