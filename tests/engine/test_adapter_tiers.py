"""HostTier and DeviceTier on their own: LRU order, budget and page accounting, victims (no backend, no torch)."""
from __future__ import annotations

from dataclasses import dataclass

import pytest

from engine.adapters.device_tier import DeviceTier
from engine.adapters.host_tier import HostTier


@dataclass
class Host:
    nbytes: int
    num_pages: int = 1


def nothing(_: str) -> bool:
    return False


# ---- HostTier ---------------------------------------------------------------------------
def test_host_tier_accounts_bytes_and_keeps_lru_order() -> None:
    t = HostTier(300)
    for aid, n in (("a", 100), ("b", 50), ("c", 100)):
        t.add(aid, Host(n))
    assert t.ids() == ["a", "b", "c"] and t.bytes_used == 250 and t.budget_bytes == 300
    t.touch("a")
    t.touch("unknown")  # not held: nothing happens
    assert t.ids() == ["b", "c", "a"] and "a" in t and "x" not in t
    copy = t.get("b")
    assert t.remove("b") is copy and t.get("b") is None and t.bytes_used == 200
    assert t.remove("b") is None and t.bytes_used == 200
    t.check_invariants()


def test_host_tier_victims_are_oldest_first_skip_kept_and_change_nothing() -> None:
    t = HostTier(300)
    for aid in "abc":
        t.add(aid, Host(100))
    assert t.victims(0, keep=nothing) == []  # fits already
    assert t.victims(100, keep=nothing) == ["a"]
    assert t.victims(150, keep=nothing) == ["a", "b"]  # freeing 100 is not enough for 150
    assert t.victims(100, keep=lambda aid: aid == "a") == ["b"]
    assert t.ids() == ["a", "b", "c"] and t.bytes_used == 300


def test_host_tier_fits_counts_only_kept_copies() -> None:
    t = HostTier(300)
    for aid in "abc":
        t.add(aid, Host(100))
    assert t.fits(300, keep=nothing) and not t.fits(301, keep=nothing)
    assert t.fits(100, keep=lambda aid: aid != "c") and not t.fits(101, keep=lambda aid: aid != "c")


def test_host_tier_refuses_overflow_duplicates_and_bad_budgets() -> None:
    t = HostTier(100)
    t.add("a", Host(60))
    with pytest.raises(ValueError, match="needs 50 bytes.*40 of 100 bytes free"):
        t.add("b", Host(50))
    with pytest.raises(ValueError, match="already has a host copy"):
        t.add("a", Host(10))
    assert t.ids() == ["a"] and t.bytes_used == 60
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="host_budget_bytes"):
            HostTier(bad)  # type: ignore[arg-type]
    assert HostTier(0).fits(0, keep=nothing)


def test_host_tier_counts_a_copy_at_the_size_it_had_when_added() -> None:
    t = HostTier(100)
    copy = Host(40)
    t.add("a", copy)
    copy.nbytes = 90  # a backend object changing under the tier does not unbalance the budget
    assert t.bytes_used == 40 and t.fits(60, keep=nothing)
    t.remove("a")
    assert t.bytes_used == 0
    t.check_invariants()


# ---- DeviceTier -------------------------------------------------------------------------
def place(t: DeviceTier, aid: str, need: int) -> list[int]:
    pages = t.allocate(need)
    t.add(aid, f"dev-{aid}", pages)
    return pages


def test_device_tier_holds_copies_with_their_pages_in_lru_order() -> None:
    t = DeviceTier(8)
    assert place(t, "a", 3) == [0, 1, 2] and place(t, "b", 2) == [3, 4]
    assert (t.num_pages, t.num_used, t.num_free) == (8, 5, 3)
    assert t.get("a") == "dev-a" and t.pages("a") == [0, 1, 2] and t.pages("x") == [] and t.get("x") is None
    t.touch("a")
    assert t.ids() == ["b", "a"]
    assert t.remove("a") == "dev-a" and t.num_free == 6 and "a" not in t
    assert t.remove("a") is None and t.num_free == 6
    assert place(t, "c", 1) == [2]  # the page freed last is reused first
    t.check_invariants()


def test_device_tier_victims_free_enough_pages_oldest_first_skipping_kept() -> None:
    t = DeviceTier(6)
    for aid, need in (("a", 2), ("b", 1), ("c", 2)):
        place(t, aid, need)
    assert t.num_free == 1 and t.victims(1, keep=nothing) == []
    assert t.victims(3, keep=nothing) == ["a"]
    assert t.victims(4, keep=nothing) == ["a", "b"]
    assert t.victims(3, keep=lambda aid: aid == "a") == ["b", "c"]
    assert t.fits(6, keep=nothing) and t.fits(5, keep=lambda aid: aid == "b") and not t.fits(6, keep=lambda aid: aid == "b")
    assert t.fits(4, keep=lambda aid: aid == "c") and not t.fits(5, keep=lambda aid: aid == "c")
    assert t.ids() == ["a", "b", "c"] and t.num_used == 5  # asking changed nothing


def test_device_tier_allocate_free_and_refusals() -> None:
    t = DeviceTier(4)
    place(t, "a", 3)
    with pytest.raises(AssertionError, match="2 pages wanted, 1 free"):
        t.allocate(2)
    pages = t.allocate(1)
    t.free(pages)  # a copy that was never made gives its pages back
    assert t.num_free == 1
    last = t.allocate(1)
    with pytest.raises(ValueError, match="already has a device copy"):
        t.add("a", "again", last)
    assert t.get("a") == "dev-a" and t.pages("a") == [0, 1, 2]
    t.free(last)
    t.check_invariants()


def test_device_tier_invariants_catch_pages_no_copy_holds() -> None:
    t = DeviceTier(4)
    place(t, "a", 2)
    t.check_invariants()
    t.allocate(1)  # taken and never added nor freed
    with pytest.raises(AssertionError, match="leaked or unaccounted"):
        t.check_invariants()
