"""A disconnect storm over HTTP, as the gRPC cancellation storm (tests/reliability/test_load.py): hundreds of long
completions and chat completions (streamed and unary, base model and adapters) whose clients go away at random
points: after some chunks, before the first one, by a deadline, or mid-way through a unary call. Afterwards no KV block, adapter
pin, engine request or call is held, every dropped request was aborted in the engine, and the server still
serves."""
from __future__ import annotations

import asyncio
import random
import time
from collections import Counter

import httpx
import pytest

from tests.helpers.metrics import report
from tests.helpers.server import ServerThread, shared_assets, wait_engine_idle

STORM_FAST, STORM_SLOW = 500, 3000
ADAPTERS = [None, "a1", "team/a2"]


async def _storm(url: str, base: str, n: int, seed: int, concurrency: int = 32) -> Counter:
    rng = random.Random(seed)
    outcomes: Counter = Counter()
    gate = asyncio.Semaphore(concurrency)

    async def read(client: httpx.AsyncClient, path: str, body: dict, events: int) -> None:
        """Read a stream's events, dropping the connection after ``events`` of them."""
        async with client.stream("POST", f"{url}/{path}", json=body, timeout=60) as r:
            assert r.status_code == 200, await r.aread()
            count = 0
            async for line in r.aiter_lines():
                count += line.startswith("data: ")
                assert line != "data: [DONE]", "a dropped stream finished"
                if count >= events:
                    return

    async def one(client: httpx.AsyncClient, i: int) -> None:
        mode = rng.choice(["close_after", "close_after", "close_first", "deadline", "unary_drop"])
        text = f"storm {i}: the quick brown fox"
        path, prompt = rng.choice([("completions", {"prompt": text}),
                                   ("chat/completions", {"messages": [{"role": "user", "content": text}]})])
        body = {"model": rng.choice(ADAPTERS) or base, **prompt, "max_tokens": rng.randint(300, 440),
                "temperature": 0.0, "ignore_eos": True, "stream": mode != "unary_drop"}
        after = rng.randint(1, 12)
        async with gate:
            try:
                if mode == "close_first":
                    await asyncio.wait_for(client.post(f"{url}/{path}", json=body), rng.uniform(0, 0.01))
                elif mode == "unary_drop":
                    await asyncio.wait_for(client.post(f"{url}/{path}", json=body), rng.uniform(0.05, 0.3))
                elif mode == "deadline":
                    await asyncio.wait_for(read(client, path, body, 10**9), rng.uniform(0.005, 0.2))
                else:
                    await read(client, path, body, after)
                outcomes[mode] += 1
            except asyncio.TimeoutError:
                outcomes[mode] += 1
            except httpx.HTTPError as e:
                outcomes[f"{mode}: UNEXPECTED {type(e).__name__} {e}"] += 1

    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=concurrency * 2)) as client:
        await asyncio.gather(*(one(client, i) for i in range(n)))
    return outcomes


@pytest.fixture(scope="module")
def storm_server(tmp_path_factory):
    s = ServerThread(shared_assets(tmp_path_factory), http=True, engine={"max_num_seqs": 16, "num_kv_blocks": 256})
    yield s
    s.stop()


@pytest.mark.parametrize("n", [pytest.param(STORM_FAST, id="fast"),
                               pytest.param(STORM_SLOW, id="soak", marks=pytest.mark.slow)])
def test_disconnect_storm_leaves_nothing_behind(storm_server, n):
    llm, base = storm_server.server.engine, storm_server.options.model_name
    aborts = []
    real_abort = llm.abort
    llm.abort = lambda rid: (aborts.append(rid), real_abort(rid))[1]
    try:
        started = time.monotonic()
        outcomes = asyncio.run(_storm(storm_server.http_url, base, n, seed=n))
        seconds = time.monotonic() - started
        state = wait_engine_idle(storm_server)
    finally:
        llm.abort = real_abort
    assert sum(outcomes.values()) == n and not [k for k in outcomes if "UNEXPECTED" in k], outcomes
    assert (state["kv_blocks_used"], state["adapter_pins"], state["tracked"], state["in_flight"],
            state["calls"]) == (0, 0, 0, 0, 0), state
    assert llm.scheduler.num_running == llm.scheduler.num_waiting == 0
    # a request dropped before the engine saw it has nothing to abort; every other one was aborted
    assert len(set(aborts)) >= n - outcomes["close_first"], (len(aborts), outcomes)
    done = httpx.post(f"{storm_server.http_url}/completions", timeout=30,
                      json={"model": "a1", "prompt": "after the storm", "max_tokens": 4, "ignore_eos": True})
    assert done.status_code == 200 and done.json()["usage"]["completion_tokens"] == 4
    report(f"http-disconnect-storm-{n}", requests=n, outcomes=dict(sorted(outcomes.items())),
           engine_aborts=len(aborts), seconds=round(seconds, 1))
