"""Adapter faults, KV exhaustion and crash containment (items 4, 5 and 8 of the reliability suite), against
in-process servers on 127.0.0.1. Security checks (item 7) are in tests/reliability/test_security.py.

Documented behaviour checked here:
* a broken adapter is refused with a clear status (FAILED_PRECONDITION / INVALID_ARGUMENT / NOT_FOUND) at the
  first request or LoadAdapter that reads it, and every other adapter keeps serving meanwhile;
* an adapter directory deleted or rewritten while the adapter is cached: the cached copy keeps serving until it is
  evicted or unloaded (deleted: NOT_FOUND after that; rewritten: Unload + Load picks up the new weights under a new
  generation);
* UnloadAdapter never waits: FAILED_PRECONDITION (ADAPTER_BUSY) while running requests pin the adapter; a queued
  request of an unloaded *alias* fails with NOT_FOUND; an id that is a directory is loaded again just in time.
"""
from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch
from safetensors.torch import load_file, save_file

from clients.aspen.v1 import aspen_pb2 as pb
from clients.client import AspenClient, build_request
from engine import LLMEngine, SamplingParams
from tests.helpers.adapters import make_peft_adapter
from tests.helpers.metrics import report
from tests.helpers.server import GREEDY, ServerThread, private_adapter_root, shared_assets, wait_engine_idle
from tests.helpers.statuses import check_client_error, details
from tests.helpers.tiny_models import make_checkpoint

ST = "adapter_model.safetensors"
PROMPT = "The quick brown fox"


def _copy(ads: str, src: str, dst: str) -> str:
    shutil.copytree(os.path.join(ads, src), os.path.join(ads, dst))
    return os.path.join(ads, dst)


def make_faulty_adapters(ads: str, work: str) -> None:
    """Broken adapters under the adapter root ``ads``; ``work`` is a scratch directory outside it."""
    with open(os.path.join(ads, "a1", ST), "rb") as f:
        data = f.read()
    with open(os.path.join(_copy(ads, "a1", "corrupt"), ST), "wb") as f:
        f.write(os.urandom(len(data)))
    with open(os.path.join(_copy(ads, "a1", "truncated"), ST), "wb") as f:
        f.write(data[: len(data) // 2])
    tensors = load_file(os.path.join(ads, "a1", ST))
    key = next(k for k in tensors if "lora_A" in k)
    tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] - 1)
    save_file(tensors, os.path.join(_copy(ads, "a1", "wrong_shape"), ST))
    other = make_checkpoint(os.path.join(work, "other-base"), "llama", hidden_size=32, intermediate_size=64)
    make_peft_adapter(other, os.path.join(ads, "wrong_base"), seed=4, r=4, lora_alpha=8,
                      target_modules=["q_proj", "v_proj"])
    renamed = _copy(ads, "a1", "renamed_base")  # same shapes, another base's name: a warning only
    with open(os.path.join(renamed, "adapter_config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(renamed, "adapter_config.json"), "w") as f:
        json.dump({**cfg, "base_model_name_or_path": "someone/else-7b"}, f)
    pickled = _copy(ads, "a1", "pickle_only")
    torch.save(load_file(os.path.join(pickled, ST)), os.path.join(pickled, "adapter_model.bin"))
    os.remove(os.path.join(pickled, ST))


@pytest.fixture(scope="module")
def fault_server(tmp_path_factory):
    work = tmp_path_factory.mktemp("faults")
    assets = private_adapter_root(shared_assets(tmp_path_factory), work)
    make_faulty_adapters(assets["adapters"], str(work))
    s = ServerThread(assets, engine={"max_model_len": 256})
    s.ads = assets["adapters"]
    with AspenClient(s.address, timeout=30) as c:
        s.reference = {a: c.generate(PROMPT, a, max_new_tokens=8, **GREEDY).token_ids
                       for a in (None, "a1", "team/a2", "a3")}
    yield s
    s.stop()


class Background:
    """Greedy requests on healthy adapters in a loop (bounded), each checked against its reference."""

    def __init__(self, server: ServerThread, adapters=(None, "a1", "team/a2"), max_requests: int = 400):
        self.server, self.adapters, self.max_requests = server, adapters, max_requests
        self.stop, self.ok, self.bad = threading.Event(), 0, []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        with AspenClient(self.server.address, timeout=30) as c:
            for i in range(self.max_requests):
                if self.stop.is_set():
                    break
                a = self.adapters[i % len(self.adapters)]
                try:
                    ids = [t for m in c.stream(PROMPT, a, max_new_tokens=8, **GREEDY) for t in m.token_ids]
                    ok = ids == list(self.server.reference[a])
                except grpc.RpcError as e:
                    ok, ids = False, f"{e.code().name}: {e.details()}"
                self.ok += ok
                if not ok:
                    self.bad.append((a, ids))

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(60)


FAULTS = {  # adapter id -> (status, detail type or field, words the message must contain)
    "corrupt": (grpc.StatusCode.FAILED_PRECONDITION, "ADAPTER_INCOMPATIBLE", "safetensors"),
    "truncated": (grpc.StatusCode.FAILED_PRECONDITION, "ADAPTER_INCOMPATIBLE", "safetensors"),
    "wrong_shape": (grpc.StatusCode.FAILED_PRECONDITION, "ADAPTER_INCOMPATIBLE", "shape"),
    "wrong_base": (grpc.StatusCode.FAILED_PRECONDITION, "ADAPTER_INCOMPATIBLE", "shape"),
    "pickle_only": (grpc.StatusCode.FAILED_PRECONDITION, "ADAPTER_INCOMPATIBLE", "pickle"),
    "bad": (grpc.StatusCode.FAILED_PRECONDITION, "ADAPTER_INCOMPATIBLE", "rank"),
    "missing": (grpc.StatusCode.NOT_FOUND, "adapter", "missing"),
}


def _check_fault(err: grpc.RpcError, adapter: str, expected) -> None:
    code, kind, words = expected
    assert err.code() is code, (adapter, err.code(), err.details())
    check_client_error(err)
    d = details(err)
    if code is grpc.StatusCode.FAILED_PRECONDITION:
        v = d["PreconditionFailure"].violations[0]
        assert (v.type, v.subject) == (kind, f"adapter/{adapter}"), v
    else:
        assert d["ResourceInfo"].resource_name == adapter
    assert words in err.details(), err.details()


def test_broken_adapters_get_clear_statuses_while_others_keep_serving(fault_server):
    outcomes: Counter = Counter()
    with Background(fault_server) as bg, AspenClient(fault_server.address, timeout=30) as c:
        for _ in range(2):  # the second round hits whatever the first one left behind
            for adapter, expected in FAULTS.items():
                for name, call in (("generate", lambda a=adapter: c.generate(PROMPT, a, max_new_tokens=4)),
                                   ("stream", lambda a=adapter: list(c.stream(PROMPT, a, max_new_tokens=4))),
                                   ("load", lambda a=adapter: c.load_adapter(a))):
                    with pytest.raises(grpc.RpcError) as info:
                        call()
                    _check_fault(info.value, adapter, expected)
                    assert os.path.realpath(fault_server.ads) not in info.value.details()  # server paths redacted
                    outcomes[f"{name}:{info.value.code().name}"] += 1
        renamed = c.generate(PROMPT, "renamed_base", max_new_tokens=8, **GREEDY)  # same shapes: served
        assert renamed.token_ids == fault_server.reference["a1"]
        listed = {a.adapter_id: a for a in c.list_adapters()}
        assert not any(listed[a].registered for a in FAULTS if a in listed)  # nothing half-loaded stays
        while bg.ok < 10 and not bg.bad and bg.thread.is_alive():
            time.sleep(0.05)
    assert not bg.bad and bg.ok >= 10, bg.bad
    state = wait_engine_idle(fault_server)
    assert (state["kv_blocks_used"], state["adapter_pins"], state["tracked"]) == (0, 0, 0)
    report("adapter-faults", refused=dict(outcomes), healthy_requests_meanwhile=bg.ok)


def test_adapter_directory_deleted_or_changed_while_cached(fault_server):
    ads, ref = fault_server.ads, fault_server.reference
    llm = fault_server.server.engine
    with Background(fault_server) as bg, AspenClient(fault_server.address, timeout=30) as c:
        # deleted: the cached copy keeps serving until evicted, then NOT_FOUND
        doomed = _copy(ads, "a1", "doomed")
        assert c.generate(PROMPT, "doomed", max_new_tokens=8, **GREEDY).token_ids == ref["a1"]
        shutil.rmtree(doomed)
        assert c.generate(PROMPT, "doomed", max_new_tokens=8, **GREEDY).token_ids == ref["a1"]
        llm.adapter_cache.evict_unpinned()  # as memory pressure would
        with pytest.raises(grpc.RpcError) as info:
            c.generate(PROMPT, "doomed", max_new_tokens=8)
        assert info.value.code() is grpc.StatusCode.NOT_FOUND and "doomed" in info.value.details()
        c.unload_adapter("doomed")
        with pytest.raises(grpc.RpcError) as info:
            c.load_adapter("doomed")
        assert info.value.code() is grpc.StatusCode.NOT_FOUND
        # rewritten with other weights: cached copy until Unload + Load, which bumps the generation
        shifty = _copy(ads, "a1", "shifty")
        first = c.load_adapter("shifty")
        assert c.generate(PROMPT, "shifty", max_new_tokens=8, **GREEDY).token_ids == ref["a1"]
        shutil.rmtree(shifty)
        shutil.copytree(os.path.join(ads, "a3"), shifty)
        assert c.generate(PROMPT, "shifty", max_new_tokens=8, **GREEDY).token_ids == ref["a1"]
        c.unload_adapter("shifty")
        again = c.load_adapter("shifty")
        assert again.generation > first.generation and again.rank == 2
        assert c.generate(PROMPT, "shifty", max_new_tokens=8, **GREEDY).token_ids == ref["a3"]
        # rewritten with garbage: cached copy serves; a reload fails cleanly and leaves nothing registered
        rotting = _copy(ads, "a1", "rotting")
        assert c.generate(PROMPT, "rotting", max_new_tokens=8, **GREEDY).token_ids == ref["a1"]
        with open(os.path.join(rotting, ST), "wb") as f:
            f.write(b"\0" * 64)
        assert c.generate(PROMPT, "rotting", max_new_tokens=8, **GREEDY).token_ids == ref["a1"]
        # the device copy alone evicted (device pressure): the host copy goes back to the device, from private
        # memory (a mapping of the file, now 64 bytes long, would kill the server with SIGBUS here)
        cache = llm.adapter_cache
        with cache._lock:
            cache._drop_device(cache._entries["rotting"], evicted=True)
        assert cache.tier("rotting") == "host"
        assert c.generate(PROMPT, "rotting", max_new_tokens=8, **GREEDY).token_ids == ref["a1"]
        c.unload_adapter("rotting")
        with pytest.raises(grpc.RpcError) as info:
            c.load_adapter("rotting")
        _check_fault(info.value, "rotting", FAULTS["corrupt"])
        assert not {a.adapter_id: a for a in c.list_adapters()}["rotting"].registered
    assert not bg.bad and bg.ok > 0, bg.bad


def test_concurrent_load_unload_of_an_adapter_in_use(fault_server):
    """Load/Unload loops on ids that requests use at the same time: every outcome is a clear status, every
    request that completes has the right output, and nothing stays pinned."""
    c = AspenClient(fault_server.address, timeout=30)
    _copy(fault_server.ads, "team/a2", "hot")
    expected = list(fault_server.reference["team/a2"])
    outcomes: Counter = Counter()
    lock = threading.Lock()

    def count(key):
        with lock:
            outcomes[key] += 1

    def churn(adapter_id, path, rounds=60):
        for _ in range(rounds):
            for name, call in (("load", lambda: c.load_adapter(adapter_id, path)),
                               ("unload", lambda: c.unload_adapter(adapter_id))):
                try:
                    call()
                    count(f"{name}:OK")
                except grpc.RpcError as e:
                    assert e.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND), e
                    count(f"{name}:{check_client_error(e).name}")

    def use(adapter_id, rounds=25, allow_not_found=False):
        for i in range(rounds):
            try:
                if i % 2:
                    msgs = list(c.stream(PROMPT, adapter_id, max_new_tokens=8, **GREEDY))
                    assert msgs[-1].finish_reason == pb.FINISH_REASON_LENGTH, msgs[-1]
                    ids = [t for m in msgs for t in m.token_ids]
                else:
                    ids = list(c.generate(PROMPT, adapter_id, max_new_tokens=8, **GREEDY).token_ids)
                assert ids == expected, (adapter_id, ids)
                count(f"request:{adapter_id}:OK")
            except grpc.RpcError as e:  # an alias unloaded between admission checks: cleanly NOT_FOUND
                assert allow_not_found and e.code() is grpc.StatusCode.NOT_FOUND, (e.code(), e.details())
                count(f"request:{adapter_id}:NOT_FOUND")

    def engine_churn(rounds=1500):  # no requests on "a3": unloads succeed and race the loads' bookkeeping
        llm = fault_server.server.engine
        for i in range(rounds):
            try:
                (llm.load_adapter if i % 2 else llm.unload_adapter)("a3")
            except Exception as e:  # noqa: BLE001 -- anything but these two is a bug
                assert type(e).__name__ in ("AdapterNotFoundError", "AdapterBusyError"), repr(e)
                count(f"engine:{type(e).__name__}")

    with Background(fault_server, adapters=(None, "a1")) as bg, ThreadPoolExecutor(8) as pool:
        jobs = [pool.submit(churn, "hot", None), pool.submit(churn, "hot", None),
                pool.submit(churn, "alias/hot", "team/a2"), pool.submit(use, "hot"), pool.submit(use, "hot"),
                pool.submit(use, "alias/hot", allow_not_found=True), pool.submit(engine_churn),
                pool.submit(engine_churn)]
        for j in jobs:
            j.result(timeout=300)
    c.close()
    assert not bg.bad and bg.ok > 0, bg.bad
    assert outcomes["request:hot:OK"] == 50 and outcomes["unload:OK"] > 0
    state = wait_engine_idle(fault_server)
    assert (state["kv_blocks_used"], state["adapter_pins"], state["tracked"]) == (0, 0, 0)
    report("adapter-load-unload-race", outcomes=dict(sorted(outcomes.items())), healthy_requests_meanwhile=bg.ok)


def test_a_blocking_call_raising_stopiteration_fails_instead_of_hanging(fault_server):
    def broken():
        return next(iter(()))  # StopIteration cannot be set on an asyncio future: a caller would hang

    with pytest.raises(RuntimeError, match="StopIteration"):
        fault_server.run(fault_server.server.run_blocking(broken), timeout=10)


# ---------------------------------------------------------------------------------------------- KV exhaustion
def test_kv_exhaustion_preempts_and_resumes_with_unchanged_outputs(tmp_path_factory):
    assets = shared_assets(tmp_path_factory)
    s = ServerThread(assets, engine={"num_kv_blocks": 12, "block_size": 16, "max_num_seqs": 8, "max_model_len": 192})
    try:
        prompts = [(f"Request {i}: the small cat sat by the warm fire", [None, "a1", "team/a2"][i % 3])
                   for i in range(8)]
        params = {"max_new_tokens": 100, **GREEDY}
        with AspenClient(s.address, timeout=120) as c:
            alone = [list(c.generate(p, a, **params).token_ids) for p, a in prompts]  # one at a time: no pressure
            assert s.server.engine.scheduler.stats().num_preemptions == 0
            demand = sum(len(c.tokenize(p)) + params["max_new_tokens"] for p, _ in prompts)
            with ThreadPoolExecutor(len(prompts)) as pool:
                together = list(pool.map(lambda pa: [t for m in c.stream(pa[0], pa[1], **params)
                                                     for t in m.token_ids], prompts))
        preemptions = s.server.engine.scheduler.stats().num_preemptions
        assert preemptions > 0 and together == alone
        state = wait_engine_idle(s)
        assert (state["kv_blocks_used"], state["adapter_pins"], state["tracked"]) == (0, 0, 0)
        report("kv-exhaustion", requests=len(prompts), demand_tokens=demand, pool_tokens=12 * 16,
               preemptions=preemptions, outputs_unchanged=True)
    finally:
        s.stop()


def test_request_accepted_under_queue_cap_is_not_refused_after_a_preemption(tmp_path_factory):
    """add_request admits under ``max_waiting``; a preemption in the step before the add is applied must not make
    the scheduler refuse it then (which would fail the request with an internal error)."""
    eng = LLMEngine(model=shared_assets(tmp_path_factory)["base"], progress=False, num_kv_blocks=8, block_size=16,
                    max_num_seqs=2, max_waiting=1, max_model_len=128)
    params = SamplingParams(max_new_tokens=100, temperature=0.0, ignore_eos=True)
    outs = []
    for prompt in ([5] * 20, [6] * 20):
        eng.add_request(prompt, params)
        outs += eng.step()
    bm, sched, late = eng.block_manager, eng.scheduler, []
    real_schedule = sched.schedule

    def schedule():  # another thread's add_request, checked just before the step that preempts
        running = sched.running
        need = sum(bm.blocks_needed(r.num_tokens) - len(bm.block_table(r.request_id)) for r in running)
        if not late and need > bm.num_free_blocks:
            late.append(eng.add_request([7] * 20, params))
        return real_schedule()

    sched.schedule = schedule
    for _ in range(2000):
        if not eng.has_work():
            break
        outs += eng.step()
    final = {o.request_id: o for o in outs if o.finished}
    assert late and final[late[0]].finish_reason == "length", final[late[0]]
    assert sched.stats().num_preemptions > 0 and eng.check_invariants()["kv_blocks_used"] == 0


# ---------------------------------------------------------------------------------------------- crash containment
def _stream_until_running(c: AspenClient, prompt: str, rid: str, max_new_tokens: int = 200):
    stream = c.generation.GenerateStream(build_request(prompt, None, rid, max_new_tokens=max_new_tokens, **GREEDY),
                                         timeout=120)
    return stream, next(stream)


def test_exception_in_a_step_fails_only_that_steps_requests(tmp_path_factory):
    assets = shared_assets(tmp_path_factory)
    s = ServerThread(assets, engine={"max_num_seqs": 2, "max_model_len": 256})
    llm = s.server.engine
    try:
        with AspenClient(s.address, timeout=120) as c:
            ref_c = list(c.generate("waiting request", max_new_tokens=20, **GREEDY).token_ids)
            ref_b = list(c.generate("other request", max_new_tokens=60, **GREEDY).token_ids)
            # 1) the model step raises: both running requests fail, the queued one runs afterwards
            a, first_a = _stream_until_running(c, "running stream", "crash-a")
            with ThreadPoolExecutor(2) as pool:
                b = pool.submit(c.generate, "running unary", None, request_id="crash-b", max_new_tokens=200, **GREEDY)
                deadline = time.monotonic() + 30
                while llm.scheduler.num_running < 2 and time.monotonic() < deadline:
                    time.sleep(0.01)
                waiting = c.generation.GenerateStream(build_request("waiting request", None, "crash-c",
                                                                    max_new_tokens=20, **GREEDY), timeout=120)
                while llm.scheduler.num_waiting + len(llm._commands) < 1 and time.monotonic() < deadline:
                    time.sleep(0.01)
                real_run, calls = llm.runner.run, []

                def faulty(*args, **kwargs):
                    if not calls:
                        calls.append(1)
                        raise RuntimeError("injected fault: secret=/etc/aspen/token")
                    return real_run(*args, **kwargs)

                llm.runner.run = faulty
                try:
                    last_a = [first_a, *a][-1]
                    with pytest.raises(grpc.RpcError) as info:
                        b.result(60)
                    waited = [t for m in waiting for t in m.token_ids]
                finally:
                    llm.runner.run = real_run
            assert last_a.finish_reason == pb.FINISH_REASON_ERROR and "failed inside the engine" in last_a.error
            assert info.value.code() is grpc.StatusCode.INTERNAL and "secret" not in info.value.details()
            assert "secret" not in last_a.error and waited == ref_c
            # 2) one request's post-processing raises (its detokenizer): only that request fails
            x, _ = _stream_until_running(c, "doomed stream", "crash-x")
            y = c.generation.GenerateStream(build_request("other request", None, "crash-y", max_new_tokens=60,
                                                          **GREEDY), timeout=120)
            y_ids = list(next(y).token_ids)
            state = llm._states.get("crash-x")
            assert state is not None

            def broken(token):
                raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected")

            state.detok.add = broken
            last_x = [m for m in x][-1]
            y_ids += [t for m in y for t in m.token_ids]
            assert last_x.finish_reason == pb.FINISH_REASON_ERROR and y_ids == ref_b
            # the server goes on
            assert c.generate("after the faults", max_new_tokens=4).usage.completion_tokens == 4
        assert s.server.state == "serving" and s.server.async_engine.is_running
        state = wait_engine_idle(s)
        assert (state["kv_blocks_used"], state["adapter_pins"], state["tracked"]) == (0, 0, 0)
        report("crash-containment", failed_in_faulty_step=2, queued_request_completed=True,
               per_request_fault_isolated=True)
    finally:
        s.stop()
