"""Paged attention in plain torch: every query reads its keys/values through its sequence's slots.

Decode rows (one query each) run together in one batched SDPA call over keys gathered to ``[D, Lmax]`` and a
padding mask; each prefill chunk runs as its own SDPA call (a causal mask offset by the chunk's start, or plain
``is_causal`` when the chunk starts the sequence). Grouped-query attention is handled by SDPA's ``enable_gqa``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from aspen.batch import FlatBatch


def paged_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, batch: FlatBatch,
                    scale: float) -> torch.Tensor:
    """q: [T, H, D] (already rotated); k_pool/v_pool: [slots, KVH, D] (this step's keys already written).

    Returns the attention output [T, H, D].
    """
    out = torch.empty_like(q)
    if batch.decode_token_index.numel():
        idx = batch.decode_token_index
        qd = q.index_select(0, idx).unsqueeze(2)  # [D, H, 1, hd]
        k = k_pool[batch.decode_kv_slots].transpose(1, 2)  # [D, KVH, L, hd]
        v = v_pool[batch.decode_kv_slots].transpose(1, 2)
        mask = batch.decode_mask[:, None, None, :]  # [D, 1, 1, L]
        o = F.scaled_dot_product_attention(qd, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, scale=scale,
                                           enable_gqa=True)
        out.index_copy_(0, idx, o.squeeze(2))
    for p in batch.prefills:
        qp = q[p.token_start:p.token_end].transpose(0, 1).unsqueeze(0)  # [1, H, n, hd]
        k = k_pool.index_select(0, p.kv_slots).transpose(0, 1).unsqueeze(0).to(q.dtype)  # [1, KVH, L, hd]
        v = v_pool.index_select(0, p.kv_slots).transpose(0, 1).unsqueeze(0).to(q.dtype)
        if p.mask is None:
            o = F.scaled_dot_product_attention(qp, k, v, is_causal=True, scale=scale, enable_gqa=True)
        else:
            o = F.scaled_dot_product_attention(qp, k, v, attn_mask=p.mask, scale=scale, enable_gqa=True)
        out[p.token_start:p.token_end] = o.squeeze(0).transpose(0, 1)
    return out
