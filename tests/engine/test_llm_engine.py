"""LLMEngine end to end on a tiny model: batching invariance, preemption, prefix caching, aborts, stopping."""
from __future__ import annotations

import random

import pytest
import torch

from engine import LLMEngine, SamplingParams
from tests.helpers.adapters import ALL7, ATTN, make_peft_adapter
from tests.helpers.tiny_models import make_checkpoint

GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = make_checkpoint(str(tmp_path_factory.mktemp("base")), "llama", max_position_embeddings=512)
    root = tmp_path_factory.mktemp("adapters")
    for i, (r, t) in enumerate([(4, ATTN), (8, ALL7), (16, ALL7), (2, ["v_proj"])]):
        make_peft_adapter(base, str(root / f"a{i}"), seed=i, r=r, lora_alpha=2 * r, target_modules=t)
    make_peft_adapter(base, str(root / "team" / "deep"), seed=9, r=4, lora_alpha=8, target_modules=ALL7)
    return base, str(root)


def engine(setup, **kw) -> LLMEngine:
    base, root = setup
    kw.setdefault("num_kv_blocks", 256)
    kw.setdefault("block_size", 4)
    kw.setdefault("lora_pool_pages", 2048)  # small pool: invariant checks walk every page
    return LLMEngine(model=base, adapter_dir=root, progress=False, **kw)


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(4, 320) for _ in range(rng.randrange(3, 40))] for _ in range(n)]


ADAPTERS = ["a0", "a1", None, "a2", "a3", "team/deep", "a1", None]


def _alone(eng: LLMEngine, prompts, adapters, params=GREEDY):
    return [eng.generate([p], params, [a])[0].token_ids for p, a in zip(prompts, adapters)]


@pytest.fixture(scope="module")
def reference(setup):
    eng = engine(setup)
    prompts = _prompts(len(ADAPTERS))
    return prompts, _alone(eng, prompts, ADAPTERS)


@pytest.mark.parametrize("options", [
    {},
    {"max_num_batched_tokens": 8},  # chunked prefill in 8-token chunks
    {"num_kv_blocks": 40, "max_model_len": 128},  # tight KV pool: preemption
    {"enable_prefix_caching": False, "max_num_seqs": 3},
])
def test_batched_greedy_equals_alone(setup, reference, options):
    prompts, expected = reference
    eng = engine(setup, **options)
    outs = eng.generate(prompts, GREEDY, ADAPTERS)
    assert [o.token_ids for o in outs] == expected
    assert all(o.finish_reason == "length" for o in outs)
    if "num_kv_blocks" in options:
        assert eng.scheduler.stats().num_preemptions > 0
    assert eng.check_invariants()["kv_blocks_used"] == 0


def test_adapters_change_outputs(reference):
    _, expected = reference
    assert expected[0] != expected[2] or expected[1] != expected[2]


def test_random_requests_with_aborts_leave_nothing_in_use(setup):
    eng = engine(setup, num_kv_blocks=80, max_model_len=128, max_num_seqs=16)
    rng = random.Random(1)
    live: list[str] = []
    submitted = 0
    while submitted < 1000 or eng.has_work():
        for _ in range(rng.randrange(0, 12)):
            if submitted < 1000:
                params = SamplingParams(max_new_tokens=rng.randrange(1, 6), temperature=rng.choice([0.0, 0.8]),
                                        seed=rng.choice([None, 7]))
                live.append(eng.add_request(_prompts(1, submitted)[0], params, rng.choice(ADAPTERS)))
                submitted += 1
        if live and rng.random() < 0.5:
            eng.abort(live.pop(rng.randrange(len(live))))
        for o in eng.step():
            if o.finished and o.request_id in live:
                live.remove(o.request_id)
        eng.check_invariants()
    state = eng.check_invariants()
    assert state == {"kv_blocks_used": 0, "adapter_pins": 0, "running": 0, "waiting": 0, "tracked": 0}


def test_seeded_sampling_independent_of_batch(setup):
    eng = engine(setup)
    params = SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    prompt = _prompts(1, 5)[0]
    alone = eng.generate([prompt], params, ["a1"])[0].token_ids
    others = [SamplingParams(max_new_tokens=8, temperature=1.0, ignore_eos=True)] * 3
    outs = eng.generate(_prompts(3, 6) + [prompt], others + [params], ["a0", None, "a2", "a1"])
    assert outs[-1].token_ids == alone


def test_prefix_cache_hits_and_never_crosses_adapters(setup):
    eng = engine(setup)
    system = _prompts(1, 11)[0][:3] * 8  # 24 shared tokens = 6 full blocks
    p1, p2 = system + [5, 6, 7], system + [8, 9]
    first = eng.generate([p1], GREEDY, ["a1"])[0]
    second = eng.generate([p2], GREEDY, ["a1"])[0]
    assert first.num_cached_tokens == 0 and second.num_cached_tokens >= 20
    other = eng.generate([p2], GREEDY, ["a2"])[0]
    assert other.num_cached_tokens == 0  # same tokens, different adapter: no sharing
    base = eng.generate([p2], GREEDY, [None])[0]
    assert base.num_cached_tokens == 0
    off = engine(setup, enable_prefix_caching=False)
    assert off.generate([p2], GREEDY, ["a1"])[0].token_ids == second.token_ids
    assert off.generate([p2], GREEDY, ["a2"])[0].token_ids == other.token_ids


def test_same_prompt_two_adapters_get_distinct_blocks(setup):
    eng = engine(setup)
    prompt = _prompts(1, 12)[0] * 3
    ra = eng.add_request(prompt, GREEDY, "a0")
    rb = eng.add_request(prompt, GREEDY, "a1")
    eng.step()
    ta = set(eng.block_manager.block_table(ra))
    tb = set(eng.block_manager.block_table(rb))
    assert ta and tb and not ta & tb
    while eng.has_work():
        eng.step()


def test_stop_strings_and_streaming_deltas(setup):
    eng = engine(setup)
    prompt = _prompts(1, 3)[0]
    full = eng.generate([prompt], SamplingParams(max_new_tokens=20, temperature=0.0, ignore_eos=True))[0]
    text = full.text
    assert len(text) > 6
    stop = text[3:6]
    cut = eng.generate([prompt], SamplingParams(max_new_tokens=20, temperature=0.0, ignore_eos=True,
                                                 stop=[stop]))[0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == text[:text.index(stop)]
    rid = eng.add_request(prompt, SamplingParams(max_new_tokens=20, temperature=0.0, ignore_eos=True))
    deltas = []
    while eng.has_work():
        deltas += [o.delta_text for o in eng.step() if o.request_id == rid]
    assert "".join(deltas) == text


def test_min_new_tokens_and_stop_token_ids(setup):
    eng = engine(setup)
    prompt = _prompts(1, 4)[0]
    full = eng.generate([prompt], GREEDY)[0].token_ids
    stop_id = full[2]
    out = eng.generate([prompt], SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True,
                                                stop_token_ids=[stop_id]))[0]
    assert out.finish_reason == "stop" and out.token_ids[-1] == stop_id
    assert len(out.token_ids) == full.index(stop_id) + 1


def test_logprobs_returned(setup):
    eng = engine(setup)
    out = eng.generate([_prompts(1, 8)[0]], SamplingParams(max_new_tokens=4, temperature=0.0, logprobs=3))[0]
    assert len(out.logprobs) == len(out.token_ids)
    for lp, tok in zip(out.logprobs, out.token_ids):
        assert lp.token_id == tok and len(lp.top) == 3 and lp.top[0][0] == tok
        assert lp.logprob <= 0 and abs(lp.logprob - lp.top[0][1]) < 1e-6


def test_bad_requests_fail_at_once(setup):
    """add_request checks every rule of a request and raises a typed error naming the field at fault."""
    from aspen.errors import AdapterNotFoundError, AdapterPathError
    from engine.scheduling.errors import DuplicateRequestError, RequestError
    from engine.scheduling.sampling_params import SamplingParamsError
    from engine.scheduling.scheduler import QueueFullError

    eng = engine(setup, max_model_len=64, max_waiting=1)
    with pytest.raises(AdapterNotFoundError):
        eng.add_request([5, 6], GREEDY, "missing")
    for bad_id in ("../escape", "bad id!", "a//b"):
        with pytest.raises(AdapterPathError):
            eng.add_request([5, 6], GREEDY, bad_id)
    refusals = [(([],), "prompt", "prompt is empty"), (("",), "prompt", "prompt is empty"),
                (([5, 10**6],), "prompt", "token ids"), (([5, -1],), "prompt", "token ids"),
                (("x" * (eng.max_prompt_chars + 1),), "prompt", "can never fit"),
                (([5], GREEDY, None, "r" * 257), "request_id", "257"), (([5], GREEDY, None, ""), "request_id", "non-empty")]
    for args, field, needle in refusals:
        with pytest.raises(RequestError, match=needle) as info:
            eng.add_request(*args)
        assert info.value.field == field, args
    with pytest.raises(SamplingParamsError, match="max_new_tokens"):
        eng.add_request([5] * 60, SamplingParams(max_new_tokens=10))
    assert eng.check_invariants()["tracked"] == 0
    eng.add_request([5, 6], GREEDY, request_id="r" * 256)
    with pytest.raises(DuplicateRequestError) as dup:
        eng.add_request([7], GREEDY, request_id="r" * 256)
    assert dup.value.field == "request_id"
    with pytest.raises(QueueFullError):  # max_waiting=1, counting the add not applied yet
        eng.add_request([7], GREEDY)
    eng.abort("r" * 256)
    while eng.has_work():
        eng.step()
    assert eng.check_invariants()["tracked"] == 0


def test_fairness_other_adapter_not_starved(setup):
    """The pool fits one adapter at a time; a stream of 'a1' requests must not starve one 'a2' request."""
    from aspen.lora.pool import pages_needed

    eng0 = engine(setup)
    need = max(pages_needed(eng0.model.read_adapter(eng0.adapter_dir + f"/{a}")) for a in ("a1", "a2"))
    eng = engine(setup, lora_pool_pages=need, max_head_skips=4)
    params = SamplingParams(max_new_tokens=3, temperature=0.0, ignore_eos=True)
    eng.add_request(_prompts(1, 0)[0], params, "a1")
    eng.step()
    victim = eng.add_request(_prompts(1, 1)[0], params, "a2")
    done_at = None
    for step in range(200):
        eng.add_request(_prompts(1, 100 + step)[0], params, "a1")  # a new a1 request every step
        if any(o.request_id == victim and o.finished for o in eng.step()):
            done_at = step
            break
    assert done_at is not None and done_at < 60
    for rid in list(eng._states):
        eng.abort(rid)
    while eng.has_work():
        eng.step()
    assert eng.check_invariants()["adapter_pins"] == 0


def test_step_failure_is_contained(setup, monkeypatch):
    eng = engine(setup)
    ok = eng.add_request(_prompts(1, 1)[0], GREEDY)
    eng.step()
    real = eng.model.step
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected fault")
        return real(*a, **k)

    monkeypatch.setattr(eng.model, "step", flaky)
    outs = eng.step()
    assert [o.finish_reason for o in outs if o.request_id == ok] == ["error"]
    assert "injected fault" in outs[0].error
    after = eng.generate([_prompts(1, 2)[0]], GREEDY)[0]
    assert after.finish_reason == "length"
    assert eng.check_invariants()["kv_blocks_used"] == 0



def test_sixteen_bit_adapter_pool(setup):
    """adapter_dtype stores the pool in 16 bits (twice the pages for the same bytes); batching stays exact."""
    from engine.config import EngineConfig, MiB

    eng = LLMEngine(model=setup[0], adapter_dir=setup[1], progress=False, num_kv_blocks=256, block_size=4,
                    lora_pool_bytes=4 * MiB, adapter_dtype="float16")
    eng32 = LLMEngine(model=setup[0], adapter_dir=setup[1], progress=False, num_kv_blocks=256, block_size=4,
                      lora_pool_bytes=4 * MiB)
    assert eng.runner.pool.data.dtype == torch.float16 and eng32.runner.pool.data.dtype == torch.float32
    assert abs(eng.runner.pool.num_pages - 2 * eng32.runner.pool.num_pages) <= 1  # floor division
    prompts = _prompts(len(ADAPTERS), seed=5)
    assert [o.token_ids for o in eng.generate(prompts, GREEDY, ADAPTERS)] == _alone(eng, prompts, ADAPTERS)
    with pytest.raises(ValueError, match="adapter_dtype must be one of auto, float32, float16, bfloat16"):
        EngineConfig(adapter_dtype="float8")


def test_cpu_kernels_are_built_before_the_engine_is_ready(setup):
    """No C++ extension is left to compile lazily inside the first request (on a fresh machine that took ~45 s)."""
    from aspen.kernels.catalog import all_extensions

    eng = engine(setup)
    extensions = all_extensions()
    assert set(eng.kernels) == {ext.name for ext in extensions}
    for ext in extensions:
        assert ext.tried, f"{ext.name} would still be compiled on first use"
