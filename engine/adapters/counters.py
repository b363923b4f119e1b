"""The adapter cache's event counters and load time (pure Python; the cache calls them under its lock)."""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import fields
from types import MappingProxyType

from engine.adapters.types import AdapterCounters, CacheStats

#: events counted in total (the fields of CacheStats they fill)
EVENTS = ("hits", "misses", "request_hits", "request_misses", "cache_full", "load_failures", "loads",
          "device_loads", "evictions_host", "evictions_device")
#: events also counted per adapter (the fields of AdapterCounters)
PER_ADAPTER = tuple(f.name for f in fields(AdapterCounters))


class CacheCounters:
    def __init__(self) -> None:
        self._totals: Counter[str] = Counter()
        self._per: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self.load_seconds = 0.0

    def count(self, event: str, adapter_id: str | None = None) -> None:
        """One more ``event``; in ``adapter_id``'s own counters too when given and counted per adapter."""
        if event not in EVENTS:
            raise ValueError(f"unknown adapter cache event {event!r}; expected one of {EVENTS}")
        self._totals[event] += 1
        if adapter_id is not None and event in PER_ADAPTER:
            self._per[adapter_id][event] += 1

    def snapshot(self, *, bytes_host: int, pages_device: int, host_budget_bytes: int,
                 num_device_pages: int) -> CacheStats:
        per = {aid: AdapterCounters(**{n: c[n] for n in PER_ADAPTER}) for aid, c in self._per.items()}
        return CacheStats(**{n: self._totals[n] for n in EVENTS}, load_seconds=self.load_seconds,
                          bytes_host=bytes_host, pages_device=pages_device, host_budget_bytes=host_budget_bytes,
                          num_device_pages=num_device_pages, per_adapter=MappingProxyType(per))
