"""Memory-based sizing: the split rule (pure arithmetic, with fake byte sizes), the engine's start-up with no
sizing options on a long-context model, the error when the context does not fit, explicit options winning, the
capacity log line, and the scheduler's wait counters and their rate-limited warning."""
from __future__ import annotations

import logging

import pytest

from engine import LLMEngine, SamplingParams
from engine import capacity as cap
from engine.capacity import Capacity, CapacityError, CapacityRequest, plan_capacity
from engine.config import EngineConfig
from engine.scheduling.scheduler import SchedulerConfig
from tests.engine.test_scheduler import Harness, _stream_with_blocked_b
from tests.helpers.adapters import ALL7, make_peft_adapter
from tests.helpers.tiny_models import make_checkpoint

MiB, GiB = 1 << 20, 1 << 30
GREEDY = SamplingParams(max_new_tokens=4, temperature=0.0, ignore_eos=True)


def request(**kw) -> CapacityRequest:
    """The 125M Llama shape in float32: 73728 KV bytes per token, 184320 bytes per pool page, rank 16 on all
    seven projections (112 pages), 64 sequences of 2048 tokens, 24 GiB available."""
    base = {"available_bytes": 24 * GiB, "utilization": 0.5, "kv_bytes_per_block": 16 * 73728, "block_size": 16,
            "page_bytes": 184320, "adapter_pages": 112, "max_num_seqs": 64, "max_model_len": 2048,
            "adapters": True}
    return CapacityRequest(**{**base, **kw})


# ---------------------------------------------------------------------------- the split rule
def test_wants_that_fit_are_taken_whole():
    c = plan_capacity(request(max_num_seqs=8))
    assert c.kv_tokens == 8 * 2048 and c.full_sequences == 8
    assert c.pool_pages == 8 * 112 and c.device_adapters == 8
    assert c.host_bytes == cap.HOST_TIER_MULTIPLE * 8 * 112 * 184320 and c.host_adapters == 16


def test_default_serves_the_benchmark_shape_with_32_adapters_and_full_context():
    # 24 GiB machine, ~22 GiB available after loading the 125M model: the wants (about 13.6 GB) exceed the
    # budget, so the shares apply; still 32+ adapters resident and far more than one full context of KV
    c = plan_capacity(request(available_bytes=22 * GiB, utilization=EngineConfig().memory_utilization))
    assert c.device_adapters >= 32 and c.full_sequences >= 32 and c.host_adapters >= 32
    used = c.kv_blocks * 16 * 73728 + c.pool_pages * 184320 + c.host_bytes
    assert used <= 0.5 * 22 * GiB


def test_over_budget_the_shares_apply_and_kv_takes_the_rest():
    r = request(available_bytes=4 * GiB)
    c = plan_capacity(r)
    assert c.pool_pages * 184320 <= cap.POOL_SHARE * r.budget and c.host_bytes <= cap.HOST_SHARE * r.budget
    used = c.kv_blocks * r.kv_bytes_per_block + c.pool_pages * 184320 + c.host_bytes
    assert r.budget - r.kv_bytes_per_block < used <= r.budget


def test_one_full_context_comes_before_the_adapter_shares():
    bpb = 16 * 73728
    r = request(available_bytes=2 * (128 * bpb + 112 * 184320 + 112 * 184320))  # budget: one context + a bit
    c = plan_capacity(r)
    assert c.kv_tokens == 2048 and c.device_adapters >= 1 and c.host_adapters >= 1


def test_too_small_names_the_tokens_that_fit_and_the_options():
    with pytest.raises(CapacityError) as e:
        plan_capacity(request(available_bytes=64 * MiB))
    tokens = (32 * MiB // (16 * 73728)) * 16
    assert e.value.tokens_that_fit == tokens
    for text in (f"holds {tokens} tokens", "max_model_len=2048", f"--max-model-len to {tokens}",
                 "--memory-utilization", "--kv-cache-mb"):
        assert text in str(e.value)


def test_explicit_sizes_win_and_come_out_of_the_budget():
    c = plan_capacity(request(kv_blocks=200, pool_pages=300, host_bytes=5 * MiB))
    assert (c.kv_blocks, c.pool_pages, c.host_bytes) == (200, 300, 5 * MiB)
    c = plan_capacity(request(available_bytes=4 * GiB, pool_pages=1000))  # the wants do not fit: shares apply
    assert c.pool_pages == 1000 and 0 < c.host_bytes <= cap.HOST_SHARE * (2 * GiB - 1000 * 184320)
    c = plan_capacity(request(available_bytes=GiB, kv_blocks=1000, pool_pages=1000))  # over budget already
    assert c.host_bytes == 112 * 184320  # a derived host tier holds at least one adapter
    with pytest.raises(CapacityError, match="--kv-cache-mb / --num-kv-blocks holds 1600 tokens"):
        plan_capacity(request(kv_blocks=100))


def test_without_adapters_the_pools_are_minimal():
    c = plan_capacity(request(adapters=False, max_num_seqs=4))
    assert (c.pool_pages, c.host_bytes, c.kv_tokens) == (1, 0, 4 * 2048)


def test_capacity_counts():
    c = Capacity(kv_blocks=10, block_size=16, pool_pages=250, host_bytes=1000, adapter_pages=112,
                 adapter_bytes=300, max_model_len=64)
    assert (c.kv_tokens, c.full_sequences, c.device_adapters, c.host_adapters) == (160, 2, 2, 3)


def test_available_memory_is_positive():
    assert cap.available_memory("cpu") > 0


# ---------------------------------------------------------------------------- the engine
@pytest.fixture(scope="module")
def long_context(tmp_path_factory):
    base = make_checkpoint(str(tmp_path_factory.mktemp("base")), "llama", max_position_embeddings=32768)
    root = tmp_path_factory.mktemp("adapters")
    make_peft_adapter(base, str(root / "r8"), seed=1, r=8, lora_alpha=16, target_modules=ALL7)
    make_peft_adapter(base, str(root / "r4"), seed=2, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    return base, str(root)


def test_long_context_starts_with_no_sizing_options_and_serves(long_context, monkeypatch, caplog):
    base, root = long_context
    monkeypatch.setattr(cap, "available_memory", lambda device: 256 * MiB)  # keep the test's memory small
    with caplog.at_level(logging.INFO, logger="aspen.engine"):
        llm = LLMEngine(model=base, adapter_dir=root, progress=False)
    assert llm.max_model_len == 32768 and llm.capacity.kv_tokens >= 32768
    assert llm.capacity.adapter_pages == 8 * 7  # the largest adapter found: rank 8 on all seven projections
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("capacity:"))
    c = llm.capacity
    assert f"{c.kv_tokens} tokens of KV ({c.full_sequences} sequences of max_model_len=32768" in line
    assert f"{c.device_adapters} adapters of the largest shape (rank 8 on 7 projections (r8))" in line
    assert f"~{c.host_adapters} in the host tier" in line
    out = llm.generate([[5, 6, 7], [8, 9]], GREEDY, adapters=["r8", "r4"])
    assert [len(o.token_ids) for o in out] == [4, 4]


def test_long_context_with_the_real_available_memory(long_context):
    base, root = long_context
    llm = LLMEngine(model=base, adapter_dir=root, progress=False, max_num_seqs=2)
    assert llm.capacity.kv_tokens >= 32768
    assert len(llm.generate([1, 2, 3], GREEDY, adapters="r8")[0].token_ids) == 4


def test_a_context_that_does_not_fit_says_what_fits(long_context, monkeypatch):
    base, root = long_context
    monkeypatch.setattr(cap, "available_memory", lambda device: 1 * GiB)
    with pytest.raises(CapacityError) as e:
        LLMEngine(model=base, adapter_dir=root, progress=False, memory_utilization=0.001)
    assert 0 < e.value.tokens_that_fit < 32768
    for text in (f"--max-model-len to {e.value.tokens_that_fit}", "--memory-utilization", "--kv-cache-mb"):
        assert text in str(e.value)
    llm = LLMEngine(model=base, adapter_dir=root, progress=False, memory_utilization=0.001,
                    max_model_len=e.value.tokens_that_fit)  # the advice works
    assert llm.capacity.kv_tokens >= llm.max_model_len


def test_explicit_options_win(long_context, monkeypatch):
    base, root = long_context
    monkeypatch.setattr(cap, "available_memory", lambda device: 64 * MiB)
    llm = LLMEngine(model=base, adapter_dir=root, progress=False, num_kv_blocks=2048, lora_pool_pages=100,
                    host_adapter_bytes=3 * MiB)
    c = llm.capacity
    assert (c.kv_blocks, c.pool_pages, c.host_bytes) == (2048, 100, 3 * MiB)
    assert llm.runner.kv.num_blocks == 2048 and llm.runner.pool.num_pages == 100
    llm = LLMEngine(model=base, adapter_dir=root, progress=False, kv_cache_bytes=40 * MiB, lora_pool_bytes=MiB)
    bpb = 2 * 2 * 16 * 2 * 16 * 4  # layers x block_size x kv_size x float32, K and V
    assert llm.capacity.kv_blocks == 40 * MiB // bpb and llm.capacity.host_bytes > 0


# ---------------------------------------------------------------------------- waits
def test_adapter_waits_are_counted_and_warned_once_a_minute(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="aspen.engine"):
        h, _ = _stream_with_blocked_b(tmp_path, max_head_skips=10**6, steps_after_b=40)  # clock: 1 s a step
    assert h.sched.stats().num_adapter_waits >= 39 and h.sched.stats().num_kv_waits == 0
    warnings = [r.getMessage() for r in caplog.records if "waited for memory" in r.getMessage()]
    assert len(warnings) == 1 and "for adapter pages" in warnings[0] and "--lora-pool-mb" in warnings[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="aspen.engine"):
        h.run()
    assert sum("waited for memory" in r.getMessage() for r in caplog.records) <= 1


def test_kv_waits_are_counted(tmp_path, caplog):
    h = Harness(tmp_path, SchedulerConfig(max_num_batched_tokens=24), num_blocks=8, block_size=4)
    h.add("first", list(range(20)), "a", max_new_tokens=4)
    h.add("head", list(range(50, 66)), "b", max_new_tokens=2)  # 4 blocks: only 3 are free
    with caplog.at_level(logging.WARNING, logger="aspen.engine"):
        h.step()
    assert h.sched.stats().num_kv_waits == 1
    assert any("1 for KV blocks" in r.getMessage() and "--kv-cache-mb" in r.getMessage() for r in caplog.records)
    h.run()
