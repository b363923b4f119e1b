"""Capacity: how much memory the engine's KV pool, device adapter pool and host adapter tier get.

The budget is ``memory_utilization`` times the memory available once the model is loaded (:func:`available_memory`:
free GPU memory on CUDA, else the host's ``MemAvailable``, capped by a cgroup v2 limit). :func:`plan_capacity`
splits it by one rule:

1. Sizes given explicitly (``num_kv_blocks``/``kv_cache_bytes``, ``lora_pool_pages``/``lora_pool_bytes``,
   ``host_adapter_bytes``) are taken as given and come out of the budget first.
2. Each derived part has a *want*: the KV pool ``max_num_seqs x max_model_len`` tokens (every sequence at full
   length); the device adapter pool ``max_num_seqs`` adapters of the largest rank/target set found under the
   adapter root (:data:`DEFAULT_ADAPTER_RANK` on all seven projections when none is found); the host tier
   :data:`HOST_TIER_MULTIPLE` times the device pool. Without an adapter root the pools get one page and no host
   tier (nothing can use them).
3. When the wants fit the budget each part gets its want and the rest stays free. Otherwise the device pool gets
   at most :data:`POOL_SHARE` of the budget, the host tier at most :data:`HOST_SHARE`, and the KV pool the rest;
   should that be less than one full context (``max_model_len`` tokens), the KV pool takes one full context and
   the adapter parts share what is left (the device pool first). A derived device pool and host tier hold at
   least one adapter each, even beyond the budget.
4. When the KV pool still holds fewer than ``max_model_len`` tokens, :class:`CapacityError` says how many tokens
   fit and which option to change.

The arithmetic is pure (no torch): the engine passes the per-block / per-page byte sizes of its model.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from aspen.lora.peft.config import module_name, parse_lora_config, read_adapter_config
from aspen.model.config import LORA_TARGETS, ModelConfig
from engine.adapters.paths import list_adapter_dirs

log = logging.getLogger("aspen.engine")

GiB = 1 << 30
#: Rank assumed for sizing the adapter pool when no adapter is found under the adapter root (on all seven
#: projections).
DEFAULT_ADAPTER_RANK = 16
#: The host tier holds this many times what the device pool holds.
HOST_TIER_MULTIPLE = 2
#: When the wants do not fit: the largest share of the budget the device adapter pool / host tier may take.
POOL_SHARE = 0.25
HOST_SHARE = 0.125
#: At most this many adapter configs are read at start-up to find the largest rank/target set.
MAX_SCANNED_ADAPTERS = 1000


class CapacityError(ValueError):
    """The KV pool cannot hold one full context (``max_model_len`` tokens) at this budget."""

    def __init__(self, message: str, tokens_that_fit: int) -> None:
        super().__init__(message)
        self.tokens_that_fit = tokens_that_fit


@dataclass(frozen=True)
class CapacityRequest:
    """What :func:`plan_capacity` sizes for. Byte sizes are per KV block / per pool page of the loaded model;
    ``adapter_pages``: pages of the largest adapter to plan for; ``None`` sizes: derived from the budget."""

    available_bytes: int
    utilization: float
    kv_bytes_per_block: int
    block_size: int
    page_bytes: int
    adapter_pages: int
    max_num_seqs: int
    max_model_len: int
    adapters: bool  # an adapter root is set: the pools are used
    kv_blocks: int | None = None
    pool_pages: int | None = None
    host_bytes: int | None = None

    @property
    def budget(self) -> int:
        return int(self.available_bytes * self.utilization)


@dataclass(frozen=True)
class Capacity:
    """The sizes chosen, with what they hold in user terms."""

    kv_blocks: int
    block_size: int
    pool_pages: int
    host_bytes: int
    adapter_pages: int  # of the adapter shape the counts below are for
    adapter_bytes: int  # host bytes of such an adapter (at most its pages' bytes)
    max_model_len: int

    @property
    def kv_tokens(self) -> int:
        return self.kv_blocks * self.block_size

    @property
    def full_sequences(self) -> int:
        return self.kv_tokens // self.max_model_len

    @property
    def device_adapters(self) -> int:
        return self.pool_pages // max(1, self.adapter_pages)

    @property
    def host_adapters(self) -> int:
        return self.host_bytes // max(1, self.adapter_bytes)


def plan_capacity(req: CapacityRequest) -> Capacity:
    """Sizes by the rule of this module's docstring; raises :class:`CapacityError` when the KV pool holds fewer
    than ``max_model_len`` tokens."""
    page, bpb = req.page_bytes, req.kv_bytes_per_block
    adapter_bytes = req.adapter_pages * page
    full_context_blocks = -(-req.max_model_len // req.block_size)
    free = req.budget
    kv, pool, host = req.kv_blocks, req.pool_pages, req.host_bytes
    if not req.adapters:
        pool = 1 if pool is None else pool
        host = 0 if host is None else host
    free -= (kv or 0) * bpb + (pool or 0) * page + (host or 0)
    want_kv = full_context_blocks * req.max_num_seqs if kv is None else 0
    want_pool = req.max_num_seqs * req.adapter_pages if pool is None else 0
    want_host = HOST_TIER_MULTIPLE * (want_pool or pool or 0) * page if host is None else 0
    if want_kv * bpb + want_pool * page + want_host <= free:
        d_kv, d_pool, d_host = want_kv, want_pool, want_host
    else:
        room = max(0, free)
        d_pool = min(want_pool, int(room * POOL_SHARE) // page)
        d_host = min(want_host, int(room * HOST_SHARE))
        d_kv = min(want_kv, max(0, room - d_pool * page - d_host) // bpb)
        if kv is None and d_kv < full_context_blocks:  # one full context first; the adapter parts share the rest
            d_kv = min(full_context_blocks, room // bpb)
            left = room - d_kv * bpb
            if want_pool:
                d_pool = min(d_pool, max(req.adapter_pages, left // page))
                left = max(0, left - d_pool * page)
            if want_host:
                d_host = min(d_host, max(adapter_bytes, left))
    kv = d_kv if kv is None else kv
    pool = max(d_pool, req.adapter_pages) if pool is None else pool  # derived: at least one adapter (want_*
    host = max(d_host, adapter_bytes) if host is None else host  # are 0 only when explicit or without adapters)
    if kv * req.block_size < req.max_model_len:
        tokens = kv * req.block_size
        if req.kv_blocks is not None:
            raise CapacityError(
                f"the KV cache set by --kv-cache-mb / --num-kv-blocks holds {tokens} tokens, fewer than "
                f"max_model_len={req.max_model_len}: lower --max-model-len to {tokens} or less, or raise "
                "--kv-cache-mb (or --num-kv-blocks)", tokens)
        raise CapacityError(
            f"the KV cache holds {tokens} tokens, fewer than max_model_len={req.max_model_len} (memory "
            f"utilization {req.utilization:g} of {req.available_bytes / GiB:.1f} GiB available): lower "
            f"--max-model-len to {tokens} or less, raise --memory-utilization, or set --kv-cache-mb", tokens)
    return Capacity(kv, req.block_size, pool, host, req.adapter_pages, adapter_bytes, req.max_model_len)


def available_memory(device) -> int:
    """Bytes the engine could still allocate on ``device``: free memory of a CUDA device, else the host's
    ``MemAvailable`` (``os.sysconf`` where /proc/meminfo is missing), capped by the cgroup v2 limit."""
    kind = getattr(device, "type", str(device).split(":")[0])
    if kind == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    available = _meminfo_available()
    if available is None:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    limit = _cgroup_room()
    return available if limit is None else min(available, limit)


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_room() -> int | None:
    """Bytes left under this process's cgroup v2 memory limit; None without one."""
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit == "max":
            return None
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read().strip())
        return max(0, int(limit) - used)
    except (OSError, ValueError):
        return None


def largest_adapter_pages(root: str | None, config: ModelConfig) -> tuple[int, str]:
    """Pool pages of the largest adapter (its rank summed over the projections it targets) among the first
    :data:`MAX_SCANNED_ADAPTERS` under ``root``, and a description of it; unreadable configs are skipped (they
    fail when requested). With none found: :data:`DEFAULT_ADAPTER_RANK` on all seven projections."""
    best, shape = 0, ""
    for adapter_id in (list_adapter_dirs(root) if root else [])[:MAX_SCANNED_ADAPTERS]:
        path = os.path.join(root, adapter_id)
        try:
            cfg = parse_lora_config(read_adapter_config(path), path, config)
        except Exception as e:  # noqa: BLE001 -- a bad adapter is refused when requested, not at start-up
            log.debug("sizing skips adapter %r: %s", adapter_id, e)
            continue
        ranks = {}
        for layer, proj in cfg.targeted(config):
            ranks[proj] = max(ranks.get(proj, 0), cfg.rank_for(module_name(layer, proj)))
        pages = sum(ranks.values())
        if pages > best:
            best, shape = pages, f"rank {max(ranks.values())} on {len(ranks)} projections ({adapter_id})"
    if best == 0:
        return DEFAULT_ADAPTER_RANK * len(LORA_TARGETS), (f"rank {DEFAULT_ADAPTER_RANK} on "
                                                          f"{len(LORA_TARGETS)} projections (none found)")
    return best, shape
