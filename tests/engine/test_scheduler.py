"""Scheduler behaviour with the real BlockManager and AdapterCache (fake backend) and a fake model.

The fake model makes a request's output a pure function of (adapter, prompt): the "KV" of token p
is a hash chain over the adapter and tokens[:p + 1], written to and read back from the slots named
by the block table, and the next token is derived from the KV *read from the cache*. Any wrong
block table, shared-block overwrite or cross-adapter prefix reuse therefore changes the output,
and every output must equal the request run alone, whatever the batching, chunking, preemption or
prefix caching.
"""
from __future__ import annotations

import os
import random
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest

from aspen.errors import AdapterError
from engine.adapters.cache import AdapterCache
from engine.scheduling.block_manager import BlockManager
from engine.scheduling.errors import DuplicateRequestError, RequestError
from engine.scheduling.request import FinishReason, Request, RequestStatus
from engine.scheduling.sampling_params import SamplingParams
from engine.scheduling.scheduler import Scheduler, SchedulerConfig, SchedulerOutput


# ---------------------------------------------------------------------------- fakes
def kv_chain(adapter_id: str | None, tokens: list[int]) -> list[int]:
    """The fake KV of every position: a hash chain seeded by the adapter."""
    value, out = zlib.crc32(repr(adapter_id).encode()), []  # str hashes vary per process; this does not
    for t in tokens:
        value = hash((value, t))
        out.append(value)
    return out


def next_token(kv: int) -> int:
    return kv % 1000


def reference_output(adapter_id: str | None, prompt: list[int], params: SamplingParams) -> list[int]:
    """The request run alone, token by token, with the engine's stop rule."""
    tokens, out = list(prompt), []
    while len(out) < params.max_new_tokens:
        out.append(next_token(kv_chain(adapter_id, tokens)[-1]))
        tokens.append(out[-1])
        if out[-1] in params.stop_token_ids:
            break
    return out


@dataclass
class FakeHost:
    adapter_id: str
    nbytes: int
    num_pages: int


@dataclass
class FakeDevice:
    adapter_id: str
    released: bool = False


class FakeBackend:
    def __init__(self, pages: dict[str, int]) -> None:
        self.pages = pages
        self.fail_load: set[str] = set()

    def load_host(self, adapter_id: str, path: str) -> FakeHost:
        if adapter_id in self.fail_load:
            raise AdapterError(f"adapter {adapter_id!r}: corrupt weights (fake)")
        return FakeHost(adapter_id, 100, self.pages[adapter_id])

    def to_device(self, host: FakeHost, pages: list[int]) -> FakeDevice:
        return FakeDevice(host.adapter_id)

    def release_device(self, dev: FakeDevice) -> None:
        dev.released = True


class FakeRunner:
    """Checks every chunk's context KV read from the cache, then writes the chunk's KV. The adapter's weights
    come from the handle the chunk carries (the pin admission took), as in the real runner."""

    def __init__(self, bm: BlockManager) -> None:
        self.bm = bm
        self.slots: dict[tuple[int, int], int] = {}

    def slot(self, table: tuple[int, ...], pos: int) -> tuple[int, int]:
        return table[pos // self.bm.block_size], pos % self.bm.block_size

    def run(self, out: SchedulerOutput) -> dict[str, int]:
        sampled, writes = {}, []
        for c in out.chunks:  # reads first: all chunks of a step run at once
            r, handle = c.request, c.adapter_handle
            assert (handle is None) == (r.adapter_id is None), f"{r!r}: chunk handle {handle!r}"
            assert handle is None or not handle.released, f"{r!r}: its pinned adapter was released"
            kv = kv_chain(handle.adapter_id if handle else None, r.all_token_ids[:c.end])
            for p in range(c.start):
                assert self.slots.get(self.slot(c.block_table, p)) == kv[p], f"{r!r}: bad KV at {p}"
            writes += [(self.slot(c.block_table, p), kv[p]) for p in range(c.start, c.end)]
            if c.sample:
                sampled[r.request_id] = next_token(kv[-1])
        self.slots.update(writes)
        return sampled


# -------------------------------------------------------------------------- harness
def make_adapters(root: Path, pages: dict[str, int], num_pages: int) -> tuple[AdapterCache, FakeBackend]:
    for adapter_id in pages:
        (root / adapter_id).mkdir(parents=True, exist_ok=True)
        (root / adapter_id / "adapter_config.json").write_text("{}")
    backend = FakeBackend(pages)
    return AdapterCache(os.fspath(root), backend, 10**9, num_pages), backend


class Harness:
    """An engine-like loop: schedule -> fake run -> on_step_done -> stop check -> finish."""

    def __init__(self, tmp_path: Path, config: SchedulerConfig, num_blocks: int = 256, block_size: int = 4,
                 pages: dict[str, int] | None = None, num_pages: int = 64) -> None:
        self.bm = BlockManager(num_blocks, block_size)
        pages = pages if pages is not None else {a: 2 for a in "abcd"}
        self.adapters, self.backend = make_adapters(tmp_path / "adapters", pages, num_pages)
        self.steps = 0
        self.sched = Scheduler(config, self.bm, self.adapters, clock=lambda: float(self.steps))
        self.runner = FakeRunner(self.bm)
        self.finished: list[Request] = []
        self.admitted_at: dict[str, int] = {}

    def add(self, rid: str, prompt: list[int], adapter: str | None, **params: object) -> Request:
        request = Request(rid, prompt, SamplingParams(temperature=0, **params), adapter)
        self.sched.add(request)
        return request

    def step(self) -> SchedulerOutput:
        sched, cfg = self.sched, self.sched.config
        decodes = {r.request_id for r in sched.running if not r.is_prefill and not r.reached_max_new_tokens}
        was_waiting = {r.request_id for r in sched.waiting}
        out = sched.schedule()
        ids = [c.request.request_id for c in out.chunks]
        assert len(ids) == len(set(ids)) <= cfg.max_num_seqs
        assert out.num_batched_tokens == sum(c.end - c.start for c in out.chunks) <= cfg.max_num_batched_tokens
        for c in out.chunks:
            r = c.request
            assert r.status is RequestStatus.RUNNING and 0 <= c.start == r.num_computed_tokens < c.end
            assert c.sample == (c.end == r.num_tokens) and len(c.block_table) * self.bm.block_size >= c.end
            assert cfg.chunked_prefill or c.sample or r.num_preemptions, f"chunked prefill is off: {c}"
            self.admitted_at.setdefault(r.request_id, self.steps)
        preempted = {r.request_id for r in out.preempted}
        assert not (preempted and was_waiting & set(ids)), "admitted requests in a step that preempted"
        if len(decodes) <= cfg.max_num_batched_tokens:  # decodes are never starved
            assert decodes - preempted <= set(ids), f"decodes {decodes - set(ids)} not scheduled"
        for r in out.failed:
            assert r.finish_reason is FinishReason.ERROR and r.error is not None
        sampled = self.runner.run(out)
        for r in sched.on_step_done(out, sampled):
            if r.output_token_ids[-1] in r.params.stop_token_ids:
                sched.finish(r, FinishReason.STOP)
            elif r.reached_max_new_tokens:
                sched.finish(r, FinishReason.LENGTH)
            if r.is_finished:
                self.finished.append(r)
        sched.check_invariants()
        self.adapters.check_invariants()
        self.steps += 1
        return out

    def run(self, max_steps: int = 10_000) -> None:
        while self.sched.has_unfinished():
            assert self.steps < max_steps, "no progress"
            self.step()
        self.assert_no_leaks()

    def assert_no_leaks(self) -> None:
        assert self.bm.num_used_blocks == 0 and self.adapters.pinned_count() == 0
        self.bm.check_invariants()


def check_outputs(requests: list[Request]) -> None:
    for r in requests:
        assert r.is_finished and r.finish_reason in (FinishReason.LENGTH, FinishReason.STOP), r
        assert r.output_token_ids == reference_output(r.adapter_id, r.prompt_token_ids, r.params), r


def add_mixed(h: Harness, n: int, seed: int, max_prompt: int = 40, max_new: int = 10) -> list[Request]:
    rng = random.Random(seed)
    shared = [rng.randrange(1000) for _ in range(max_prompt)]
    out = []
    for i in range(n):
        length = rng.randint(1, max_prompt)
        prompt = shared[:length] if rng.random() < 0.4 else [rng.randrange(1000) for _ in range(length)]
        stops = [rng.randrange(1000) for _ in range(20)] if rng.random() < 0.3 else []
        adapter = rng.choice([None, "a", "b", "c", "d"])
        out.append(h.add(f"r{i}", prompt, adapter, max_new_tokens=rng.randint(1, max_new), stop_token_ids=stops))
    return out


# ---------------------------------------------------------------------------- tests
def test_mixed_batch_matches_each_request_alone(tmp_path: Path) -> None:
    h = Harness(tmp_path, SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64))
    requests = add_mixed(h, 40, seed=1)
    h.run()
    check_outputs(requests)
    assert h.sched.stats().num_prefix_cached_tokens > 0


@pytest.mark.parametrize("chunked", [True, False])
@pytest.mark.parametrize("budget", [12, 40])
def test_preemption_and_chunking_keep_outputs(tmp_path: Path, chunked: bool, budget: int) -> None:
    config = SchedulerConfig(max_num_seqs=6, max_num_batched_tokens=budget, chunked_prefill=chunked)
    h = Harness(tmp_path, config, num_blocks=10, block_size=4)
    requests = add_mixed(h, 30, seed=budget + chunked, max_prompt=min(budget, 24), max_new=12)
    h.run()
    check_outputs(requests)
    assert h.sched.stats().num_preemptions > 0
    assert any(r.num_preemptions for r in requests)


def test_preempts_newest_and_requeues_it_at_the_front(tmp_path: Path) -> None:
    h = Harness(tmp_path, SchedulerConfig(max_num_batched_tokens=64), num_blocks=4, block_size=4)
    old = h.add("old", list(range(8)), "a", max_new_tokens=5)
    new = h.add("new", list(range(10, 18)), "b", max_new_tokens=5)
    h.step()  # both admitted: 2 blocks each, all 4 used
    h.add("later", [1, 2, 3], None, max_new_tokens=2)
    out = h.step()  # both need a 9th slot: "old" gets it, "new" (newest) is preempted
    assert out.preempted == (new,) and [c.request for c in out.chunks] == [old]
    assert new.status is RequestStatus.WAITING and new.num_computed_tokens == 0 and new.num_preemptions == 1
    assert h.sched.waiting[0] is new and len(new.output_token_ids) == 1  # front of the queue, output kept
    assert h.adapters.pinned_count() == 1
    assert new.adapter_handle is None and out.chunks[0].adapter_handle is old.adapter_handle is not None
    while new.status is RequestStatus.WAITING:
        h.step()
    assert new.adapter_handle is not None and new.adapter_handle.adapter_id == "b"  # re-admission re-pinned
    h.run()
    check_outputs([old, new])


def test_request_at_max_new_tokens_is_never_scheduled_again(tmp_path: Path) -> None:
    """Even if the engine is slow to call finish(), no token beyond max_new_tokens is computed."""
    h = Harness(tmp_path, SchedulerConfig(), num_blocks=2, block_size=4)
    older = h.add("older", [1, 2, 3, 4], None, max_new_tokens=5)
    done = h.add("done", [5, 6, 7], "a", max_new_tokens=1)
    out = h.sched.schedule()
    h.sched.on_step_done(out, h.runner.run(out))  # "done" has its one token; finish() is not called
    out = h.step()  # "done" is not scheduled; "older" needs a 2nd block, so "done" (newest) is preempted
    assert [c.request for c in out.chunks] == [older] and out.preempted == (done,)
    while not older.is_finished:
        h.step()
    out = h.step()  # blocks are free now, yet "done" is not re-admitted
    assert out.chunks == () and done.status is RequestStatus.WAITING and done.num_output_tokens == 1
    h.sched.finish(done, FinishReason.LENGTH)
    h.sched.finish(done, FinishReason.LENGTH)  # idempotent
    again = h.add("again", [1], None, max_new_tokens=1)
    out = h.sched.schedule()
    h.sched.on_step_done(out, h.runner.run(out))
    assert h.sched.schedule().chunks == () and again.status is RequestStatus.RUNNING  # running, done
    h.sched.finish(again, FinishReason.LENGTH)
    h.assert_no_leaks()
    check_outputs([older, done, again])


def test_budget_seq_cap_and_decodes_not_starved_by_long_prefill(tmp_path: Path) -> None:
    h = Harness(tmp_path, SchedulerConfig(max_num_seqs=5, max_num_batched_tokens=16))
    short = [h.add(f"s{i}", [i, i + 1], "ab"[i % 2], max_new_tokens=30) for i in range(4)]
    h.step()
    long = h.add("long", list(range(200)), "c", max_new_tokens=3)
    extra = h.add("extra", [5], None, max_new_tokens=3)  # over max_num_seqs until one finishes
    for _ in range(12):
        out = h.step()
        scheduled = {c.request for c in out.chunks}
        assert set(short) <= scheduled and len(out.chunks) <= 5 and out.num_batched_tokens <= 16
        assert extra not in scheduled
    assert long.status is RequestStatus.RUNNING and long.is_prefill  # chunked, 12 tokens a step
    h.run()
    check_outputs([*short, long, extra])


@pytest.mark.parametrize("chunked", [True, False])
def test_memory_is_fcfs_no_bypass_of_a_head_short_of_blocks_or_budget(tmp_path: Path, chunked: bool) -> None:
    config = SchedulerConfig(max_num_batched_tokens=24, chunked_prefill=chunked)
    h = Harness(tmp_path, config, num_blocks=8, block_size=4)
    first = h.add("first", list(range(20)), "a", max_new_tokens=4)  # 5 blocks, 20 of 24 tokens
    head = h.add("head", list(range(50, 66)), "b", max_new_tokens=2)  # 4 blocks: only 3 are free
    small = h.add("small", [7], None, max_new_tokens=2)  # would fit both, must not jump the queue
    h.step()
    assert first.status is RequestStatus.RUNNING and head.status is small.status is RequestStatus.WAITING
    assert h.adapters.pinned_count() == 1  # the pin head took for its attempt was given back
    h.run()
    assert h.admitted_at["head"] <= h.admitted_at["small"]
    check_outputs([first, head, small])


def test_random_requests_with_aborts_leak_nothing(tmp_path: Path) -> None:
    rng = random.Random(4)
    config = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=32, max_head_skips=3)
    h = Harness(tmp_path, config, num_blocks=24, block_size=4,
                pages={"a": 2, "b": 2, "c": 3, "d": 4}, num_pages=6)
    prefixes = [[rng.randrange(1000) for _ in range(30)] for _ in range(4)]
    requests: list[Request] = []
    while len(requests) < 1000 or h.sched.has_unfinished():
        for _ in range(rng.choice([0, 1, 1, 2, 3]) if len(requests) < 1000 else 0):
            prompt = rng.choice(prefixes)[:rng.randint(1, 30)] + [rng.randrange(1000)] * rng.randint(0, 8)
            requests.append(h.add(f"q{len(requests)}", prompt, rng.choice([None, "a", "b", "c", "d"]),
                                  max_new_tokens=rng.randint(1, 12)))
        live = [r for r in requests[-40:] if not r.is_finished]
        if live and rng.random() < 0.15:
            victim = rng.choice(live)
            assert h.sched.abort(victim.request_id) is victim and victim.finish_reason is FinishReason.ABORTED
            assert h.sched.abort(victim.request_id) is None
        h.step()
        assert h.steps < 20_000
    h.assert_no_leaks()
    done = [r for r in requests if r.finish_reason is not FinishReason.ABORTED]
    assert len(done) > 500 and h.sched.stats().num_preemptions > 0
    check_outputs(done)


def _stream_with_blocked_b(tmp_path: Path, max_head_skips: int, steps_after_b: int) -> tuple[Harness, Request]:
    """A steady stream of "a" requests keeps "a" pinned; "b" cannot get pages while it is."""
    config = SchedulerConfig(max_num_batched_tokens=256, max_head_skips=max_head_skips)
    h = Harness(tmp_path, config, pages={"a": 3, "b": 3}, num_pages=4)
    b = None
    for i in range(5 + steps_after_b):
        if b is None or b.status is RequestStatus.WAITING:
            h.add(f"a{i}", [i, 1, 2, 3], "a", max_new_tokens=6)
        if i == 5:
            b = h.add("b", [9, 9, 9], "b", max_new_tokens=2)
        h.step()
    assert b is not None
    return h, b


@pytest.mark.parametrize("max_head_skips", [0, 4])
def test_blocked_head_is_bypassed_a_bounded_number_of_times(tmp_path: Path, max_head_skips: int) -> None:
    h, b = _stream_with_blocked_b(tmp_path, max_head_skips, steps_after_b=40)
    assert b.status is not RequestStatus.WAITING and b.skipped == max_head_skips
    # max_head_skips bypasses, then the running "a" requests (6 steps each) drain.
    assert h.admitted_at["b"] - 5 <= max_head_skips + 6 + 2
    bypassed = [r for r in h.sched.running + tuple(h.finished) if r.request_id.startswith("a")
                and int(r.request_id[1:]) > 5 and h.admitted_at[r.request_id] < h.admitted_at["b"]]
    assert len(bypassed) == max_head_skips
    h.run()
    check_outputs(h.finished)


def test_without_the_bound_the_stream_bypasses_b(tmp_path: Path) -> None:
    h, b = _stream_with_blocked_b(tmp_path, max_head_skips=10**6, steps_after_b=40)
    assert b.status is RequestStatus.WAITING and b.skipped == 39  # every "a" added after it got past it
    h.run()  # the stream stops: "a" drains and "b" finally runs
    check_outputs(h.finished)


def test_adapter_load_failure_fails_only_that_request(tmp_path: Path) -> None:
    h = Harness(tmp_path, SchedulerConfig())
    h.backend.fail_load.add("b")
    good = [h.add("g1", [1, 2, 3], "a", max_new_tokens=4), h.add("g2", [4, 5], None, max_new_tokens=4)]
    bad = h.add("bad", [1, 2, 3], "b")
    missing = h.add("missing", [1, 2, 3], "nope")
    out = h.step()
    assert out.failed == (bad, missing)
    assert isinstance(bad.error, AdapterError) and isinstance(missing.error, AdapterError)
    assert bad.is_finished and h.sched.abort("bad") is None and h.sched.get("bad") is None
    h.run()
    check_outputs(good)


def test_prefix_cache_is_per_adapter(tmp_path: Path) -> None:
    h = Harness(tmp_path, SchedulerConfig(), block_size=4)
    prompt = list(range(100, 120))
    first = h.add("first", prompt, "a", max_new_tokens=3)
    h.run()
    same = h.add("same", prompt[:16] + [7, 7], "a", max_new_tokens=3)
    other = h.add("other", prompt, "b", max_new_tokens=3)
    base = h.add("base", prompt, None, max_new_tokens=3)
    h.run()
    assert first.num_cached_tokens == 0 and same.num_cached_tokens == 16
    assert other.num_cached_tokens == 0 and base.num_cached_tokens == 0
    check_outputs([first, same, other, base])


def test_abort_frees_at_once_wherever_the_request_is(tmp_path: Path) -> None:
    h = Harness(tmp_path, SchedulerConfig(max_num_seqs=1))
    running = h.add("run", list(range(10)), "a")
    waiting = h.add("wait", [1, 2], "b")
    out = h.sched.schedule()
    assert h.bm.num_used_blocks == 3 and h.adapters.pinned_count() == 1
    assert h.sched.abort("run") is running and running.finish_reason is FinishReason.ABORTED
    assert h.bm.num_used_blocks == 0 and h.adapters.pinned_count() == 0
    assert h.sched.on_step_done(out, h.runner.run(out)) == []  # its in-flight chunk is ignored
    assert h.sched.abort("wait") is waiting and h.sched.num_waiting == 0
    assert h.sched.abort("unknown") is None and not h.sched.has_unfinished()
    h.sched.check_invariants()


def test_add_refusals(tmp_path: Path) -> None:
    h = Harness(tmp_path, SchedulerConfig(max_model_len=32, max_num_batched_tokens=16, chunked_prefill=False),
                num_blocks=8)
    h.add("x", [1], None)
    with pytest.raises(DuplicateRequestError, match="already in use"):
        h.add("x", [1], None)
    h.add("y", [1], "a")
    with pytest.raises(RequestError, match="max_model_len") as info:
        h.add("long", [1] * 20, None, max_new_tokens=13)
    assert info.value.field == "prompt"
    with pytest.raises(RequestError, match="max_num_batched_tokens"):
        h.add("wide", [1] * 17, None, max_new_tokens=1)
    h.step()
    h.add("z", [1], None)
    with pytest.raises(RequestError, match="adapter cache") as info:
        Scheduler(SchedulerConfig(), BlockManager(8, 4), None).add(Request("r", [1], adapter_id="a"))
    assert info.value.field == "adapter_id"
    with pytest.raises(RequestError, match="num_blocks"):
        Scheduler(SchedulerConfig(), BlockManager(2, 4), None).add(Request("r", [1] * 8))
    for bad in ({"max_num_seqs": 0}, {"chunked_prefill": 1}, {"max_head_skips": 1.5}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SchedulerConfig(**bad)
    h.run()


def test_scheduler_config_is_a_view_of_the_engine_config() -> None:
    from dataclasses import fields

    from engine.config import EngineConfig

    engine_fields = {f.name for f in fields(EngineConfig)}
    assert {f.name for f in fields(SchedulerConfig)} <= engine_fields  # one owner of every setting
    cfg = EngineConfig(max_num_seqs=3, max_num_batched_tokens=40, chunked_prefill=False, max_head_skips=7,
                       max_model_len=512, max_waiting=5)
    assert cfg.scheduler_config(100) == SchedulerConfig(max_num_seqs=3, max_num_batched_tokens=40,
                                                        max_model_len=100, chunked_prefill=False, max_head_skips=7)
