"""The device tier of the adapter cache: device copies of adapters, each in pages of the pool, in LRU order
(stdlib only).

Contract
--------
* The tier owns the :class:`PageAllocator` of the device pool. A copy is added with the pages it occupies, which
  :meth:`DeviceTier.allocate` handed out; the pages of the copies held are exactly the allocator's used pages,
  except for pages allocated for a copy still being made (the caller adds it, or gives them back with
  :meth:`DeviceTier.free`).
* The device copies themselves are opaque handles of the backend; this class never looks inside them and makes
  no backend calls: :meth:`DeviceTier.remove` returns the handle so the caller can release it.
* Order is least recently used first: :meth:`DeviceTier.add` and :meth:`DeviceTier.touch` make an id the most
  recently used.
* It decides which copies to evict but evicts none itself: :meth:`DeviceTier.victims` names them, oldest first,
  skipping the ids its ``keep`` predicate keeps (the pinned ones), and the caller removes each.
  :meth:`DeviceTier.fits` says whether a page count would fit once every copy not kept were gone.
* Not thread-safe on its own; the adapter cache calls it under its lock.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from engine.adapters.page_allocator import PageAllocator
from engine.adapters.types import DeviceAdapter


class DeviceTier:
    """Device copies by adapter id with the pages each holds, least recently used first."""

    def __init__(self, num_pages: int) -> None:
        self._alloc = PageAllocator(num_pages)
        self._held: OrderedDict[str, tuple[DeviceAdapter, list[int]]] = OrderedDict()  # oldest first

    @property
    def num_pages(self) -> int:
        """Pages in the pool."""
        return self._alloc.num_pages

    @property
    def num_used(self) -> int:
        return self._alloc.num_used

    @property
    def num_free(self) -> int:
        return self._alloc.num_free

    def __contains__(self, adapter_id: object) -> bool:
        return adapter_id in self._held

    def get(self, adapter_id: str) -> DeviceAdapter | None:
        """The device copy of ``adapter_id``, or None when the tier holds none."""
        held = self._held.get(adapter_id)
        return None if held is None else held[0]

    def pages(self, adapter_id: str) -> list[int]:
        """The pages the device copy of ``adapter_id`` occupies; empty when the tier holds none."""
        held = self._held.get(adapter_id)
        return [] if held is None else list(held[1])

    def ids(self) -> list[str]:
        """The ids held, least recently used first."""
        return list(self._held)

    def fits(self, need: int, *, keep: Callable[[str], bool]) -> bool:
        """Whether ``need`` pages would be free once every copy that ``keep`` does not keep were evicted."""
        evictable = sum(len(pages) for aid, (_, pages) in self._held.items() if not keep(aid))
        return self._alloc.num_free + evictable >= need

    def victims(self, need: int, *, keep: Callable[[str], bool]) -> list[str]:
        """The ids to evict, least recently used first and none that ``keep`` keeps, so that ``need`` pages are
        free; empty when they are already. Changes nothing; where :meth:`fits` is False it names every evictable
        id and even that is not enough."""
        free, out = self._alloc.num_free, []
        for aid, (_, pages) in self._held.items():
            if free >= need:
                break
            if not keep(aid):
                out.append(aid)
                free += len(pages)
        return out

    def allocate(self, need: int) -> list[int]:
        """``need`` free pages for a copy about to be made; ``AssertionError`` if fewer are free (the caller
        evicts :meth:`victims` first, so that is an accounting error)."""
        pages = self._alloc.allocate(need)
        if pages is None:
            raise AssertionError(f"page accounting is off: {need} pages wanted, {self._alloc.num_free} free")
        return pages

    def free(self, pages: list[int]) -> None:
        """Give back pages from :meth:`allocate` whose copy was never added."""
        self._alloc.free(pages)

    def add(self, adapter_id: str, device: DeviceAdapter, pages: list[int]) -> None:
        """Hold ``device``, made in ``pages`` (from :meth:`allocate`), as the most recently used copy; ``ValueError``
        if the id is held already."""
        if adapter_id in self._held:
            raise ValueError(f"adapter {adapter_id!r} already has a device copy in the device tier")
        self._held[adapter_id] = (device, list(pages))

    def remove(self, adapter_id: str) -> DeviceAdapter | None:
        """Drop the device copy of ``adapter_id``, free its pages and return the copy for the caller to release;
        None (changing nothing) when there is none."""
        held = self._held.pop(adapter_id, None)
        if held is None:
            return None
        self._alloc.free(held[1])
        return held[0]

    def touch(self, adapter_id: str) -> None:
        """Make ``adapter_id`` the most recently used; nothing when the tier does not hold it."""
        if adapter_id in self._held:
            self._held.move_to_end(adapter_id)

    def check_invariants(self) -> None:
        """Raise ``AssertionError`` if copies share pages or the allocator's used pages are not exactly theirs."""
        self._alloc.check_invariants()
        pages = [p for _, copy_pages in self._held.values() for p in copy_pages]
        if len(pages) != len(set(pages)) or set(pages) != self._alloc.used_pages():
            raise AssertionError("device pages are shared, leaked or unaccounted for")

    def __repr__(self) -> str:
        return f"DeviceTier(num_pages={self.num_pages}, free={self.num_free}, copies={len(self._held)})"
