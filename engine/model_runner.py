"""The device side of a step: owns the KV cache and the LoRA pool, runs the model, samples.

The scheduler (pure Python) says which token ranges of which requests run; the runner turns that into one
flat batch (:class:`aspen.model.batch.SeqChunk` per request), attaches each request's pooled adapter, runs the model
once and samples one token for every chunk that reached the end of its known tokens.
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
    def run(self, chunks: Sequence[ScheduledChunk], handle_of: Callable[[str], PooledAdapter],
            states: Callable[[str], SamplingState]) -> tuple[list[ScheduledChunk], SampleResult | None]:
        """Run one step. Returns the chunks that were sampled and their sampling result (row i = chunk i)."""
        slots: dict[str, int] = {}
        pooled: list[PooledAdapter | None] = []
        seq_chunks = []
        for c in chunks:
            adapter_id = c.request.adapter_id
            slot = -1
            if adapter_id is not None:
                if adapter_id not in slots:
                    slots[adapter_id] = len(pooled)
                    pooled.append(handle_of(adapter_id))
                slot = slots[adapter_id]
            tokens = c.request.all_token_ids[c.start:c.end]
            seq_chunks.append(SeqChunk(tokens, c.start, c.block_table, adapter_slot=slot,
                                       logits=LOGITS_LAST if c.sample else LOGITS_NONE))
        sampled = [c for c in chunks if c.sample]
        make_lora = (lambda b: LoraBatch.for_step(b, pooled, self.pool, self.model.dtype)) if pooled else None
        logits = self.model.step(seq_chunks, self.kv, make_lora)
        if not sampled:
            return [], None
        result = self.sampler(logits, [states(c.request.request_id) for c in sampled], self.eos_token_ids)
        return sampled, result
