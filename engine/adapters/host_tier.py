"""The host tier of the adapter cache: host copies of adapters in LRU order within a byte budget (stdlib only).

Contract
--------
* The tier holds at most one host copy per adapter id, each counted at the ``nbytes`` it reports when added;
  :attr:`HostTier.bytes_used` is their sum and never exceeds :attr:`HostTier.budget_bytes`.
* Order is least recently used first: :meth:`HostTier.add` and :meth:`HostTier.touch` make an id the most
  recently used.
* It decides which copies to evict but evicts none itself: :meth:`HostTier.victims` names them, oldest first,
  skipping the ids its ``keep`` predicate keeps, and the caller removes each (and counts it). :meth:`HostTier.fits`
  says whether a size would fit once every copy not kept were gone.
* Not thread-safe on its own; the adapter cache calls it under its lock.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from engine.adapters.types import HostAdapter


class HostTier:
    """Host copies by adapter id, least recently used first, within ``budget_bytes``."""

    def __init__(self, budget_bytes: int) -> None:
        if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int) or budget_bytes < 0:
            raise ValueError(f"host_budget_bytes must be an int >= 0, got {budget_bytes!r}")
        self._budget = budget_bytes
        self._held: OrderedDict[str, tuple[HostAdapter, int]] = OrderedDict()  # id -> (copy, nbytes), oldest first
        self._used = 0

    @property
    def budget_bytes(self) -> int:
        return self._budget

    @property
    def bytes_used(self) -> int:
        return self._used

    def __contains__(self, adapter_id: object) -> bool:
        return adapter_id in self._held

    def get(self, adapter_id: str) -> HostAdapter | None:
        """The host copy of ``adapter_id``, or None when the tier holds none."""
        held = self._held.get(adapter_id)
        return None if held is None else held[0]

    def ids(self) -> list[str]:
        """The ids held, least recently used first."""
        return list(self._held)

    def fits(self, nbytes: int, *, keep: Callable[[str], bool]) -> bool:
        """Whether ``nbytes`` more would fit the budget once every copy that ``keep`` does not keep were evicted."""
        kept = sum(size for aid, (_, size) in self._held.items() if keep(aid))
        return kept + nbytes <= self._budget

    def victims(self, nbytes: int, *, keep: Callable[[str], bool]) -> list[str]:
        """The ids to evict, least recently used first and none that ``keep`` keeps, so that ``nbytes`` more fit;
        empty when they fit already. Changes nothing; where :meth:`fits` is False it names every evictable id
        and even that is not enough."""
        used, out = self._used, []
        for aid, (_, size) in self._held.items():
            if used + nbytes <= self._budget:
                break
            if not keep(aid):
                out.append(aid)
                used -= size
        return out

    def add(self, adapter_id: str, host: HostAdapter) -> None:
        """Hold ``host`` as the most recently used copy; ``ValueError`` if the id is held already or the copy would
        exceed the budget (the caller evicts :meth:`victims` first)."""
        if adapter_id in self._held:
            raise ValueError(f"adapter {adapter_id!r} already has a host copy in the host tier")
        nbytes = host.nbytes
        if self._used + nbytes > self._budget:
            raise ValueError(
                f"adapter {adapter_id!r} needs {nbytes} bytes but the host tier has "
                f"{self._budget - self._used} of {self._budget} bytes free; evict its victims() first"
            )
        self._held[adapter_id] = (host, nbytes)
        self._used += nbytes

    def remove(self, adapter_id: str) -> HostAdapter | None:
        """Drop the host copy of ``adapter_id`` and return it; None (changing nothing) when there is none."""
        held = self._held.pop(adapter_id, None)
        if held is None:
            return None
        self._used -= held[1]
        return held[0]

    def touch(self, adapter_id: str) -> None:
        """Make ``adapter_id`` the most recently used; nothing when the tier does not hold it."""
        if adapter_id in self._held:
            self._held.move_to_end(adapter_id)

    def check_invariants(self) -> None:
        """Raise ``AssertionError`` if the bytes held disagree with the copies or exceed the budget."""
        nbytes = sum(size for _, size in self._held.values())
        if nbytes != self._used or nbytes > self._budget:
            raise AssertionError(f"host bytes {nbytes} (tracked {self._used}) vs budget {self._budget}")

    def __repr__(self) -> str:
        return f"HostTier(budget_bytes={self._budget}, bytes_used={self._used}, copies={len(self._held)})"
