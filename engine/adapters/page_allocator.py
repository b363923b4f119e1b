"""Page-id bookkeeping for the S-LoRA-style device adapter pool (stdlib only).

Contract
--------
* The pool has ``num_pages`` fixed-size pages named ``0 .. num_pages-1``. This class only hands
  out page ids; the device tensor layout behind them belongs to the backend.
* :meth:`PageAllocator.allocate` returns ``n`` distinct free page ids, not necessarily
  contiguous, or ``None`` (and changes nothing) when fewer than ``n`` are free.
* :meth:`PageAllocator.free` returns pages to the pool atomically: if any page is unknown,
  already free, or repeated in the call, it raises ``ValueError`` and frees none of them.
* Reuse order is LIFO: the most recently freed pages are handed out first (their device memory
  is the most likely to be warm in caches). A fresh pool hands out ``0, 1, 2, ...`` in order.
* Not thread-safe on its own; the adapter cache calls it under its lock.
"""
from __future__ import annotations

from collections.abc import Iterable


class PageAllocator:
    """Fixed pool of page ids with LIFO reuse."""

    def __init__(self, num_pages: int) -> None:
        if isinstance(num_pages, bool) or not isinstance(num_pages, int) or num_pages < 0:
            raise ValueError(f"num_pages must be a non-negative int, got {num_pages!r}")
        self._num_pages = num_pages
        # Stack of free pages; the top (end) is handed out next.
        self._free_stack: list[int] = list(range(num_pages - 1, -1, -1))
        self._free_set: set[int] = set(self._free_stack)
        self._used: set[int] = set()

    @property
    def num_pages(self) -> int:
        return self._num_pages

    @property
    def num_free(self) -> int:
        return len(self._free_stack)

    @property
    def num_used(self) -> int:
        return len(self._used)

    def used_pages(self) -> frozenset[int]:
        return frozenset(self._used)

    def allocate(self, n: int) -> list[int] | None:
        """Take ``n`` free pages, or return ``None`` and change nothing if fewer are free."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"page count must be a non-negative int, got {n!r}")
        if n > len(self._free_stack):
            return None
        pages = [self._free_stack.pop() for _ in range(n)]
        self._free_set.difference_update(pages)
        self._used.update(pages)
        return pages

    def free(self, pages: Iterable[int]) -> None:
        """Return ``pages`` to the pool; ``ValueError`` (freeing nothing) on any bad page."""
        pages = list(pages)
        seen: set[int] = set()
        for page in pages:
            if isinstance(page, bool) or not isinstance(page, int) or not 0 <= page < self._num_pages:
                raise ValueError(f"page {page!r} is not a page of this pool (0..{self._num_pages - 1})")
            if page in seen:
                raise ValueError(f"page {page} is listed twice in one free() call")
            if page not in self._used:
                raise ValueError(f"page {page} is already free (double free)")
            seen.add(page)
        self._used.difference_update(pages)
        self._free_stack.extend(pages)
        self._free_set.update(pages)

    def check_invariants(self) -> None:
        """Raise ``AssertionError`` if the free and used sets are inconsistent."""
        if len(self._free_set) != len(self._free_stack):
            raise AssertionError("free stack holds a page twice")
        if self._free_set & self._used:
            raise AssertionError(f"pages both free and used: {sorted(self._free_set & self._used)}")
        if self._free_set | self._used != set(range(self._num_pages)):
            raise AssertionError("free + used pages do not cover the pool exactly")

    def __repr__(self) -> str:
        return f"PageAllocator(num_pages={self._num_pages}, free={self.num_free})"
