"""Three-tier LoRA adapter cache: disk -> host memory -> device page pool (pure Python).

Contracts
---------
* Tiers: an adapter lives on disk (under the adapter root), optionally has a host copy (LRU,
  bounded by ``host_budget_bytes``) and optionally a device copy in pages of the pool (LRU,
  bounded by ``num_device_pages``). The device copy does not need the host copy to stay.
  :meth:`AdapterCache.tier` reports the highest tier holding it.
* All tensor work goes through the injected :class:`AdapterBackend`; this module never imports
  torch. The backend owns the page layout; the cache only hands it page ids.
* Each tier's bookkeeping (copies held, LRU order, bytes or pages) is a :class:`HostTier` and a
  :class:`DeviceTier`; the cache decides what enters and leaves them (registration, pins, generations, counters,
  backend calls) under its lock.
* :meth:`acquire` makes an adapter device-resident and pins it; each successful acquire must be
  matched by exactly one :meth:`release`. A pinned adapter's device copy is never evicted, nor
  is the host copy of a device-resident pinned adapter.
* ``CACHE_FULL`` (a status, not an exception) means the adapter would fit an empty cache but
  cannot now because pinned adapters hold the pages (or the host budget). It changes no pins and
  nothing in the device tier; a host copy loaded on this call to learn the page need is kept,
  as :meth:`prefetch` would keep it. An adapter that can never fit raises ``AdapterError``.
* Failures: if the backend raises, the error propagates and nothing is half-loaded: no pages
  are held and no host entry remains for that adapter (a failed host->device copy also drops
  its host copy, so the next try re-reads disk). Evictions done to make room stay done.
* :meth:`unregister` and re-pointing an id with :meth:`register` refuse with
  :class:`AdapterBusyError` while the adapter is pinned: unload fails cleanly while requests use
  it, the caller retries after draining.
* Generations: an id's generation starts at 0 and is bumped whenever the id may now name
  different weights (re-registered with another path, or registered again after unregister),
  so prefix caches keyed by ``(adapter_id, generation)`` never reuse stale KV.
* Ids: every public method that takes an adapter id looks it up through one gate, :meth:`_entry`, which
  checks its syntax (``validate_adapter_id``: malformed ids raise ``AdapterPathError``) before anything else;
  :meth:`register` checks a directory given for an id the same way. No caller above checks an id again.
* Thread safety: one ``threading.RLock`` guards every public method and all bookkeeping. :meth:`prefetch`
  (what a new request calls) reads and validates the adapter from disk *without* the lock, so other callers
  (the engine's scheduler) are not stalled by the read; host->device copies, and the loads :meth:`acquire`
  must do itself, run under the lock.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Any

from aspen.errors import AdapterError, AdapterNotFoundError
from engine.adapters.counters import CacheCounters
from engine.adapters.device_tier import DeviceTier
from engine.adapters.host_tier import HostTier
from engine.adapters.paths import (
    check_confined,
    resolve_adapter_path,
    validate_adapter_id,
    validate_adapter_path,
)
from engine.adapters.types import (  # noqa: F401 -- re-exported: the cache's interface
    AcquireResult,
    AdapterBackend,
    AdapterBusyError,
    AdapterCounters,
    AdapterInfo,
    CacheStats,
    CacheStatus,
    DeviceAdapter,
    HostAdapter,
)


@dataclass
class _Entry:
    adapter_id: str
    path: str
    generation: int
    pins: int = 0
    num_pages: int | None = None  # last known sizes, kept after eviction for cheap checks
    nbytes: int | None = None


class AdapterCache:
    """Disk -> host (LRU, bytes) -> device (LRU, pages) adapter cache with pinning."""

    def __init__(self, root: str, backend: AdapterBackend, host_budget_bytes: int, num_device_pages: int) -> None:
        if host_budget_bytes < 0:
            raise ValueError(f"host_budget_bytes must be >= 0, got {host_budget_bytes}")
        self._root = root
        self._backend = backend
        self._host = HostTier(int(host_budget_bytes))
        self._device = DeviceTier(num_device_pages)
        self._lock = threading.RLock()
        self._entries: dict[str, _Entry] = {}
        self._generations: dict[str, int] = {}  # survives unregister
        self._counters = CacheCounters()

    # ---- registration -------------------------------------------------------------------
    def register(self, adapter_id: str, path: str | None = None) -> int:
        """Record ``adapter_id`` -> ``path`` (relative to the root; default the id). Returns the generation."""
        with self._lock:
            self._entry(adapter_id, register=False)
            return self._register(adapter_id, path)

    def load(self, adapter_id: str, path: str | None = None) -> AdapterInfo:
        """:meth:`register`, :meth:`prefetch` and the adapter's :class:`AdapterInfo`, as one step under the lock, so
        a concurrent :meth:`unregister` of the same id cannot slip in between. Nothing stays registered if the
        read fails."""
        with self._lock:
            self._entry(adapter_id, register=False)
            self._register(adapter_id, path)
            try:
                self._prefetch(adapter_id, request=False)
            except Exception:
                entry = self._entries.get(adapter_id)
                if entry is not None and not entry.pins:
                    self._unregister(adapter_id)
                raise
            return next(i for i in self.info() if i.adapter_id == adapter_id)

    def unregister(self, adapter_id: str) -> None:
        """Drop ``adapter_id`` from every tier; :class:`AdapterBusyError` while pinned."""
        with self._lock:
            self._entry(adapter_id, register=False)
            self._unregister(adapter_id)

    # ---- pinning ------------------------------------------------------------------------
    def acquire(self, adapter_id: str) -> AcquireResult:
        """Make ``adapter_id`` device-resident and pin it, or answer CACHE_FULL changing no pins. The result's
        ``handle`` (the backend's device copy) stays valid, the same object, until the matching :meth:`release`:
        a pinned copy is never evicted, re-pointed or unregistered."""
        with self._lock:
            entry = self._entry(adapter_id, register=True)
            status = self._make_resident(entry, keep_host_when_full=False)
            if status is CacheStatus.CACHE_FULL:
                self._counters.count("cache_full")
                return AcquireResult(adapter_id, status, None, entry.generation)
            entry.pins += 1
            if status is CacheStatus.HIT:
                self._counters.count("hits", adapter_id)
            else:
                self._counters.count("misses")
            return AcquireResult(adapter_id, status, self._device.get(adapter_id), entry.generation)

    def release(self, adapter_id: str) -> None:
        """Undo one :meth:`acquire`; ``ValueError`` if the adapter is not pinned."""
        with self._lock:
            entry = self._entry(adapter_id, register=False)
            if entry is None or entry.pins == 0:
                raise ValueError(f"adapter {adapter_id!r} is not pinned; release() without a matching acquire()")
            entry.pins -= 1

    def prefetch(self, adapter_id: str, *, request: bool = False) -> CacheStatus:
        """Bring to host, and to device if unpinned pages allow; never pins, never raises CACHE_FULL.

        The disk read and validation run without the lock (other callers — the engine's scheduler among them —
        go on meanwhile); the host insert and the device copy take it again. What was read is dropped if the
        entry changed during the read (loaded by another caller, re-pointed or unregistered).

        ``request=True``: a request for this adapter has arrived; it counts as a request hit when the adapter is
        already device-resident, else as a request miss (the per-request hit rate users ask about: acquires
        come later and nearly always hit what this call loaded)."""
        with self._lock:
            self._entry(adapter_id, register=True)
        return self._prefetch(adapter_id, request=request)

    def can_acquire(self, adapter_id: str) -> bool:
        """Cheap scheduler hint; True when unknown (acquire decides, and raises if it never fits)."""
        with self._lock:
            entry = self._entry(adapter_id, register=False)
            if entry is None or adapter_id in self._device:
                return True
            host = self._host.get(adapter_id)
            need = host.num_pages if host is not None else entry.num_pages
            if need is None or need > self._device.num_pages:
                return True
            known_bytes = entry.nbytes if host is None else None
            if known_bytes is not None and known_bytes <= self._host.budget_bytes and not self._host_fits(known_bytes):
                return False
            return self._device_fits(need)

    def evict_unpinned(self) -> None:
        """Drop every device copy that is not pinned and every host copy that may be evicted."""
        with self._lock:
            for aid in self._device.ids():
                if not self._pinned(aid):
                    self._drop_device(self._entries[aid], evicted=True)
            for aid in self._host.ids():
                if not self._protected(aid):
                    self._drop_host(self._entries[aid], evicted=True)

    # ---- queries ------------------------------------------------------------------------
    def tier(self, adapter_id: str) -> str:
        """``"device"``, ``"host"`` or ``"disk"``; raises for an id neither registered nor on disk."""
        with self._lock:
            entry = self._entry(adapter_id, register=False)
            if entry is None:
                resolve_adapter_path(self._root, adapter_id)
                return "disk"
            return "device" if adapter_id in self._device else "host" if adapter_id in self._host else "disk"

    def generation(self, adapter_id: str) -> int:
        """Current generation of a registered id (no just-in-time registration)."""
        return self._registered(adapter_id).generation

    def path(self, adapter_id: str) -> str:
        """The resolved directory of a registered id (no just-in-time registration)."""
        return self._registered(adapter_id).path

    def _registered(self, adapter_id: str) -> _Entry:
        with self._lock:
            entry = self._entry(adapter_id, register=False)
            if entry is None:
                raise AdapterNotFoundError(f"adapter {adapter_id!r} is not registered")
            return entry

    def info(self) -> list[AdapterInfo]:
        with self._lock:
            return [
                AdapterInfo(e.adapter_id, e.path, self.tier(e.adapter_id), e.pins, e.num_pages, e.nbytes, e.generation)
                for e in sorted(self._entries.values(), key=lambda e: e.adapter_id)
            ]

    def pinned_count(self) -> int:
        with self._lock:
            return sum(e.pins for e in self._entries.values())

    def stats(self) -> CacheStats:
        with self._lock:
            return self._counters.snapshot(bytes_host=self._host.bytes_used, pages_device=self._device.num_used,
                                           host_budget_bytes=self._host.budget_bytes,
                                           num_device_pages=self._device.num_pages)

    def check_invariants(self) -> None:
        """Raise ``AssertionError`` on any inconsistency between tiers, pages, bytes and pins."""
        with self._lock:
            self._device.check_invariants()
            self._host.check_invariants()
            unknown = (set(self._device.ids()) | set(self._host.ids())) - set(self._entries)
            if unknown:
                raise AssertionError(f"the tiers hold copies of unregistered adapters {sorted(unknown)}")
            for e in self._entries.values():
                on_device = e.adapter_id in self._device
                if e.pins < 0 or (e.pins and not on_device):
                    raise AssertionError(f"adapter {e.adapter_id!r} has {e.pins} pins, on the device: {on_device}")
                pages = self._device.pages(e.adapter_id)
                if on_device and len(pages) != e.num_pages:
                    raise AssertionError(f"adapter {e.adapter_id!r} holds {len(pages)} pages, needs {e.num_pages}")

    # ---- internals (caller holds the lock) ----------------------------------------------
    def _entry(self, adapter_id: str, *, register: bool) -> _Entry | None:
        """The gate of every adapter id into the cache: checks its syntax (raises ``AdapterPathError``), then
        returns its entry (see :meth:`_known`). The methods below it take ids that passed it."""
        validate_adapter_id(adapter_id)
        return self._known(adapter_id, register=register)

    def _known(self, adapter_id: str, *, register: bool) -> _Entry | None:
        """The entry of ``adapter_id``. An unknown id is registered just in time when ``register`` (if its
        directory exists under the root, else ``AdapterNotFoundError``), else answered with None."""
        entry = self._entries.get(adapter_id)
        if entry is None and register:
            self._register(adapter_id, None)
            entry = self._entries[adapter_id]
        return entry

    def _register(self, adapter_id: str, path: str | None) -> int:
        if path is not None:
            validate_adapter_path(path)
        real = resolve_adapter_path(self._root, adapter_id if path is None else path)
        entry = self._entries.get(adapter_id)
        if entry is not None:
            if entry.path == real:
                return entry.generation
            if entry.pins:
                raise AdapterBusyError(
                    f"adapter {adapter_id!r} is pinned by {entry.pins} in-flight request(s); "
                    "cannot re-point it until they finish"
                )
            self._drop(entry)
            entry.path, entry.num_pages, entry.nbytes = real, None, None
            entry.generation = self._generations[adapter_id] = entry.generation + 1
            return entry.generation
        gen = self._generations[adapter_id] + 1 if adapter_id in self._generations else 0
        self._generations[adapter_id] = gen
        self._entries[adapter_id] = _Entry(adapter_id, real, gen)
        return gen

    def _unregister(self, adapter_id: str) -> None:
        entry = self._entries.get(adapter_id)
        if entry is None:
            raise AdapterNotFoundError(f"adapter {adapter_id!r} is not registered")
        if entry.pins:
            raise AdapterBusyError(
                f"adapter {adapter_id!r} is pinned by {entry.pins} in-flight request(s); "
                "release them before unloading"
            )
        del self._entries[adapter_id]
        self._drop(entry)

    def _prefetch(self, adapter_id: str, *, request: bool) -> CacheStatus:
        """:meth:`prefetch`; takes the lock itself (reads without it unless the caller holds it)."""
        with self._lock:
            entry = self._known(adapter_id, register=True)
            if request:
                self._counters.count("request_hits" if adapter_id in self._device else "request_misses")
            if adapter_id in self._device or adapter_id in self._host:
                return self._make_resident(entry, keep_host_when_full=True)
            if self._full_before_read(entry, keep_host_when_full=True):
                return CacheStatus.CACHE_FULL
            path, generation = entry.path, entry.generation
        host, seconds = self._read_host(adapter_id, path)  # unlocked (unless the caller holds the lock)
        with self._lock:
            self._counters.load_seconds += seconds
            current = self._entries.get(adapter_id)
            if (current is entry and entry.generation == generation and adapter_id not in self._host
                    and adapter_id not in self._device):
                self._accept_host(entry, host)
                if not self._insert_host(entry, host):
                    return CacheStatus.CACHE_FULL
            return self._make_resident(self._known(adapter_id, register=True), keep_host_when_full=True)

    def _make_resident(self, entry: _Entry, *, keep_host_when_full: bool) -> CacheStatus:
        if entry.adapter_id in self._device:
            self._touch(entry)
            return CacheStatus.HIT
        if entry.adapter_id not in self._host:
            if self._full_before_read(entry, keep_host_when_full=keep_host_when_full):
                return CacheStatus.CACHE_FULL
            host = self._load_host(entry)
            if not self._insert_host(entry, host):
                return CacheStatus.CACHE_FULL
        if not self._device_fits(self._host.get(entry.adapter_id).num_pages):
            self._touch(entry)
            return CacheStatus.CACHE_FULL
        self._load_device(entry)
        return CacheStatus.LOADED

    def _full_before_read(self, entry: _Entry, *, keep_host_when_full: bool) -> bool:
        """With the sizes known from an earlier load: whether the read would end in CACHE_FULL (skip it). Raises
        if the adapter can never fit."""
        if entry.num_pages is None or entry.nbytes is None:
            return False
        self._check_sizes(entry.adapter_id, entry.nbytes, entry.num_pages)
        if not self._host_fits(entry.nbytes):
            return True
        return not keep_host_when_full and not self._device_fits(entry.num_pages)

    def _load_host(self, entry: _Entry) -> Any:
        host, seconds = self._read_host(entry.adapter_id, entry.path)
        self._counters.load_seconds += seconds
        self._accept_host(entry, host)
        return host

    def _read_host(self, adapter_id: str, path: str) -> tuple[Any, float]:
        """The backend's host copy of ``path`` and the seconds it took; needs no lock (touches no cache state
        but the failure counter, under the lock)."""
        t0 = time.perf_counter()
        try:
            if os.path.isdir(path):  # a missing directory is the backend's NOT_FOUND to report
                check_confined(self._root, path)  # the tree may have changed since register()
            return self._backend.load_host(adapter_id, path), time.perf_counter() - t0
        except BaseException:
            with self._lock:
                self._counters.count("load_failures")
                self._counters.load_seconds += time.perf_counter() - t0
            raise

    def _accept_host(self, entry: _Entry, host: Any) -> None:
        """Check a fresh host copy's sizes, record them and count the load (not yet inserted)."""
        try:
            self._check_sizes(entry.adapter_id, host.nbytes, host.num_pages)
        except AdapterError:
            self._counters.count("load_failures")
            raise
        entry.nbytes, entry.num_pages = host.nbytes, host.num_pages
        self._counters.count("loads", entry.adapter_id)

    def _load_device(self, entry: _Entry) -> None:
        host = self._host.get(entry.adapter_id)
        need = host.num_pages
        for aid in self._device.victims(need, keep=self._pinned):  # LRU unpinned until enough pages are free
            self._drop_device(self._entries[aid], evicted=True)
        pages = self._device.allocate(need)  # _device_fits said it would fit
        t0 = time.perf_counter()
        try:
            dev = self._backend.to_device(host, pages)
        except BaseException:
            self._device.free(pages)
            self._drop_host(entry, evicted=False)
            self._counters.count("load_failures")
            raise
        finally:
            self._counters.load_seconds += time.perf_counter() - t0
        self._device.add(entry.adapter_id, dev, pages)
        self._touch(entry)
        self._counters.count("device_loads", entry.adapter_id)

    def _insert_host(self, entry: _Entry, host: Any) -> bool:
        """Add ``host`` to the host tier, evicting LRU evictable copies; False if it cannot fit."""
        if not self._host_fits(host.nbytes):
            return False
        for aid in self._host.victims(host.nbytes, keep=self._protected):
            self._drop_host(self._entries[aid], evicted=True)
        self._host.add(entry.adapter_id, host)
        return True

    def _check_sizes(self, adapter_id: str, nbytes: Any, num_pages: Any) -> None:
        for name, value in (("nbytes", nbytes), ("num_pages", num_pages)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise AdapterError(f"adapter {adapter_id!r}: backend reported {name}={value!r}; expected an int >= 0")
        if nbytes > self._host.budget_bytes:
            raise AdapterError(
                f"adapter {adapter_id!r} needs {nbytes} bytes of host memory but the host budget is "
                f"{self._host.budget_bytes} bytes"
            )
        if num_pages > self._device.num_pages:
            raise AdapterError(
                f"adapter {adapter_id!r} needs {num_pages} device pages but the pool has only "
                f"{self._device.num_pages} pages"
            )

    def _pinned(self, adapter_id: str) -> bool:
        """Device copies of pinned adapters are never evicted."""
        return self._entries[adapter_id].pins > 0

    def _protected(self, adapter_id: str) -> bool:
        """Host copies of device-resident pinned adapters are never evicted."""
        return adapter_id in self._device and self._entries[adapter_id].pins > 0

    def _host_fits(self, nbytes: int) -> bool:
        return self._host.fits(nbytes, keep=self._protected)

    def _device_fits(self, need: int) -> bool:
        return self._device.fits(need, keep=self._pinned)

    def _touch(self, entry: _Entry) -> None:
        self._device.touch(entry.adapter_id)
        self._host.touch(entry.adapter_id)

    def _drop(self, entry: _Entry) -> None:
        try:
            self._drop_device(entry, evicted=False)
        finally:
            self._drop_host(entry, evicted=False)

    def _drop_device(self, entry: _Entry, *, evicted: bool) -> None:
        if entry.adapter_id not in self._device:
            return
        dev = self._device.remove(entry.adapter_id)  # bookkeeping first: consistent even if the backend raises
        if evicted:
            self._counters.count("evictions_device", entry.adapter_id)
        self._backend.release_device(dev)

    def _drop_host(self, entry: _Entry, *, evicted: bool) -> None:
        if self._host.remove(entry.adapter_id) is None:
            return
        if evicted:
            self._counters.count("evictions_host", entry.adapter_id)
