"""Tests for engine.scheduling.block_manager: allocation, ref counts, adapter-aware prefix caching, LRU eviction."""
from __future__ import annotations

import random

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from engine.scheduling.block_manager import Allocation, BlockManager

BS = 4
SYSTEM = list(range(100, 108))  # two full blocks of BS=4


def _snapshot(bm: BlockManager, seq_ids) -> tuple:
    tables = {s: bm.block_table(s) for s in seq_ids if s in bm}
    return bm.num_free_blocks, bm.num_used_blocks, bm.num_cached_blocks, bm.stats(), tables


def _run_prompt(bm: BlockManager, seq_id, tokens, adapter) -> Allocation:
    """Allocate a prompt and commit its whole KV, as after a prefill step."""
    alloc = bm.allocate(seq_id, tokens, adapter)
    assert alloc is not None
    bm.commit_full_blocks(seq_id, tokens, adapter, len(tokens))
    bm.check_invariants()
    return alloc


# ---------------------------------------------------------------- validation
@pytest.mark.parametrize("bad", [0, -1, 1.5, "4", True, None])
@pytest.mark.parametrize("field", ["num_blocks", "block_size"])
def test_constructor_validates_ints(field, bad):
    kwargs = {"num_blocks": 8, "block_size": 4, field: bad}
    with pytest.raises(ValueError, match=field):
        BlockManager(**kwargs)


def test_constructor_validates_caching_flag_and_blocks_needed():
    with pytest.raises(ValueError, match="enable_prefix_caching"):
        BlockManager(8, 4, enable_prefix_caching="yes")
    bm = BlockManager(8, 4)
    assert [bm.blocks_needed(n) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]
    with pytest.raises(ValueError, match="num_tokens"):
        bm.blocks_needed(-1)


def test_bad_calls_raise_and_change_nothing():
    bm = BlockManager(8, BS)
    bm.allocate("a", [1, 2, 3], None)
    before = _snapshot(bm, ["a"])
    with pytest.raises(ValueError, match="already"):
        bm.allocate("a", [1, 2], None)
    with pytest.raises(ValueError, match="already"):
        bm.can_allocate("a", [1, 2], None)
    with pytest.raises(ValueError, match="non-empty"):
        bm.allocate("b", [], None)
    with pytest.raises(KeyError):
        bm.append_slots("zzz", 10)
    with pytest.raises(KeyError):
        bm.block_table("zzz")
    with pytest.raises(ValueError, match="adapter_key"):
        bm.commit_full_blocks("a", [1, 2, 3], ("lora", 1), 3)
    with pytest.raises(ValueError, match="num_computed_tokens"):
        bm.commit_full_blocks("a", [1, 2, 3], None, 4)
    with pytest.raises(ValueError, match="num_computed_tokens"):
        bm.commit_full_blocks("a", [1, 2, 3, 4, 5], None, 5)  # table holds only 4 slots
    assert _snapshot(bm, ["a"]) == before
    bm.check_invariants()


# -------------------------------------------------- allocation, free, reuse
def test_allocate_free_reuse():
    bm = BlockManager(8, BS, enable_prefix_caching=False)
    a = bm.allocate("a", list(range(10)), None)
    b = bm.allocate("b", list(range(5)), None)
    assert a is not None and b is not None
    assert len(a.block_table) == 3 and len(b.block_table) == 2
    assert a.num_cached_tokens == b.num_cached_tokens == 0
    assert not set(a.block_table) & set(b.block_table)
    assert bm.block_table("a") == a.block_table
    assert (bm.num_used_blocks, bm.num_free_blocks, bm.usage) == (5, 3, 5 / 8)
    bm.check_invariants()
    bm.free("a")
    bm.free("a")  # second free and unknown ids are no-ops
    bm.free("never-seen")
    assert "a" not in bm and (bm.num_used_blocks, bm.num_free_blocks) == (2, 6)
    c = bm.allocate("c", list(range(24)), None)  # all 6 remaining blocks, reusing a's
    assert c is not None and set(a.block_table) <= set(c.block_table)
    assert bm.num_free_blocks == 0
    bm.free("b")
    bm.free("c")
    bm.check_invariants()
    assert (bm.num_used_blocks, bm.num_free_blocks) == (0, 8)


def test_exhaustion_returns_none_and_changes_nothing():
    bm = BlockManager(4, BS)
    _run_prompt(bm, "a", list(range(12)), None)  # 3 blocks, 1 left
    before = _snapshot(bm, ["a"])
    assert not bm.can_allocate("b", list(range(50, 58)), None)
    assert bm.allocate("b", list(range(50, 58)), None) is None
    assert "b" not in bm
    assert not bm.can_append("a", 21)
    assert not bm.append_slots("a", 21)
    assert _snapshot(bm, ["a"]) == before
    assert bm.can_append("a", 16) and bm.append_slots("a", 16)
    assert bm.num_free_blocks == 0
    bm.check_invariants()


def test_evictable_hits_do_not_count_as_fresh_blocks():
    bm = BlockManager(3, BS)
    _run_prompt(bm, "a", SYSTEM + [1], None)  # 2 cached blocks + 1 private
    bm.free("a")
    assert bm.num_free_blocks == 3 and bm.num_cached_blocks == 2
    # 13 tokens = 2 cached hits (revived from the LRU) + 2 fresh, but only 1 block is truly free:
    # must refuse instead of evicting its own hits.
    big = SYSTEM + [7, 7, 7, 7, 7]
    assert not bm.can_allocate("c", big, None)
    assert bm.allocate("c", big, None) is None
    assert bm.num_cached_blocks == 2 and bm.stats().evictions == 0
    ok = bm.allocate("b", SYSTEM + [9, 9, 9, 9], None)  # 2 hits + 1 fresh fits exactly
    assert ok is not None and ok.num_cached_tokens == 8
    assert bm.num_free_blocks == 0
    bm.check_invariants()


def test_append_crosses_block_boundaries():
    bm = BlockManager(4, BS)
    first = bm.allocate("a", [1, 2, 3, 4], None).block_table
    assert len(first) == 1
    assert bm.append_slots("a", 4) and bm.block_table("a") == first  # still fits
    assert bm.append_slots("a", 5)
    t = bm.block_table("a")
    assert len(t) == 2 and t[:1] == first
    assert bm.append_slots("a", 8) and bm.block_table("a") == t
    assert bm.append_slots("a", 3) and bm.block_table("a") == t  # never shrinks
    assert bm.append_slots("a", 13)  # jump two boundaries at once
    t2 = bm.block_table("a")
    assert len(t2) == 4 and t2[:2] == t and len(set(t2)) == 4
    assert not bm.append_slots("a", 17) and bm.block_table("a") == t2
    bm.check_invariants()


# ------------------------------------------------------------ prefix caching
def test_shared_system_prompt_hits_same_blocks():
    bm = BlockManager(16, BS)
    a = _run_prompt(bm, "a", SYSTEM + [1, 2, 3], ("lora", 1))
    assert a.num_cached_tokens == 0
    b = bm.allocate("b", SYSTEM + [9, 9], ("lora", 1))
    assert b.num_cached_tokens == 8
    assert b.block_table[:2] == a.block_table[:2]
    assert not set(b.block_table[2:]) & set(a.block_table)
    assert bm.stats().prefix_hit_blocks == 2
    assert bm.num_used_blocks == 4  # 2 shared + 1 private each
    bm.free("a")
    assert bm.num_used_blocks == 3  # shared blocks still held by b
    bm.free("b")
    assert bm.num_used_blocks == 0 and bm.num_cached_blocks == 2
    c = bm.allocate("c", SYSTEM + [5], ("lora", 1))  # revived from the evictable LRU
    assert c.num_cached_tokens == 8 and c.block_table[:2] == a.block_table[:2]
    assert bm.num_used_blocks == 3
    bm.check_invariants()


def test_divergent_prefix_matches_only_up_to_divergence():
    bm = BlockManager(16, BS)
    a = _run_prompt(bm, "a", SYSTEM + [1, 2, 3, 4, 5], None)
    # Same second block tokens but a different first block: the chain breaks at block 0.
    other = [0, 0, 0, 0] + SYSTEM[4:] + [1, 2, 3, 4, 5]
    queried = bm.stats().prefix_query_blocks
    b = bm.allocate("b", other, None)
    assert bm.stats().prefix_query_blocks - queried == 1  # lookup stops at the first miss
    assert b.num_cached_tokens == 0 and not set(b.block_table) & set(a.block_table)
    c = bm.allocate("c", SYSTEM[:4] + [0, 0, 0, 0, 1], None)
    assert c.num_cached_tokens == 4 and c.block_table[0] == a.block_table[0]
    assert c.block_table[1] != a.block_table[1]
    bm.check_invariants()


@pytest.mark.parametrize("key_a,key_b", [(None, ("lora", 1)), (("lora", 1), ("lora", 2)), (1, "1")])
def test_different_adapters_never_share(key_a, key_b):
    bm = BlockManager(16, BS)
    prompt = SYSTEM + [1, 2]
    a = _run_prompt(bm, "a", prompt, key_a)
    b = _run_prompt(bm, "b", prompt, key_b)
    assert b.num_cached_tokens == 0
    assert not set(a.block_table) & set(b.block_table)
    bm.free("a")
    bm.free("b")
    assert bm.cached_prefix_len(prompt, key_a) == bm.cached_prefix_len(prompt, key_b) == 8
    c = bm.allocate("c", prompt, key_b)
    assert c.block_table[:2] == b.block_table[:2]
    assert not set(c.block_table) & set(a.block_table)


def test_fully_cached_prompt_still_computes_last_block():
    bm = BlockManager(16, BS)
    a = _run_prompt(bm, "a", SYSTEM, None)
    queried = bm.stats().prefix_query_blocks
    b = bm.allocate("b", SYSTEM, None)
    assert b.num_cached_tokens == 4  # only block 0; the block holding the last token is fresh
    assert b.block_table[0] == a.block_table[0] and b.block_table[1] not in a.block_table
    assert bm.stats().prefix_query_blocks - queried == 1  # only (len - 1) // BS blocks are matchable
    c = bm.allocate("c", SYSTEM + [5], None)
    assert c.num_cached_tokens == 8
    single = bm.allocate("d", [42], None)
    assert single.num_cached_tokens == 0 and len(single.block_table) == 1
    bm.check_invariants()


def test_caching_disabled_gives_no_hits():
    bm = BlockManager(16, BS, enable_prefix_caching=False)
    a = _run_prompt(bm, "a", SYSTEM + [1], None)
    b = _run_prompt(bm, "b", SYSTEM + [1], None)
    assert b.num_cached_tokens == 0 and not set(a.block_table) & set(b.block_table)
    assert bm.num_cached_blocks == 0 and bm.cached_prefix_len(SYSTEM + [1], None) == 0
    bm.free("a")
    bm.free("b")
    assert bm.stats().prefix_query_blocks == 0 and bm.stats().prefix_hit_blocks == 0


def test_commit_is_incremental_and_idempotent():
    bm = BlockManager(16, BS)
    tokens = SYSTEM + [1, 2, 3]
    bm.allocate("a", tokens, None)
    bm.commit_full_blocks("a", tokens, None, 3)  # no full block yet
    assert bm.num_cached_blocks == 0
    bm.commit_full_blocks("a", tokens, None, 6)
    assert bm.num_cached_blocks == 1 and bm.cached_prefix_len(tokens, None) == 4
    bm.commit_full_blocks("a", tokens, None, 11)
    bm.commit_full_blocks("a", tokens, None, 11)
    bm.commit_full_blocks("a", tokens, None, 2)
    assert bm.num_cached_blocks == 2 and bm.cached_prefix_len(tokens, None) == 8
    # Decode: generated tokens extend the chain once their KV is computed.
    tokens += [4, 5]
    assert bm.append_slots("a", len(tokens))
    bm.commit_full_blocks("a", tokens, None, 12)
    assert bm.cached_prefix_len(tokens + [0], None) == 12
    bm.check_invariants()


def test_duplicate_commit_keeps_existing_entry():
    bm = BlockManager(16, BS)
    prompt = SYSTEM + [1]
    a = bm.allocate("a", prompt, None)
    b = bm.allocate("b", prompt, None)  # both miss: computed twice in the same batch
    bm.commit_full_blocks("a", prompt, None, len(prompt))
    bm.commit_full_blocks("b", prompt, None, len(prompt))
    assert bm.num_cached_blocks == 2
    bm.check_invariants()
    bm.free("b")  # b's duplicate blocks were never cached: truly free, not evictable
    bm.free("a")
    c = bm.allocate("c", prompt, None)
    assert c.block_table[:2] == a.block_table[:2]
    assert not set(c.block_table[:2]) & set(b.block_table)
    bm.check_invariants()


def test_lru_evicts_least_recently_freed_after_free_blocks():
    bm = BlockManager(4, 2)
    prompts = {name: [i, i] for i, name in enumerate("xyz")}
    blocks = {n: _run_prompt(bm, n, p, None).block_table[0] for n, p in prompts.items()}
    for name in ("y", "x", "z"):  # release order defines the LRU order
        bm.free(name)
    assert bm.num_free_blocks == 4 and bm.num_cached_blocks == 3
    first = bm.allocate("n0", [90, 90], None).block_table[0]
    assert first not in blocks.values() and bm.stats().evictions == 0  # truly free block first
    taken = [bm.allocate(f"n{i}", [91 + i, 91 + i], None).block_table[0] for i in (1, 2)]
    assert taken == [blocks["y"], blocks["x"]] and bm.stats().evictions == 2
    for name, expected in (("y", 0), ("x", 0), ("z", 2)):  # evicted entries are no longer hit
        assert bm.cached_prefix_len(prompts[name] + [0], None) == expected
    bm.free("n0")  # z2 needs the cached z block plus one fresh block
    z = bm.allocate("z2", prompts["z"] + [0], None)
    assert z.num_cached_tokens == 2 and z.block_table[0] == blocks["z"]
    bm.check_invariants()


def test_revived_block_leaves_lru():
    bm = BlockManager(3, 2)
    a = _run_prompt(bm, "a", [1, 1, 2, 2, 3], None)  # blocks A0, A1 cached, A2 private
    bm.free("a")  # A2 -> free list; A0, A1 -> LRU
    b = bm.allocate("b", [1, 1, 9], None)  # revives A0 and takes the free A2
    assert b.block_table == (a.block_table[0], a.block_table[2])
    c = bm.allocate("c", [5], None)  # must evict A1, never the revived A0
    assert c.block_table == (a.block_table[1],) and bm.stats().evictions == 1
    assert bm.cached_prefix_len([1, 1, 2, 2, 3], None) == 2
    bm.check_invariants()


def test_free_releases_tail_first_so_prefix_root_survives_longest():
    bm = BlockManager(2, 2)
    a = _run_prompt(bm, "a", [1, 1, 2, 2], None)  # both blocks cached
    bm.free("a")
    c = bm.allocate("c", [5], None)
    assert c.block_table == (a.block_table[1],)  # the deeper block is evicted first
    assert bm.cached_prefix_len([1, 1, 2, 2, 3], None) == 2
    bm.check_invariants()


def test_reset_prefix_cache_drops_only_unreferenced_entries():
    bm = BlockManager(8, BS)
    _run_prompt(bm, "a", SYSTEM + [1], None)
    _run_prompt(bm, "b", [7] * 8 + [1], None)
    bm.free("a")
    bm.reset_prefix_cache()
    bm.check_invariants()
    assert bm.cached_prefix_len(SYSTEM + [1], None) == 0
    assert bm.cached_prefix_len([7] * 8 + [1], None) == 8  # still held by b
    assert bm.num_cached_blocks == 2 and bm.num_free_blocks == 5
    assert bm.stats().evictions == 0


# ----------------------------------------------------------- random/stateful
ADAPTERS = [None, ("lora", 1), ("lora", 2), "b"]
PREFIXES = [[], [1, 2, 3], SYSTEM, SYSTEM + [5, 6, 7, 8, 9]]


class _Model:
    """Drives a BlockManager and checks it against a shadow of what each block's KV holds."""

    def __init__(self, num_blocks: int, block_size: int, caching: bool) -> None:
        self.bm = BlockManager(num_blocks, block_size, caching)
        self.bs = block_size
        self.seqs: dict[int, dict] = {}
        self.content: dict[int, tuple] = {}  # block -> (adapter, all tokens up to the block's end)
        self.next_id = 0

    def allocate(self, tokens: list[int], adapter) -> None:
        sid, self.next_id = self.next_id, self.next_id + 1
        free_before = self.bm.num_free_blocks
        alloc = self.bm.allocate(sid, tokens, adapter)
        if alloc is None:
            assert self.bm.num_free_blocks == free_before and sid not in self.bm
            return
        hit = alloc.num_cached_tokens
        assert hit % self.bs == 0 and hit < len(tokens)
        assert len(alloc.block_table) == self.bm.blocks_needed(len(tokens))
        for i in range(hit // self.bs):  # every hit block really holds this adapter's prefix
            assert self.content[alloc.block_table[i]] == (adapter, tuple(tokens[: (i + 1) * self.bs]))
        self.seqs[sid] = {"tokens": tokens, "adapter": adapter, "computed": hit}

    def append(self, sid: int, new_tokens: list[int]) -> None:
        seq = self.seqs[sid]
        table = self.bm.block_table(sid)
        if self.bm.append_slots(sid, len(seq["tokens"]) + len(new_tokens)):
            seq["tokens"] = seq["tokens"] + new_tokens
        else:
            assert self.bm.block_table(sid) == table
        assert len(self.bm.block_table(sid)) * self.bs >= len(seq["tokens"])

    def commit(self, sid: int, frac: float) -> None:
        seq = self.seqs[sid]
        table = self.bm.block_table(sid)
        n = min(len(seq["tokens"]), int(frac * (len(table) * self.bs + 1)))
        for i in range(seq["computed"] // self.bs, n // self.bs):  # blocks written by this step
            self.content[table[i]] = (seq["adapter"], tuple(seq["tokens"][: (i + 1) * self.bs]))
        self.bm.commit_full_blocks(sid, seq["tokens"], seq["adapter"], n)
        seq["computed"] = max(seq["computed"], n)

    def free(self, sid: int) -> None:
        del self.seqs[sid]
        self.bm.free(sid)

    def check(self) -> None:
        self.bm.check_invariants()
        refs: dict[int, int] = {}
        for sid in self.seqs:
            for b in self.bm.block_table(sid):
                refs[b] = refs.get(b, 0) + 1
        for sid, seq in self.seqs.items():  # blocks still to be written are private
            for b in self.bm.block_table(sid)[seq["computed"] // self.bs:]:
                assert refs[b] == 1, f"block {b} pending writes for seq {sid} is shared"

    def drain(self) -> None:
        for sid in list(self.seqs):
            self.free(sid)
        self.check()
        assert self.bm.num_used_blocks == 0 and self.bm.num_free_blocks == self.bm.num_blocks


def _random_prompt(rng: random.Random) -> list[int]:
    return rng.choice(PREFIXES) + [rng.randrange(4) for _ in range(rng.randint(1, 9))]


@pytest.mark.parametrize("num_blocks,block_size,caching", [(24, 4, True), (10, 1, True), (16, 3, False)])
def test_random_ops_keep_invariants_and_never_leak(num_blocks, block_size, caching):
    rng = random.Random(1234 + num_blocks)
    model = _Model(num_blocks, block_size, caching)
    for _ in range(3000):
        op = rng.random()
        sids = list(model.seqs)
        if op < 0.3 or not sids:
            model.allocate(_random_prompt(rng), rng.choice(ADAPTERS))
        elif op < 0.55:
            model.append(rng.choice(sids), [rng.randrange(4) for _ in range(rng.randint(1, 6))])
        elif op < 0.8:
            model.commit(rng.choice(sids), rng.random() * 1.2)
        elif op < 0.995:
            model.free(rng.choice(sids))
        else:
            model.bm.reset_prefix_cache()
        model.check()
    stats = model.bm.stats()
    assert stats.prefix_hit_blocks > 0 if caching else stats.prefix_query_blocks == 0
    model.drain()
    model.bm.reset_prefix_cache()
    assert model.bm.num_cached_blocks == 0


class BlockManagerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.model = _Model(12, 2, True)

    @rule(prefix=st.sampled_from(PREFIXES), tail=st.lists(st.integers(0, 2), min_size=1, max_size=5),
          adapter=st.sampled_from(ADAPTERS))
    def allocate(self, prefix, tail, adapter):
        self.model.allocate(prefix + tail, adapter)

    @rule(pick=st.integers(0, 10**6), n=st.integers(1, 5))
    def append(self, pick, n):
        if self.model.seqs:
            self.model.append(sorted(self.model.seqs)[pick % len(self.model.seqs)], [1] * n)

    @rule(pick=st.integers(0, 10**6), frac=st.floats(0, 1.2))
    def commit(self, pick, frac):
        if self.model.seqs:
            self.model.commit(sorted(self.model.seqs)[pick % len(self.model.seqs)], frac)

    @rule(pick=st.integers(0, 10**6))
    def free(self, pick):
        if self.model.seqs:
            self.model.free(sorted(self.model.seqs)[pick % len(self.model.seqs)])

    @invariant()
    def consistent(self):
        self.model.check()

    def teardown(self):
        self.model.drain()


TestBlockManagerStateful = BlockManagerMachine.TestCase
TestBlockManagerStateful.settings = settings(max_examples=40, stateful_step_count=40, deadline=None)
