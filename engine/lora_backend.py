"""The torch side of the adapter cache: reads PEFT adapters into host memory and writes them into the pool.

Implements ``engine.adapters.cache.AdapterBackend``: the cache decides *which* pages an adapter gets and when it
is evicted; this backend only moves tensors.
"""
from __future__ import annotations

from dataclasses import dataclass

from aspen.language_model import LanguageModel
from aspen.lora.peft.reader import LoraAdapter
from aspen.lora.pool import LoraPool, PooledAdapter, pages_needed


@dataclass(frozen=True)
class HostLora:
    adapter: LoraAdapter
    nbytes: int  # host bytes of A and B
    num_pages: int  # pool pages: one per rank row of each targeted projection


class LoraBackend:
    def __init__(self, model: LanguageModel, pool: LoraPool, allow_pickle: bool = False) -> None:
        self.model = model
        self.pool = pool
        self.allow_pickle = allow_pickle

    def load_host(self, adapter_id: str, path: str) -> HostLora:
        adapter = self.model.read_adapter(path, allow_pickle=self.allow_pickle)
        return HostLora(adapter, adapter.nbytes, pages_needed(adapter))

    def to_device(self, host: HostLora, pages: list[int]) -> PooledAdapter:
        return self.pool.write(host.adapter, pages)

    def release_device(self, dev: PooledAdapter) -> None:
        """Nothing to free on the device: the cache returns the pages to its allocator; rows are overwritten
        when reused."""
