"""LoRA adapters for tests: PEFT adapters made by peft itself (random, non-zero A and B), and a prefill + decode
step of a model over pooled adapters."""
from __future__ import annotations

import torch

from aspen.lora.op import LoraBatch
from aspen.model.batch import SeqChunk
from aspen.model.config import LORA_TARGETS
from tests.helpers.tiny_models import hf_model

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL7 = ATTN + ["gate_proj", "up_proj", "down_proj"]
#: (rank, targets) of pooled adapters, chosen so that rank rows are not multiples of the kernel's 4-row blocks
POOL_SPECS = [(3, LORA_TARGETS), (8, ["q_proj", "v_proj"]), (6, ["down_proj", "up_proj"]), (16, LORA_TARGETS),
              (2, ["v_proj"]), (5, ["o_proj", "gate_proj"]), (4, LORA_TARGETS), (7, ["k_proj", "down_proj"])]


def make_peft_adapter(base_path: str, out_dir: str, seed: int = 0, **lora_kwargs):
    """Save a PEFT adapter with random (non-zero) A and B; returns the PeftModel for reference logits."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(hf_model(base_path), LoraConfig(init_lora_weights=False, **lora_kwargs))
    model.save_pretrained(out_dir)
    return model.eval()


def decode_logits(model, pool, pooled, rows: int = 12) -> torch.Tensor:
    """A prefill then one decode step of ``rows`` sequences, adapters round-robin (every 4th row base-only)."""
    slots = [-1 if i % 4 == 3 else i % len(pooled) for i in range(rows)]
    seqs = [torch.randint(4, 320, (7 + i,), generator=torch.Generator().manual_seed(i)).tolist() for i in range(rows)]
    kv = model.new_kv_cache(num_blocks=rows * 8, block_size=4)
    tables = [list(range(8 * i, 8 * i + 8)) for i in range(rows)]

    def step(chunks):
        batch = model.flat_batch(chunks, kv.block_size)
        return model.step(batch, kv, LoraBatch.for_step(batch, pooled, pool))

    step([SeqChunk(s[:-1], 0, t, adapter_slot=k) for s, t, k in zip(seqs, tables, slots)])
    return step([SeqChunk(s[-1:], len(s) - 1, t, adapter_slot=k) for s, t, k in zip(seqs, tables, slots)])
