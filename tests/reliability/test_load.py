"""Cancellation storm, overload and shutdown (items 2, 3 and 6 of the reliability suite), over 127.0.0.1.

* Storm: streams cancelled by the client, expired by their deadline or dropped with their channel at random
  points; afterwards no KV block, adapter pin or request is held and resident memory is back to its baseline.
* Overload: open-loop arrivals at about 4x the measured capacity of a real ``aspen serve`` for a bounded time:
  refusals are RESOURCE_EXHAUSTED with RetryInfo only, every accepted request gives its reference output, and the
  server's resident memory grows by less than 5% after warm-up.
* Shutdown: SIGTERM with 20 streams in flight: health NOT_SERVING first, all 20 complete, exit 0; a second
  SIGTERM makes the process exit promptly (status 1).
"""
from __future__ import annotations

import asyncio
import random
import signal
import threading
import time
from collections import Counter

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients.aspen.v1 import aspen_pb2 as pb
from clients.aspen.v1 import aspen_pb2_grpc as pb_grpc
from clients.client import AspenClient, build_request
from tests.helpers.metrics import report, rss_bytes
from tests.helpers.server import GREEDY, ServeProcess, ServerThread, shared_assets, wait_engine_idle
from tests.helpers.statuses import details, retry_delay_s

STORM_FAST, STORM_SLOW = 1000, 5000
OVERLOAD_FAST_S, OVERLOAD_SLOW_S = 8.0, 60.0
MAX_OFFERED = 40_000  # hard cap on the requests one overload run offers
ADAPTERS = [None, "a1", "team/a2"]


# ---------------------------------------------------------------------------------------------- storm
async def _storm(address: str, n: int, seed: int, concurrency: int = 32) -> Counter:
    """``n`` long streams, each ended early: cancelled after k messages, cancelled before its first message,
    expired by a short deadline, or dropped with its own channel. Returns how each one ended."""
    rng = random.Random(seed)
    outcomes: Counter = Counter()
    gate = asyncio.Semaphore(concurrency)
    shared = grpc.aio.insecure_channel(address)
    stub = pb_grpc.GenerationServiceStub(shared)

    async def one(i: int) -> None:
        mode = rng.choice(["cancel_after", "cancel_after", "cancel_first", "deadline", "drop_channel"])
        req = build_request(f"storm {i}: the quick brown fox", rng.choice(ADAPTERS), f"storm-{seed}-{i}",
                            max_new_tokens=rng.randint(300, 480), **GREEDY)
        after = 10**9 if mode == "deadline" else rng.randint(1, 12)  # the deadline ends those (<= 0.3 s)
        timeout = rng.uniform(0.005, 0.3) if mode == "deadline" else 60.0
        async with gate:
            channel = grpc.aio.insecure_channel(address) if mode == "drop_channel" else shared
            call = pb_grpc.GenerationServiceStub(channel).GenerateStream(req, timeout=timeout) \
                if channel is not shared else stub.GenerateStream(req, timeout=timeout)
            try:
                if mode == "cancel_first":
                    await asyncio.sleep(rng.uniform(0, 0.01))
                    call.cancel()
                count = 0
                async for msg in call:
                    count += 1
                    assert msg.finish_reason == pb.FINISH_REASON_UNSPECIFIED, msg  # ended early, never finished
                    if count >= after:
                        if mode == "drop_channel":
                            await channel.close(grace=None)
                        else:
                            call.cancel()
                        break
                outcomes[mode] += 1
            except asyncio.CancelledError:
                outcomes[mode] += 1
            except grpc.aio.AioRpcError as e:
                expected = e.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED)
                outcomes[f"{mode}:{e.code().name}" + ("" if expected else f" UNEXPECTED {e.details()}")] += 1
            finally:
                if channel is not shared:
                    await channel.close(grace=None)

    await asyncio.gather(*(one(i) for i in range(n)))
    await shared.close()
    return outcomes


@pytest.fixture(scope="module")
def storm_server(tmp_path_factory):
    s = ServerThread(shared_assets(tmp_path_factory), engine={"max_num_seqs": 16, "num_kv_blocks": 256})
    yield s
    s.stop()


@pytest.mark.parametrize("n", [pytest.param(STORM_FAST, id="fast"),
                               pytest.param(STORM_SLOW, id="soak", marks=pytest.mark.slow)])
def test_cancellation_storm_leaves_nothing_behind(storm_server, n):
    llm = storm_server.server.engine
    aborts = []
    real_abort = llm.abort
    llm.abort = lambda rid: (aborts.append(rid), real_abort(rid))[1]
    try:
        asyncio.run(_storm(storm_server.address, 300, seed=0))  # warm-up: thread pools, allocator, grpc
        wait_engine_idle(storm_server)
        aborts.clear()
        baseline = rss_bytes()
        started = time.monotonic()
        outcomes = asyncio.run(_storm(storm_server.address, n, seed=n))
        seconds = time.monotonic() - started
        state = wait_engine_idle(storm_server)
        after = rss_bytes()
    finally:
        llm.abort = real_abort
    assert sum(outcomes.values()) == n and not [k for k in outcomes if "UNEXPECTED" in k], outcomes
    assert (state["kv_blocks_used"], state["adapter_pins"], state["tracked"], state["in_flight"],
            state["calls"]) == (0, 0, 0, 0, 0), state
    assert storm_server.server.async_engine.num_in_flight == 0 and llm.scheduler.num_running == llm.scheduler.num_waiting == 0
    growth = (after - baseline) / baseline
    assert growth < 0.05, (baseline, after, outcomes)
    with AspenClient(storm_server.address, timeout=30) as c:  # still serving
        assert c.generate("after the storm", "a1", max_new_tokens=4).usage.completion_tokens == 4
    report(f"cancellation-storm-{n}", streams=n, outcomes=dict(sorted(outcomes.items())),
           engine_aborts=len(aborts), seconds=round(seconds, 1), rss_baseline_mib=round(baseline / 2**20, 1),
           rss_after_mib=round(after / 2**20, 1), rss_growth_pct=round(100 * growth, 2))


# ---------------------------------------------------------------------------------------------- overload
PROMPTS = [(f"Overload {i}: Tom took the red ball to the park", ADAPTERS[i % 3]) for i in range(6)]
OVERLOAD_PARAMS = {"max_new_tokens": 16, **GREEDY}


async def _closed_loop(address: str, workers: int, seconds: float) -> int:
    """Requests completed by ``workers`` back-to-back callers in ``seconds`` (the capacity probe)."""
    done, stop = 0, time.monotonic() + seconds
    async with grpc.aio.insecure_channel(address) as ch:
        stub = pb_grpc.GenerationServiceStub(ch)

        async def worker(w: int) -> None:
            nonlocal done
            i = w
            while time.monotonic() < stop:
                prompt, adapter = PROMPTS[i % len(PROMPTS)]
                await stub.Generate(build_request(prompt, adapter, **OVERLOAD_PARAMS), timeout=60)
                done, i = done + 1, i + workers

        await asyncio.gather(*(worker(w) for w in range(workers)))
    return done


async def _open_loop(address: str, rate: float, seconds: float, reference: dict) -> Counter:
    """Poisson arrivals at ``rate``/s for ``seconds``; checks every answer. Returns outcome counts."""
    rng, outcomes = random.Random(7), Counter()
    delays: list[float] = []
    async with grpc.aio.insecure_channel(address) as ch:
        stub = pb_grpc.GenerationServiceStub(ch)

        async def one(i: int) -> None:
            prompt, adapter = PROMPTS[i % len(PROMPTS)]
            req = build_request(prompt, adapter, **OVERLOAD_PARAMS)
            try:
                if i % 2:
                    msgs = [m async for m in stub.GenerateStream(req, timeout=120)]
                    ids, last = [t for m in msgs for t in m.token_ids], msgs[-1]
                else:
                    last = await stub.Generate(req, timeout=120)
                    ids = list(last.token_ids)
                assert last.finish_reason == pb.FINISH_REASON_LENGTH and ids == reference[i % len(PROMPTS)], ids
                outcomes["completed"] += 1
            except grpc.aio.AioRpcError as e:
                assert e.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, (e.code(), e.details())
                delays.append(retry_delay_s(e))
                assert "RetryInfo" in details(e) and delays[-1] > 0
                outcomes["refused"] += 1

        tasks, stop, i = [], time.monotonic() + seconds, 0
        while time.monotonic() < stop and i < MAX_OFFERED:
            tasks.append(asyncio.ensure_future(one(i)))
            i += 1
            await asyncio.sleep(rng.expovariate(rate))
        await asyncio.gather(*tasks)
    outcomes["offered"] = i
    return outcomes


@pytest.mark.parametrize("seconds", [pytest.param(OVERLOAD_FAST_S, id="fast"),
                                     pytest.param(OVERLOAD_SLOW_S, id="soak", marks=pytest.mark.slow)])
def test_overload_refuses_with_retry_info_and_memory_stays_flat(tmp_path, tmp_path_factory, seconds):
    assets = shared_assets(tmp_path_factory)
    server = ServeProcess(assets, tmp_path, "--max-num-seqs", "4", "--max-queue", "4", "--kv-cache-mb", "8",
                          "--max-model-len", "256", "--seed", "0")
    try:
        with AspenClient(server.address, timeout=60) as c:
            reference = [list(c.generate(p, a, **OVERLOAD_PARAMS).token_ids) for p, a in PROMPTS]
        probe_s = 4.0
        asyncio.run(_closed_loop(server.address, 4, 1.0))  # warm-up
        capacity = asyncio.run(_closed_loop(server.address, 4, probe_s)) / probe_s  # requests / s
        asyncio.run(_open_loop(server.address, 4 * capacity, 2.0, reference))  # warm-up of the refusal path
        server.wait_idle()
        baseline = rss_bytes(server.pid)
        outcomes = asyncio.run(_open_loop(server.address, 4 * capacity, seconds, reference))
        idle = server.wait_idle()
        after = rss_bytes(server.pid)
    finally:
        server.signal(signal.SIGTERM)
        code = server.wait(60)
    growth = (after - baseline) / baseline
    assert outcomes["completed"] + outcomes["refused"] == outcomes["offered"]
    assert outcomes["refused"] > 0 and outcomes["completed"] > 0 and not any(idle.values()), (outcomes, idle)
    assert growth < 0.05, (baseline, after)
    assert code == 0, server.log()
    report(f"overload-{seconds:g}s", capacity_rps=round(capacity, 2), offered_rps=round(4 * capacity, 2),
           **dict(outcomes), refused_pct=round(100 * outcomes["refused"] / outcomes["offered"], 1),
           rss_baseline_mib=round(baseline / 2**20, 1), rss_after_mib=round(after / 2**20, 1),
           rss_growth_pct=round(100 * growth, 2))


# ---------------------------------------------------------------------------------------------- shutdown
def _watch_health(address: str, seen: list, stop: threading.Event) -> None:
    """Record (time, status) of every health update until the server goes away."""
    with grpc.insecure_channel(address) as ch:
        try:
            for resp in health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(), timeout=120):
                seen.append((time.monotonic(), resp.status))
                if stop.is_set():
                    break
        except grpc.RpcError:
            pass


def _start_streams(c: AspenClient, n: int, max_new_tokens: int):
    streams = [c.generation.GenerateStream(build_request(f"drain {i}", ADAPTERS[i % 3],
                                                         max_new_tokens=max_new_tokens, **GREEDY), timeout=120)
               for i in range(n)]
    return streams, [next(s) for s in streams]  # every stream has produced a token: in flight


def test_sigterm_drains_20_streams_then_exits_0(tmp_path, tmp_path_factory):
    server = ServeProcess(shared_assets(tmp_path_factory), tmp_path, "--grace-period", "60", "--kv-cache-mb", "16")
    try:
        seen, stop = [], threading.Event()
        watcher = threading.Thread(target=_watch_health, args=(server.address, seen, stop), daemon=True)
        watcher.start()
        with AspenClient(server.address, timeout=120) as c:
            streams, firsts = _start_streams(c, 20, 200)
            sent = time.monotonic()
            server.signal(signal.SIGTERM)
            ends, results = [], []
            for first, s in zip(firsts, streams):
                msgs = [first, *s]
                ends.append(time.monotonic())
                results.append((msgs[-1].finish_reason, sum(len(m.token_ids) for m in msgs)))
            code = server.wait(60)
            exited = time.monotonic()
        stop.set()
        watcher.join(10)
    finally:
        server.kill()
    not_serving = [t for t, status in seen if status == health_pb2.HealthCheckResponse.NOT_SERVING]
    assert results == [(pb.FINISH_REASON_LENGTH, 200)] * 20
    assert not_serving and not_serving[0] < min(ends), (seen, min(ends))
    assert code == 0 and "server stopped (drained)" in server.log(), server.log()
    report("sigterm-drain", streams=20, all_completed=True, health_not_serving_after_s=round(not_serving[0] - sent, 3),
           last_stream_done_after_s=round(max(ends) - sent, 2), exit_code=code, exited_after_s=round(exited - sent, 2))


def test_second_sigterm_forces_a_prompt_exit(tmp_path, tmp_path_factory):
    server = ServeProcess(shared_assets(tmp_path_factory), tmp_path, "--grace-period", "120", "--max-num-seqs", "4")
    try:
        with AspenClient(server.address, timeout=120) as c:
            streams, _ = _start_streams(c, 4, 480)
            queued = [c.generation.GenerateStream(build_request(f"queued {i}", max_new_tokens=480, **GREEDY),
                                                  timeout=120) for i in range(16)]
            server.signal(signal.SIGTERM)
            time.sleep(0.5)
            assert server.proc.poll() is None  # draining: the 480-token streams keep it busy
            forced = time.monotonic()
            server.signal(signal.SIGTERM)
            code = server.wait(30)
            exit_s = time.monotonic() - forced
            ended = Counter()
            for s in streams + queued:
                try:
                    msgs = list(s)
                    ended["finished" if msgs and msgs[-1].finish_reason == pb.FINISH_REASON_LENGTH else "cut"] += 1
                except grpc.RpcError as e:
                    ended[e.code().name] += 1
    finally:
        server.kill()
    assert code == 1 and exit_s < 10, (code, exit_s, server.log())
    assert sum(ended.values()) == 20 and ended["finished"] < 20, ended
    report("second-sigterm", exit_code=code, exit_after_second_signal_s=round(exit_s, 2),
           streams_ended=dict(ended))
