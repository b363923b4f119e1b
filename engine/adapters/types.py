"""The adapter cache's interface types: the backend protocol it drives, statuses and the counters it reports
(pure Python, no torch)."""
from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from aspen.errors import AdapterError


class AdapterBusyError(AdapterError):
    """The adapter is pinned by in-flight requests; it cannot be unloaded or re-pointed now."""


class HostAdapter(Protocol):
    nbytes: int  # host memory it occupies
    num_pages: int  # device pages it needs (proportional to rank x targeted modules)


class DeviceAdapter(Protocol):
    """Opaque handle to an adapter's weights in the device pool (owned by the backend)."""


class AdapterBackend(Protocol):
    def load_host(self, adapter_id: str, path: str) -> HostAdapter: ...
    def to_device(self, host: HostAdapter, pages: list[int]) -> DeviceAdapter: ...
    def release_device(self, dev: DeviceAdapter) -> None: ...


class CacheStatus(enum.Enum):
    HIT = "hit"  # already device-resident
    LOADED = "loaded"  # brought to the device on this call
    CACHE_FULL = "cache_full"  # does not fit now because of pinned adapters


@dataclass(frozen=True)
class AcquireResult:
    adapter_id: str
    status: CacheStatus
    handle: Any  # DeviceAdapter when resident, else None
    generation: int

    @property
    def ok(self) -> bool:
        return self.status is not CacheStatus.CACHE_FULL


@dataclass(frozen=True)
class AdapterCounters:
    hits: int = 0
    loads: int = 0
    device_loads: int = 0
    evictions_host: int = 0
    evictions_device: int = 0


@dataclass(frozen=True)
class CacheStats:
    hits: int  # acquires that found the adapter device-resident
    misses: int  # acquires that had to bring it to the device
    request_hits: int  # requests whose adapter was device-resident when they arrived (prefetch(request=True))
    request_misses: int  # requests whose adapter had to be loaded (from host or disk) when they arrived
    cache_full: int  # acquires answered CACHE_FULL
    load_failures: int  # backend load_host/to_device calls that raised, or bad sizes
    loads: int  # disk -> host
    device_loads: int  # host -> device
    evictions_host: int
    evictions_device: int
    load_seconds: float
    bytes_host: int
    pages_device: int
    host_budget_bytes: int
    num_device_pages: int
    per_adapter: Mapping[str, AdapterCounters]


@dataclass(frozen=True)
class AdapterInfo:
    adapter_id: str
    path: str
    tier: str
    pins: int
    num_pages: int | None  # None until first loaded
    nbytes: int | None
    generation: int
