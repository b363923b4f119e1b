"""Paged KV-cache block manager with adapter-aware prefix caching (pure Python, stdlib only).

The device KV pool is ``num_blocks`` blocks of ``block_size`` token slots. Each sequence owns a
*block table*: the token at position ``p`` lives in ``block_table[p // block_size]`` at offset
``p % block_size``. This module does only the bookkeeping; the model runner owns the tensors.

Block states. Every block is in exactly one of three states:

* **in use** -- ref count > 0, i.e. listed in at least one block table;
* **free** -- ref count 0 and holding no cached prefix; kept in a FIFO ``deque``;
* **evictable** -- ref count 0 but still holding a cached prefix; kept in an LRU
  ``OrderedDict`` ordered by release time (least recently freed first).

Ref counts. A block is shared only through a prefix-cache hit, and only full blocks whose KV is
computed are ever cached, so shared blocks are read-only. The block a sequence writes into is
always private: matching stops before the block holding the prompt's last token.

Hash chain. Once KV of a full block is computed (:meth:`BlockManager.commit_full_blocks`), the
block is keyed by ``blake2b(parent_key || adapter_tag || token ids)``, where ``parent_key`` is
the key of the sequence's previous block (a fixed all-zero root for block 0). A key thus names
the adapter *and the whole prefix* up to the end of the block. All fields are fixed-width, so the
encoding is unambiguous and, with a 256-bit digest, collision-safe. :meth:`BlockManager.allocate`
walks the prompt block by block and reuses the longest run of cached blocks whose keys match,
stopping at the first miss. Only blocks that end at or before token ``len(prompt) - 1`` can
match, so at least the last prompt token is always computed (its logits are needed).

Adapters. A LoRA adapter changes the K/V projections, so KV computed under one adapter is wrong
under another. ``adapter_key`` (any hashable: ``None`` for the base model, ``(adapter_id,
load_generation)`` for an adapter) is interned to a serial that is never reused and is mixed into
every key, so prefixes are **never shared across different adapter keys**, even for identical
tokens. Bumping the load generation on reload makes the old KV unreachable without a flush. The
intern table grows by one small entry per distinct adapter key ever seen.

Eviction. A fresh block comes from the free list first; only when that is empty is the least
recently freed evictable block recycled (its cache entry is dropped). :meth:`BlockManager.free`
releases a table back to front so a prefix's deeper blocks are evicted before its root. An evicted
block orphans its cached descendants (lookup stops at the first miss) until they are evicted in
turn or the same content is cached again.

Every call is O(number of blocks touched).
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

_DIGEST_SIZE = 32
_ROOT_KEY = bytes(_DIGEST_SIZE)


@dataclass(frozen=True)
class Allocation:
    """Result of a successful :meth:`BlockManager.allocate`.

    ``block_table``: blocks now held by the sequence, in token order.
    ``num_cached_tokens``: leading prompt tokens whose KV is already in those blocks (prefix-cache
    hit); a multiple of ``block_size`` and always < the prompt length.
    """

    block_table: tuple[int, ...]
    num_cached_tokens: int


@dataclass(frozen=True)
class BlockManagerStats:
    """Cumulative prefix-cache counters (only successful allocations are counted)."""

    prefix_hit_blocks: int
    prefix_query_blocks: int
    evictions: int

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hit_blocks / self.prefix_query_blocks if self.prefix_query_blocks else 0.0


@dataclass
class _SeqState:
    adapter_key: Hashable
    block_table: list[int]
    # Keys of the leading full blocks already committed (or matched); the hash-chain tail.
    block_keys: list[bytes] = field(default_factory=list)


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


class BlockManager:
    """Ref-counted paged-KV block allocator with adapter-aware prefix caching (see module doc)."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.num_blocks = _check_int("num_blocks", num_blocks, 1)
        self.block_size = _check_int("block_size", block_size, 1)
        if enable_prefix_caching not in (True, False):
            raise ValueError(f"enable_prefix_caching must be a bool, got {enable_prefix_caching!r}")
        self.enable_prefix_caching = bool(enable_prefix_caching)
        self._ref_count = [0] * num_blocks
        self._block_key: list[bytes | None] = [None] * num_blocks  # set iff the block owns a cache entry
        self._cached: dict[bytes, int] = {}  # key -> block id
        self._free: deque[int] = deque(range(num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()  # oldest release first
        self._seqs: dict[Hashable, _SeqState] = {}
        self._adapter_tags: dict[Hashable, bytes] = {}
        self._prefix_hit_blocks = 0
        self._prefix_query_blocks = 0
        self._evictions = 0

    # ----------------------------------------------------------------- queries
    @property
    def num_free_blocks(self) -> int:
        """Blocks allocatable now: truly free plus evictable cached blocks (ref count 0)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        """Blocks with ref count > 0."""
        return self.num_blocks - self.num_free_blocks

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks currently holding a prefix-cache entry (in use or evictable)."""
        return len(self._cached)

    def __contains__(self, seq_id: Hashable) -> bool:
        return seq_id in self._seqs

    def blocks_needed(self, num_tokens: int) -> int:
        """Blocks required to hold ``num_tokens`` tokens."""
        _check_int("num_tokens", num_tokens, 0)
        return -(-num_tokens // self.block_size)

    def block_table(self, seq_id: Hashable) -> tuple[int, ...]:
        """The sequence's block table. Raises KeyError for an unknown ``seq_id``."""
        return tuple(self._state(seq_id).block_table)

    def cached_prefix_len(self, token_ids: Sequence[int], adapter_key: Hashable) -> int:
        """Tokens :meth:`allocate` would find cached for this prompt now; changes nothing."""
        return len(self._match_prefix(token_ids, adapter_key)[1]) * self.block_size

    def stats(self) -> BlockManagerStats:
        return BlockManagerStats(self._prefix_hit_blocks, self._prefix_query_blocks, self._evictions)

    # -------------------------------------------------------------- allocation
    def can_allocate(self, seq_id: Hashable, token_ids: Sequence[int], adapter_key: Hashable) -> bool:
        """Whether :meth:`allocate` would succeed now. Same ValueErrors as ``allocate``."""
        return self._plan(seq_id, token_ids, adapter_key)[3]

    def allocate(
        self, seq_id: Hashable, token_ids: Sequence[int], adapter_key: Hashable
    ) -> Allocation | None:
        """Give a new (or preempted-and-restarted) sequence blocks for its prompt ``token_ids``.

        Reuses the longest matching run of cached full blocks (same adapter key and whole prefix),
        excluding the block holding the last prompt token; the rest are fresh blocks. Returns None,
        changing nothing, when there are not enough blocks. Raises ValueError if ``seq_id`` already
        has blocks or ``token_ids`` is empty.
        """
        keys, hit_blocks, num_queried, feasible = self._plan(seq_id, token_ids, adapter_key)
        if not feasible:
            return None
        for block in hit_blocks:
            if self._ref_count[block] == 0:
                del self._evictable[block]
            self._ref_count[block] += 1
        num_fresh = self.blocks_needed(len(token_ids)) - len(hit_blocks)
        table = hit_blocks + [self._take_block() for _ in range(num_fresh)]
        self._seqs[seq_id] = _SeqState(adapter_key, table, keys)
        self._prefix_hit_blocks += len(hit_blocks)
        self._prefix_query_blocks += num_queried
        return Allocation(tuple(table), len(hit_blocks) * self.block_size)

    def can_append(self, seq_id: Hashable, new_total_len: int) -> bool:
        """Whether :meth:`append_slots` would succeed now. KeyError for an unknown ``seq_id``."""
        return self._extra_blocks(self._state(seq_id), new_total_len) <= self.num_free_blocks

    def append_slots(self, seq_id: Hashable, new_total_len: int) -> bool:
        """Grow the block table to hold ``new_total_len`` tokens (never shrinks it).

        Returns False, changing nothing, if there are not enough free blocks.
        """
        state = self._state(seq_id)
        extra = self._extra_blocks(state, new_total_len)
        if extra > self.num_free_blocks:
            return False
        state.block_table.extend(self._take_block() for _ in range(extra))
        return True

    def commit_full_blocks(
        self, seq_id: Hashable, token_ids: Sequence[int], adapter_key: Hashable, num_computed_tokens: int
    ) -> None:
        """Record that KV for ``token_ids[:num_computed_tokens]`` is computed.

        Each block fully covered becomes a cache entry (unless one with the same key exists, which
        is kept; this block then stays private). Idempotent; a no-op when caching is off.
        ``token_ids`` must extend the tokens the sequence was allocated with. Raises KeyError for
        an unknown ``seq_id``, ValueError for a different ``adapter_key`` or a count beyond
        ``len(token_ids)`` or the table's capacity.
        """
        state = self._state(seq_id)
        if adapter_key != state.adapter_key:
            raise ValueError(f"adapter_key {adapter_key!r} != {state.adapter_key!r} used to allocate {seq_id!r}")
        _check_int("num_computed_tokens", num_computed_tokens, 0)
        if num_computed_tokens > min(len(token_ids), len(state.block_table) * self.block_size):
            raise ValueError(
                f"num_computed_tokens {num_computed_tokens} exceeds len(token_ids) {len(token_ids)} "
                f"or the {len(state.block_table)} allocated blocks"
            )
        if not self.enable_prefix_caching:
            return
        keys = state.block_keys
        tag = self._adapter_tag(adapter_key)
        parent = keys[-1] if keys else _ROOT_KEY
        for i in range(len(keys), num_computed_tokens // self.block_size):
            key = self._key(parent, tag, token_ids, i)
            block = state.block_table[i]
            if key not in self._cached:
                assert self._block_key[block] is None, f"block {block} is private but already cached"
                self._cached[key] = block
                self._block_key[block] = key
            keys.append(key)
            parent = key

    def free(self, seq_id: Hashable) -> None:
        """Drop the sequence's references, last block first. Unknown ``seq_id``: no-op.

        A block reaching ref count 0 becomes free if uncached, else joins the LRU tail.
        """
        state = self._seqs.pop(seq_id, None)
        if state is None:
            return
        for block in reversed(state.block_table):
            self._ref_count[block] -= 1
            if self._ref_count[block] == 0:
                if self._block_key[block] is None:
                    self._free.append(block)
                else:
                    self._evictable[block] = None

    def reset_prefix_cache(self) -> None:
        """Drop every cached-but-unreferenced entry; those blocks become truly free."""
        for block in self._evictable:
            del self._cached[self._block_key[block]]
            self._block_key[block] = None
            self._free.append(block)
        self._evictable.clear()

    # ------------------------------------------------------------- invariants
    def check_invariants(self) -> None:
        """Raise AssertionError describing the first inconsistency found (O(num_blocks + tables))."""
        refs = [0] * self.num_blocks
        for seq_id, state in self._seqs.items():
            table = state.block_table
            assert len(set(table)) == len(table), f"seq {seq_id!r} lists a block twice: {table}"
            assert len(state.block_keys) <= len(table), f"seq {seq_id!r} has more keys than blocks"
            for block in table:
                assert 0 <= block < self.num_blocks, f"seq {seq_id!r} holds bad block id {block}"
                refs[block] += 1
        assert refs == self._ref_count, f"ref counts {self._ref_count} != block-table counts {refs}"
        free = set(self._free)
        assert len(free) == len(self._free), f"duplicate block in free list {list(self._free)}"
        for block in free:
            assert refs[block] == 0, f"free block {block} has ref count {refs[block]}"
            assert self._block_key[block] is None, f"free block {block} is still cached"
            assert block not in self._evictable, f"block {block} is both free and evictable"
        for block in self._evictable:
            assert refs[block] == 0, f"evictable block {block} has ref count {refs[block]}"
            assert self._block_key[block] is not None, f"evictable block {block} is not cached"
        in_use = sum(1 for r in refs if r > 0)
        assert in_use + len(free) + len(self._evictable) == self.num_blocks, (
            f"{in_use} in use + {len(free)} free + {len(self._evictable)} evictable != {self.num_blocks}"
        )
        for key, block in self._cached.items():
            assert self._block_key[block] == key, f"cache entry for block {block} disagrees with the block"
        num_keyed = sum(1 for k in self._block_key if k is not None)
        assert num_keyed == len(self._cached), f"{num_keyed} keyed blocks but {len(self._cached)} entries"
        assert self.enable_prefix_caching or not self._cached, "cache entries while caching is off"

    # ---------------------------------------------------------------- helpers
    def _state(self, seq_id: Hashable) -> _SeqState:
        try:
            return self._seqs[seq_id]
        except KeyError:
            raise KeyError(f"unknown sequence {seq_id!r}") from None

    def _adapter_tag(self, adapter_key: Hashable) -> bytes:
        tag = self._adapter_tags.get(adapter_key)
        if tag is None:
            tag = len(self._adapter_tags).to_bytes(8, "little")
            self._adapter_tags[adapter_key] = tag
        return tag

    def _key(self, parent: bytes, tag: bytes, token_ids: Sequence[int], index: int) -> bytes:
        """Cache key of block ``index`` of ``token_ids`` (which must be full) under ``parent``."""
        start = index * self.block_size
        h = hashlib.blake2b(parent, digest_size=_DIGEST_SIZE)
        h.update(tag)
        h.update(array("q", token_ids[start:start + self.block_size]).tobytes())
        return h.digest()

    def _match_prefix(
        self, token_ids: Sequence[int], adapter_key: Hashable
    ) -> tuple[list[bytes], list[int], int]:
        """(keys, block ids) of the longest cached run, and how many blocks were looked up."""
        if not self.enable_prefix_caching:
            return [], [], 0
        tag = self._adapter_tag(adapter_key)
        keys: list[bytes] = []
        blocks: list[int] = []
        parent = _ROOT_KEY
        num_matchable = (len(token_ids) - 1) // self.block_size
        for i in range(num_matchable):
            key = self._key(parent, tag, token_ids, i)
            block = self._cached.get(key)
            if block is None:
                return keys, blocks, i + 1
            keys.append(key)
            blocks.append(block)
            parent = key
        return keys, blocks, num_matchable

    def _plan(
        self, seq_id: Hashable, token_ids: Sequence[int], adapter_key: Hashable
    ) -> tuple[list[bytes], list[int], int, bool]:
        """(keys, hit blocks, blocks looked up, feasible) for allocating this prompt now."""
        if seq_id in self._seqs:
            raise ValueError(f"sequence {seq_id!r} already has blocks allocated")
        if len(token_ids) == 0:
            raise ValueError("token_ids must be non-empty")
        keys, hit_blocks, num_queried = self._match_prefix(token_ids, adapter_key)
        num_fresh = self.blocks_needed(len(token_ids)) - len(hit_blocks)
        # Evictable hits get revived by this allocation, so they cannot also serve as fresh blocks.
        num_revived = sum(1 for b in hit_blocks if self._ref_count[b] == 0)
        return keys, hit_blocks, num_queried, num_fresh <= self.num_free_blocks - num_revived

    def _extra_blocks(self, state: _SeqState, new_total_len: int) -> int:
        return max(0, self.blocks_needed(new_total_len) - len(state.block_table))

    def _take_block(self) -> int:
        """Pop a truly free block, else evict the least recently freed cached one; ref count 1."""
        if self._free:
            block = self._free.popleft()
        else:
            block, _ = self._evictable.popitem(last=False)
            del self._cached[self._block_key[block]]
            self._block_key[block] = None
            self._evictions += 1
        self._ref_count[block] = 1
        return block
