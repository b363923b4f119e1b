"""The device side of a step: owns the KV cache and the LoRA pool, runs the model, samples.

The scheduler (pure Python) says which token ranges of which requests run, each chunk carrying the pooled
adapter its request pinned at admission. The runner builds the step's flat batch (:class:`SeqChunk` per
request, one adapter slot per distinct pooled adapter), then its LoRA batch, runs the model once and samples
one token for every chunk that reached the end of its known tokens. It never looks an adapter up: the pin
guarantees the pooled copy stays put until the request releases it.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from aspen.language_model import LanguageModel
from aspen.lora.op import LoraBatch
from aspen.lora.pool import LoraPool, PooledAdapter
from aspen.model.batch import LOGITS_LAST, LOGITS_NONE, SeqChunk
from aspen.model.kv_cache import KVCache
from engine.sampler import Sampler, SampleResult, SamplingState
from engine.scheduling.scheduler import ScheduledChunk


class ModelRunner:
    def __init__(self, model: LanguageModel, kv: KVCache, pool: LoraPool, seed: int | None = None) -> None:
        self.model = model
        self.kv = kv
        self.pool = pool
        self.sampler = Sampler(seed=seed)
        self.eos_token_ids = tuple(model.config.eos_token_ids)

    @torch.inference_mode()
    def run(self, chunks: Sequence[ScheduledChunk], states: Callable[[str], SamplingState]
            ) -> tuple[list[ScheduledChunk], SampleResult | None]:
        """Run one step. Returns the chunks that were sampled and their sampling result (row i = chunk i)."""
        seq_chunks, pooled = self._seq_chunks(chunks)
        batch = self.model.flat_batch(seq_chunks, self.kv.block_size)
        lora = LoraBatch.for_step(batch, pooled, self.pool, self.model.dtype) if pooled else None
        logits = self.model.step(batch, self.kv, lora)
        sampled = [c for c in chunks if c.sample]
        if not sampled:
            return [], None
        result = self.sampler(logits, [states(c.request.request_id) for c in sampled], self.eos_token_ids)
        return sampled, result

    @staticmethod
    def _seq_chunks(chunks: Sequence[ScheduledChunk]) -> tuple[list[SeqChunk], list[PooledAdapter]]:
        """The step's sequence chunks, and the pooled adapters their adapter slots index (one slot per distinct
        pinned adapter)."""
        slots: dict[int, int] = {}  # id(pooled adapter) -> its slot
        pooled: list[PooledAdapter] = []
        seq_chunks = []
        for c in chunks:
            handle, slot = c.adapter_handle, -1
            if handle is not None:
                slot = slots.setdefault(id(handle), len(pooled))
                if slot == len(pooled):
                    pooled.append(handle)
            elif c.request.adapter_id is not None:
                raise RuntimeError(f"request {c.request.request_id!r} is scheduled for adapter "
                                   f"{c.request.adapter_id!r} without its pinned handle")
            tokens = c.request.all_token_ids[c.start:c.end]
            seq_chunks.append(SeqChunk(tokens, c.start, c.block_table, adapter_slot=slot,
                                       logits=LOGITS_LAST if c.sample else LOGITS_NONE))
        return seq_chunks, pooled
