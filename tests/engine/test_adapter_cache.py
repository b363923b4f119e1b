"""AdapterCache and PageAllocator bookkeeping, driven by a fake backend (no torch)."""
from __future__ import annotations

import dataclasses
import os
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from aspen.errors import AdapterError, AdapterNotFoundError, AdapterPathError
from engine.adapters.cache import AdapterBusyError, AdapterCache, CacheStatus
from engine.adapters.page_allocator import PageAllocator

HIT, LOADED, FULL = CacheStatus.HIT, CacheStatus.LOADED, CacheStatus.CACHE_FULL


@dataclass
class FakeHost:
    adapter_id: str
    path: str
    nbytes: int
    num_pages: int


@dataclass
class FakeDevice:
    host: FakeHost
    pages: tuple[int, ...]
    released: bool = False


class FakeBackend:
    """Records calls and checks that live device copies never share a page."""

    def __init__(self, sizes: dict[str, tuple[int, int]], root: Path) -> None:
        self.sizes = sizes  # directory under root -> (nbytes, num_pages)
        self.root = os.path.realpath(root)
        self.fail_load: set[str] = set()
        self.fail_device: set[str] = set()
        self.load_calls: list[tuple[str, str]] = []
        self.device_calls: list[str] = []
        self.released: list[str] = []
        self.live: dict[int, FakeDevice] = {}

    def load_host(self, adapter_id: str, path: str) -> FakeHost:
        self.load_calls.append((adapter_id, path))
        if adapter_id in self.fail_load:
            raise AdapterError(f"adapter {adapter_id!r}: corrupt safetensors (fake)")
        nbytes, pages = self.sizes[os.path.relpath(path, self.root)]
        return FakeHost(adapter_id, path, nbytes, pages)

    def to_device(self, host: FakeHost, pages: list[int]) -> FakeDevice:
        self.device_calls.append(host.adapter_id)
        assert len(pages) == host.num_pages == len(set(pages))
        assert not set(pages) & set(self.live), "backend asked to overwrite pages of a live adapter"
        if host.adapter_id in self.fail_device:
            raise RuntimeError("CUDA out of memory (fake)")
        dev = FakeDevice(host, tuple(pages))
        self.live.update(dict.fromkeys(pages, dev))
        return dev

    def release_device(self, dev: FakeDevice) -> None:
        assert not dev.released, "double release_device"
        dev.released = True
        self.released.append(dev.host.adapter_id)
        for p in dev.pages:
            assert self.live.pop(p) is dev


def resident(be: FakeBackend, handle: FakeDevice) -> bool:
    """Whether ``handle`` is a live device copy: not released, and its pages hold it."""
    return not handle.released and all(be.live.get(p) is handle for p in handle.pages)


def make_cache(
    tmp_path: Path, sizes: dict[str, tuple[int, int]], host_budget: int = 10_000, pages: int = 16
) -> tuple[AdapterCache, FakeBackend]:
    root = tmp_path / "adapters"
    for adapter_id in sizes:
        (root / adapter_id).mkdir(parents=True, exist_ok=True)
        (root / adapter_id / "adapter_config.json").write_text("{}")
    backend = FakeBackend(sizes, root)
    return AdapterCache(str(root), backend, host_budget, pages), backend


def cycle(cache: AdapterCache, adapter_id: str) -> CacheStatus:
    r = cache.acquire(adapter_id)
    assert r.ok
    cache.release(adapter_id)
    return r.status


# ---- PageAllocator ----------------------------------------------------------------------
def test_page_allocator_lifo_reuse_and_errors() -> None:
    a = PageAllocator(8)
    assert a.allocate(3) == [0, 1, 2]
    b = a.allocate(2)
    assert b == [3, 4] and (a.num_free, a.num_used) == (3, 5)
    assert a.allocate(4) is None and a.num_free == 3  # refused: nothing changes
    a.free([1, 0])
    assert a.allocate(1) == [0]  # last freed, first reused (LIFO)
    assert a.allocate(0) == []
    with pytest.raises(ValueError, match="double free"):
        a.free([1])
    with pytest.raises(ValueError, match="not a page"):
        a.free([8])
    with pytest.raises(ValueError, match="twice"):
        a.free([3, 3])
    with pytest.raises(ValueError, match="double free"):
        a.free([3, 1])  # atomic: 3 must stay used
    assert 3 in a.used_pages()
    with pytest.raises(ValueError):
        a.allocate(-1)
    a.check_invariants()
    a.free(list(a.used_pages()))
    assert a.num_free == 8 and a.num_used == 0
    a.check_invariants()


# ---- tiers ------------------------------------------------------------------------------
def test_tier_transitions_disk_host_device(tmp_path: Path) -> None:
    cache, be = make_cache(tmp_path, {"a": (100, 2), "b": (100, 2)}, host_budget=150, pages=2)
    assert cache.tier("a") == "disk"
    r = cache.acquire("a")
    assert r.status is LOADED and r.generation == 0 and resident(be, r.handle)
    assert r.handle.pages == (0, 1) and cache.tier("a") == "device"
    cache.release("a")
    assert cycle(cache, "a") is HIT and len(be.load_calls) == 1
    assert cycle(cache, "b") is LOADED  # device holds 2 pages: a is evicted; host holds 150 bytes: a too
    assert cache.tier("a") == "disk" and cache.tier("b") == "device"
    assert be.released == ["a"]
    cache.evict_unpinned()
    assert cache.tier("b") == "disk" and cache.stats().bytes_host == 0 and cache.stats().pages_device == 0
    cache.prefetch("a")
    assert cache.tier("a") == "device"
    s = cache.stats()
    assert (s.loads, s.device_loads, s.hits, s.misses) == (3, 3, 1, 2)
    cache.check_invariants()


def test_device_eviction_keeps_host_copy(tmp_path: Path) -> None:
    cache, be = make_cache(tmp_path, {"a": (10, 2), "b": (10, 2)}, host_budget=100, pages=2)
    cycle(cache, "a")
    cycle(cache, "b")
    assert cache.tier("a") == "host"
    assert cycle(cache, "a") is LOADED
    assert [c[0] for c in be.load_calls] == ["a", "b"]  # a came back from host, not disk
    assert be.device_calls == ["a", "b", "a"]


def test_device_lru_eviction_order(tmp_path: Path) -> None:
    sizes = {k: (1, 1) for k in "abcdef"}
    cache, be = make_cache(tmp_path, sizes, pages=4)
    for k in "abcd":
        cycle(cache, k)
    assert cycle(cache, "a") is HIT  # a becomes most recently used
    cycle(cache, "e")
    cycle(cache, "f")
    assert be.released == ["b", "c"]
    assert [cache.tier(k) for k in "abcdef"] == ["device", "host", "host", "device", "device", "device"]
    per = cache.stats().per_adapter
    assert per["b"].evictions_device == 1 and per["a"].evictions_device == 0 and per["a"].hits == 1


def test_host_lru_eviction_order(tmp_path: Path) -> None:
    sizes = {k: (100, 1) for k in "abcde"}
    cache, _ = make_cache(tmp_path, sizes, host_budget=300, pages=1)
    for k in "abc":
        cycle(cache, k)
    cycle(cache, "a")  # a reloaded from host, now MRU in both tiers
    cycle(cache, "d")
    cycle(cache, "e")
    assert [cache.tier(k) for k in "abcde"] == ["host", "disk", "disk", "host", "device"]
    assert cache.stats().evictions_host == 2 and cache.stats().bytes_host == 300
    assert cache.stats().per_adapter["b"].evictions_host == 1


# ---- pinning and CACHE_FULL -------------------------------------------------------------
def test_pinning_blocks_eviction_and_cache_full_changes_nothing(tmp_path: Path) -> None:
    cache, be = make_cache(tmp_path, {"a": (10, 2), "b": (10, 2), "c": (10, 1)}, pages=4)
    ha, hb = cache.acquire("a").handle, cache.acquire("b").handle
    before = (cache.stats().pages_device, cache.pinned_count(), list(be.live))
    r = cache.acquire("c")
    assert r.status is FULL and r.handle is None and not r.ok
    assert not cache.can_acquire("c")
    assert (cache.stats().pages_device, cache.pinned_count(), list(be.live)) == before
    assert be.device_calls == ["a", "b"] and be.released == []
    assert cache.tier("c") == "host"  # the copy loaded to learn its size is kept
    assert cache.acquire("c").status is FULL and len(be.load_calls) == 3  # no second disk read
    assert cache.prefetch("c") is FULL  # never raises
    assert cache.stats().cache_full == 2 and cache.pinned_count() == 2
    cache.release("a")
    assert cache.can_acquire("c")
    r = cache.acquire("c")
    assert r.status is LOADED and set(r.handle.pages) <= set(ha.pages)
    assert cache.tier("a") == "host" and resident(be, hb)  # pinned all along: the same copy
    for k in "bc":
        cache.release(k)
    assert cache.pinned_count() == 0
    cache.check_invariants()


def test_cache_full_with_known_sizes_skips_disk(tmp_path: Path) -> None:
    cache, be = make_cache(tmp_path, {"a": (10, 4), "b": (10, 4)}, host_budget=10, pages=4)
    cycle(cache, "b")
    cache.acquire("a")  # evicts b from both tiers
    assert cache.tier("b") == "disk" and not cache.can_acquire("b")
    assert cache.acquire("b").status is FULL
    assert [c[0] for c in be.load_calls] == ["b", "a"]  # b's sizes are remembered: no reload attempted


def test_host_copies_of_pinned_adapters_are_protected(tmp_path: Path) -> None:
    cache, _ = make_cache(tmp_path, {"a": (100, 1), "b": (100, 1), "c": (100, 1)}, host_budget=200, pages=8)
    cache.acquire("a")
    cache.acquire("b")
    assert cache.acquire("c").status is FULL  # host tier full of pinned copies
    assert cache.tier("c") == "disk" and cache.stats().bytes_host == 200
    cache.release("a")
    assert cache.acquire("c").status is LOADED
    assert cache.tier("a") == "device"  # host copy evicted, device copy stays
    assert [i.nbytes for i in cache.info()] == [100, 100, 100]
    assert cache.stats().bytes_host == 200
    cache.check_invariants()


def test_release_and_unregister_errors(tmp_path: Path) -> None:
    cache, be = make_cache(tmp_path, {"a": (10, 1)})
    with pytest.raises(ValueError, match="not pinned"):
        cache.release("a")
    cache.acquire("a")
    cache.acquire("a")
    with pytest.raises(AdapterBusyError, match="2 in-flight"):
        cache.unregister("a")
    assert cache.tier("a") == "device" and be.released == []
    cache.release("a")
    with pytest.raises(AdapterBusyError):
        cache.unregister("a")
    cache.release("a")
    with pytest.raises(ValueError):
        cache.release("a")
    cache.unregister("a")
    assert be.released == ["a"] and cache.stats().pages_device == 0 and cache.stats().bytes_host == 0
    assert cache.info() == [] and cache.stats().evictions_device == 0
    with pytest.raises(AdapterNotFoundError):
        cache.unregister("a")
    assert issubclass(AdapterBusyError, AdapterError)


# ---- sizes ------------------------------------------------------------------------------
def test_adapters_that_can_never_fit_raise_naming_sizes(tmp_path: Path) -> None:
    cache, _ = make_cache(tmp_path, {"huge": (5000, 1), "wide": (10, 17), "ok": (10, 1)}, host_budget=4096)
    with pytest.raises(AdapterError, match="5000 bytes.*4096 bytes"):
        cache.acquire("huge")
    with pytest.raises(AdapterError, match="17 device pages.*only 16 pages"):
        cache.acquire("wide")
    with pytest.raises(AdapterError, match="17 device pages"):
        cache.prefetch("wide")
    assert cache.can_acquire("wide")  # acquire surfaces the error rather than waiting forever
    assert cache.tier("huge") == cache.tier("wide") == "disk"
    assert cache.stats().load_failures == 3 and cache.stats().loads == 0
    assert cycle(cache, "ok") is LOADED
    cache.check_invariants()


def test_mixed_rank_page_demands_reuse_freed_pages(tmp_path: Path) -> None:
    # pages = rank * 2 target modules / 8 ranks per page
    sizes = {f"r{rank}": (rank * 1000, rank * 2 // 8) for rank in (4, 8, 16, 64)} | {"r64b": (64_000, 16)}
    cache, be = make_cache(tmp_path, sizes, host_budget=1_000_000, pages=24)
    r64 = cache.acquire("r64").handle
    r16 = cache.acquire("r16").handle
    assert len(r64.pages) == 16 and len(r16.pages) == 4 and cache.stats().pages_device == 20
    cache.release("r16")
    r8 = cache.acquire("r8").handle
    r4 = cache.acquire("r4").handle
    assert len(r8.pages) == 2 and len(r4.pages) == 1
    assert cache.tier("r16") == "device"  # 4 pages were still free: nothing evicted
    r64b = cache.acquire("r64b")
    assert r64b.status is FULL  # needs 16; free 1 + unpinned r16's 4
    cache.release("r64")
    r64b = cache.acquire("r64b").handle
    assert be.released == ["r64"] and cache.tier("r16") == "device"  # evicting the LRU r64 was enough
    assert set(r64b.pages) == set(r64.pages)  # LIFO: the just-freed pages are reused, page 23 stays free
    for k in ("r8", "r4", "r64b"):
        cache.release(k)
    cache.evict_unpinned()
    assert cache.stats().pages_device == 0 and be.live == {}
    cache.check_invariants()


# ---- failures ---------------------------------------------------------------------------
def test_failed_host_load_leaves_no_trace(tmp_path: Path) -> None:
    cache, be = make_cache(tmp_path, {"a": (10, 1), "bad": (10, 2)}, pages=3)
    cycle(cache, "a")
    be.fail_load.add("bad")
    with pytest.raises(AdapterError, match="corrupt"):
        cache.acquire("bad")
    s = cache.stats()
    assert cache.tier("bad") == "disk" and s.bytes_host == 10 and s.pages_device == 1
    assert (s.loads, s.load_failures, s.misses, s.cache_full) == (1, 1, 1, 0)
    assert cache.pinned_count() == 0 and cache.tier("a") == "device"
    cache.check_invariants()
    be.fail_load.clear()
    assert cycle(cache, "bad") is LOADED


def test_failed_device_copy_frees_pages_and_host_copy(tmp_path: Path) -> None:
    cache, be = make_cache(tmp_path, {"a": (10, 2), "b": (20, 2)}, pages=2)
    cycle(cache, "a")
    be.fail_device.add("b")
    with pytest.raises(RuntimeError, match="out of memory"):
        cache.acquire("b")
    s = cache.stats()
    assert cache.tier("b") == "disk" and s.pages_device == 0 and s.bytes_host == 10
    assert be.live == {} and cache.pinned_count() == 0 and s.load_failures == 1 and s.device_loads == 1
    cache.check_invariants()
    be.fail_device.clear()
    assert cycle(cache, "b") is LOADED and len(be.load_calls) == 3  # re-read from disk


# ---- registration -----------------------------------------------------------------------
def test_generation_bump_on_reregister(tmp_path: Path) -> None:
    cache, be = make_cache(tmp_path, {"a": (10, 1), "a-v2": (10, 2)})
    root = tmp_path / "adapters"
    assert cache.register("a") == 0 and cache.register("a") == 0
    r = cache.acquire("a")
    assert r.generation == 0 and be.load_calls[-1][1] == str((root / "a").resolve())
    with pytest.raises(AdapterBusyError):
        cache.register("a", path="a-v2")
    cache.release("a")
    assert cache.register("a", path="a-v2") == 1
    assert cache.tier("a") == "disk" and be.released == ["a"] and cache.info()[0].num_pages is None
    r = cache.acquire("a")
    assert r.generation == 1 and len(r.handle.pages) == 2
    assert be.load_calls[-1] == ("a", str((root / "a-v2").resolve()))
    cache.release("a")
    assert cache.generation("a") == 1
    cache.unregister("a")
    assert cache.register("a") == 2  # may be different weights now: never reuse old KV
    with pytest.raises(AdapterPathError):
        cache.register("b", path="../outside")
    with pytest.raises(AdapterNotFoundError):
        cache.generation("b")


def test_every_entry_checks_the_id_before_touching_disk(tmp_path: Path) -> None:
    """The cache is where an adapter id (or a directory given for one) is checked: each public method refuses
    a malformed one with AdapterPathError, reading nothing."""
    cache, be = make_cache(tmp_path, {"a": (10, 1)})
    for bad in ("../adapters/a", "/abs", "a//", "a\x00", "bad id!", "", 42):
        for call in (cache.register, cache.load, cache.unregister, cache.acquire, cache.release, cache.prefetch,
                     cache.can_acquire, cache.tier, cache.generation):
            with pytest.raises(AdapterPathError):
                call(bad)
    for bad_path in ("../adapters/a", "/abs", "a//", "a\x00"):
        with pytest.raises(AdapterPathError, match="adapter path"):
            cache.load("x", bad_path)
    assert be.load_calls == [] and cache.info() == []


def test_just_in_time_registration(tmp_path: Path) -> None:
    cache, _ = make_cache(tmp_path, {"team-a/summarizer-v2": (10, 1)})
    assert cache.info() == [] and cache.can_acquire("team-a/summarizer-v2")
    assert cycle(cache, "team-a/summarizer-v2") is LOADED
    (info,) = cache.info()
    assert (info.adapter_id, info.tier, info.pins, info.num_pages, info.nbytes, info.generation) == (
        "team-a/summarizer-v2", "device", 0, 1, 10, 0)
    with pytest.raises(AdapterNotFoundError):
        cache.acquire("nope")
    with pytest.raises(AdapterPathError):
        cache.acquire("../adapters/team-a")
    with pytest.raises(AdapterNotFoundError):
        cache.tier("nope")
    assert [i.adapter_id for i in cache.info()] == ["team-a/summarizer-v2"]


def test_prefetch_does_not_pin(tmp_path: Path) -> None:
    cache, _ = make_cache(tmp_path, {"a": (10, 2), "b": (10, 2)}, pages=2)
    assert cache.prefetch("a") is LOADED and cache.pinned_count() == 0
    assert cache.acquire("a").status is HIT and cache.stats().hits == 1
    assert cache.prefetch("b") is FULL and cache.tier("b") == "host"
    cache.release("a")
    assert cache.prefetch("b") is LOADED and cache.tier("a") == "host"


def test_stats_are_frozen_snapshots(tmp_path: Path) -> None:
    cache, _ = make_cache(tmp_path, {"a": (10, 1)})
    cycle(cache, "a")
    s = cache.stats()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.hits = 5  # type: ignore[misc]
    with pytest.raises(TypeError):
        s.per_adapter["a"] = None  # type: ignore[index]
    cycle(cache, "a")
    assert s.hits == 0 and cache.stats().hits == 1 and s.load_seconds >= 0.0
    assert s.per_adapter["a"].loads == 1 and s.per_adapter["a"].device_loads == 1


# ---- randomized soak --------------------------------------------------------------------
def test_random_cycles_never_leak_pages_or_bytes(tmp_path: Path) -> None:
    rng = random.Random(1234)
    ranks = [4, 8, 16, 64]
    sizes = {f"ad{i}": (ranks[i % 4] * 10, ranks[i % 4] // 4) for i in range(12)}
    sizes |= {f"ad{i}-alt": (ranks[(i + 1) % 4] * 10, ranks[(i + 1) % 4] // 4) for i in range(12)}
    budget, total = 1500, 40
    cache, be = make_cache(tmp_path, sizes, host_budget=budget, pages=total)
    ids = [f"ad{i}" for i in range(12)]
    pins = dict.fromkeys(ids, 0)
    held: dict[str, list[FakeDevice]] = {aid: [] for aid in ids}
    outcomes: dict[str, int] = {}
    for _ in range(10_000):
        op = rng.random()
        aid = rng.choice(ids)
        if op < 0.45:
            be.fail_load = {aid} if rng.random() < 0.02 else set()
            be.fail_device = {aid} if rng.random() < 0.02 else set()
            try:
                r = cache.acquire(aid)
            except (AdapterError, RuntimeError):
                outcomes["error"] = outcomes.get("error", 0) + 1
            else:
                outcomes[r.status.name] = outcomes.get(r.status.name, 0) + 1
                if r.ok:
                    pins[aid] += 1
                    held[aid].append(r.handle)
                    assert r.handle.pages and resident(be, r.handle)
            be.fail_load, be.fail_device = set(), set()
        elif op < 0.85:
            pinned = [k for k, v in pins.items() if v]
            if pinned:
                k = rng.choice(pinned)
                assert resident(be, held[k].pop())  # a handle stays valid while its pin is held
                cache.release(k)
                pins[k] -= 1
        elif op < 0.92:
            cache.prefetch(aid)
        elif op < 0.97:
            try:
                cache.unregister(aid)
            except AdapterBusyError:
                assert pins[aid] > 0
            except AdapterNotFoundError:
                assert pins[aid] == 0
        else:
            try:
                cache.register(aid, path=aid + "-alt" if rng.random() < 0.5 else aid)
            except AdapterBusyError:
                assert pins[aid] > 0
        cache.check_invariants()
        s = cache.stats()
        assert cache.pinned_count() == sum(pins.values())
        assert s.bytes_host <= budget and s.pages_device <= total
        assert len(be.live) == s.pages_device
    assert outcomes.get("CACHE_FULL", 0) > 0 and outcomes.get("HIT", 0) > 0 and outcomes.get("LOADED", 0) > 0
    for k, n in pins.items():
        for _ in range(n):
            cache.release(k)
    assert cache.pinned_count() == 0
    for info in cache.info():
        cache.unregister(info.adapter_id)
    cache.check_invariants()
    s = cache.stats()
    assert s.pages_device == 0 and s.bytes_host == 0 and be.live == {}
    assert s.hits + s.misses == outcomes["HIT"] + outcomes["LOADED"]


def test_concurrent_acquire_release(tmp_path: Path) -> None:
    sizes = {f"t{i}": (10, 2) for i in range(6)}
    cache, be = make_cache(tmp_path, sizes, host_budget=40, pages=8)

    def worker(seed: int) -> int:
        rng, loaded = random.Random(seed), 0
        for _ in range(300):
            aid = f"t{rng.randrange(6)}"
            r = cache.acquire(aid)
            if r.ok:
                loaded += r.status is LOADED
                assert resident(be, r.handle)
                cache.release(aid)
        return loaded

    with ThreadPoolExecutor(max_workers=4) as pool:
        loaded = sum(pool.map(worker, range(4)))  # re-raises any worker's exception
    assert loaded == cache.stats().misses > 0 and cache.pinned_count() == 0
    cache.check_invariants()
    assert len(be.live) == cache.stats().pages_device


def test_request_hits_count_residency_on_arrival(tmp_path: Path) -> None:
    """Requests count a hit only when their adapter was already on the device as they arrived."""
    cache, _ = make_cache(tmp_path, {"a": (10, 2), "b": (10, 2)}, pages=2)
    assert cache.prefetch("a", request=True) is LOADED  # miss: read from disk
    assert cache.prefetch("a", request=True) is HIT  # hit
    cache.prefetch("b")  # not a request (e.g. LoadAdapter): not counted; evicts a from the device
    assert cache.prefetch("a", request=True) is LOADED  # miss again: a was only on the host
    s = cache.stats()
    assert (s.request_hits, s.request_misses) == (1, 2) and (s.hits, s.misses) == (0, 0)


class BlockingBackend(FakeBackend):
    """load_host of ``slow`` waits for ``go``: a long disk read in flight."""

    def __init__(self, sizes, root, slow: str) -> None:
        super().__init__(sizes, root)
        self.slow, self.reading = slow, threading.Event()
        self.go = threading.Event()

    def load_host(self, adapter_id, path):
        if adapter_id == self.slow:
            self.reading.set()
            assert self.go.wait(10), "the test never let the read finish"
        return super().load_host(adapter_id, path)


def blocking_cache(tmp_path: Path, sizes: dict[str, tuple[int, int]], slow: str):
    cache, _ = make_cache(tmp_path, sizes)
    blocking = BlockingBackend(sizes, tmp_path / "adapters", slow)
    cache._backend = blocking
    return cache, blocking


def test_prefetch_reads_disk_without_the_lock_so_other_callers_go_on(tmp_path):
    cache, backend = blocking_cache(tmp_path, {"slow": (100, 2), "hot": (100, 2)}, slow="slow")
    assert cache.acquire("hot").status is LOADED
    with ThreadPoolExecutor(1) as pool:
        reading = pool.submit(cache.prefetch, "slow", request=True)
        assert backend.reading.wait(5)
        # while "slow" is being read, the scheduler's calls are answered at once
        assert cache.acquire("hot").status is HIT
        assert cache.can_acquire("slow") and cache.tier("slow") == "disk"
        cache.release("hot")
        backend.go.set()
        assert reading.result(5) is LOADED
    assert cache.tier("slow") == "device"
    assert cache.stats().loads == 2 and cache.stats().request_misses == 1
    cache.release("hot")
    cache.check_invariants()


@pytest.mark.parametrize("race", ["loaded meanwhile", "re-pointed", "unregistered"])
def test_a_read_overtaken_by_a_change_of_the_entry_is_dropped(tmp_path, race):
    cache, backend = blocking_cache(tmp_path, {"a": (100, 2), "b": (300, 3)}, slow="a")
    with ThreadPoolExecutor(1) as pool:
        reading = pool.submit(cache.prefetch, "a")
        assert backend.reading.wait(5)
        backend.slow = None  # later reads of "a" do not block
        if race == "loaded meanwhile":
            assert cache.acquire("a").status is LOADED
        elif race == "re-pointed":
            cache.register("a", "b")  # now names other weights: generation 1
        else:
            cache.unregister("a")
        backend.go.set()
        status = reading.result(5)
    if race == "loaded meanwhile":
        assert status is HIT and cache.stats().loads == 1  # the second read was dropped, not counted
        cache.release("a")
    elif race == "re-pointed":
        assert status is LOADED and cache.generation("a") == 1
        assert cache.info()[0].nbytes == 300  # the new path's weights, not the stale read
    else:
        assert status is LOADED and cache.generation("a") == 1  # registered again just in time, from disk
    assert cache.stats().bytes_host == sum(i.nbytes for i in cache.info() if i.tier != "disk")
    cache.check_invariants()


def test_a_failed_unlocked_read_counts_and_leaves_nothing(tmp_path):
    cache, backend = make_cache(tmp_path, {"bad": (100, 2)})
    backend.fail_load.add("bad")
    with pytest.raises(AdapterError, match="corrupt"):
        cache.prefetch("bad")
    assert cache.stats().load_failures == 1 and cache.tier("bad") == "disk"
    assert cache.stats().bytes_host == 0 and cache.stats().pages_device == 0
    cache.check_invariants()


def test_counters_refuse_unknown_events_and_keep_per_adapter_counts_apart():
    from engine.adapters.counters import CacheCounters

    c = CacheCounters()
    c.count("hits", "a")
    c.count("hits", "b")
    c.count("misses", "a")  # counted in total only: not a per-adapter counter
    c.load_seconds += 0.5
    with pytest.raises(ValueError, match="unknown adapter cache event 'hit'"):
        c.count("hit")
    s = c.snapshot(bytes_host=3, pages_device=2, host_budget_bytes=10, num_device_pages=8)
    assert (s.hits, s.misses, s.load_seconds, s.bytes_host, s.pages_device) == (2, 1, 0.5, 3, 2)
    assert s.per_adapter["a"].hits == 1 and s.per_adapter["b"].hits == 1 and set(s.per_adapter) == {"a", "b"}
