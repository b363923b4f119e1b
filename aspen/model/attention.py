"""Paged attention in plain torch: every query reads its keys/values through its sequence's slots.

Decode rows (one query each) run together in one batched SDPA call over keys gathered to ``[D, Lmax]`` and a
padding mask; each prefill chunk runs as its own SDPA call (a causal mask offset by the chunk's start, or plain
``is_causal`` over the chunk's own keys when it starts the sequence). A step made only of chunks that start their
sequences (training; a batch of new prompts) runs as one right-padded causal SDPA call instead. Grouped-query attention is handled by SDPA's
``enable_gqa``. On CPU in fp32 inference, decode rows use the compiled kernel of ``aspen.kernels.cpu_kernels``, which
reads keys and values in place instead of gathering a padded copy.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from aspen.kernels.cpu_kernels import paged_decode_attention
from aspen.model.batch import FlatBatch, PrefillSeq


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                    batch: FlatBatch, scale: float) -> torch.Tensor:
    """q: [T, H, hd] (rotated); k, v: [T, KVH, hd] this step's keys/values, already written to
    k_pool/v_pool [slots, KVH, hd] (None when every chunk starts its sequence: training needs no cache).
    Returns the attention output [T, H, hd]."""
    if batch.padded_prefill is not None:
        return _padded_prefill(q, k, v, batch.padded_prefill, scale)
    if k_pool is None and (batch.decode_token_index.numel() or any(p.mask is not None for p in batch.prefills)):
        raise ValueError("paged_attention without a KV pool: only steps of fresh prefills can run without one")
    if not batch.decode_token_index.numel() and torch.is_grad_enabled():
        # training: only prefill chunks, in token order; concatenating keeps the backward pass from allocating a
        # full-size gradient per sequence (as slice assignment into one output would)
        return torch.cat([_prefill(q, k, v, k_pool, v_pool, p, scale) for p in batch.prefills], dim=0)
    out = torch.empty_like(q)
    if batch.decode_token_index.numel():
        idx = batch.decode_token_index
        o = paged_decode_attention(q.index_select(0, idx), k_pool, v_pool, batch.decode_kv_slots,
                                   batch.decode_starts, batch.decode_lens, scale)
        if o is not None:
            out.index_copy_(0, idx, o)
        else:
            _decode_sdpa(q, k_pool, v_pool, batch, scale, out)
    for p in batch.prefills:
        out[p.token_start:p.token_end] = _prefill(q, k, v, k_pool, v_pool, p, scale)
    return out


def _padded_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    padded: tuple[torch.Tensor, torch.Tensor], scale: float) -> torch.Tensor:
    """Fresh prefill chunks as one right-padded batch: one causal SDPA call instead of one per sequence."""
    gather, valid = padded  # [B, L], [T]
    # index_select, not t[gather]: its backward is an index_add, where advanced indexing's is an accumulating
    # index_put, markedly slower on the CPU in a training step's backward
    flat = gather.reshape(-1)
    qb, kb, vb = (t.index_select(0, flat).view(*gather.shape, *t.shape[1:]).transpose(1, 2)
                  for t in (q, k, v))  # [B, heads, L, hd]
    o = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=scale, enable_gqa=True)
    return o.transpose(1, 2).reshape(-1, *q.shape[1:]).index_select(0, valid)


def _prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
             p: PrefillSeq, scale: float) -> torch.Tensor:
    """Attention output [n, H, hd] of one prefill chunk."""
    qp = q[p.token_start:p.token_end].transpose(0, 1).unsqueeze(0)  # [1, H, n, hd]
    if p.mask is None:  # the chunk starts its sequence: its own keys are all it sees
        kp = k[p.token_start:p.token_end].transpose(0, 1).unsqueeze(0)
        vp = v[p.token_start:p.token_end].transpose(0, 1).unsqueeze(0)
        o = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=scale, enable_gqa=True)
    else:
        kp = k_pool.index_select(0, p.kv_slots).transpose(0, 1).unsqueeze(0).to(q.dtype)  # [1, KVH, L, hd]
        vp = v_pool.index_select(0, p.kv_slots).transpose(0, 1).unsqueeze(0).to(q.dtype)
        o = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=p.mask, scale=scale, enable_gqa=True)
    return o.squeeze(0).transpose(0, 1)


def _decode_sdpa(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, batch: FlatBatch, scale: float,
                 out: torch.Tensor) -> None:
    """Decode rows in one SDPA call over keys gathered to [D, Lmax] with a padding mask."""
    idx = batch.decode_token_index
    qd = q.index_select(0, idx).unsqueeze(2)  # [D, H, 1, hd]
    k = k_pool[batch.decode_kv_slots].transpose(1, 2)  # [D, KVH, L, hd]
    v = v_pool[batch.decode_kv_slots].transpose(1, 2)
    mask = batch.decode_mask[:, None, None, :]  # [D, 1, 1, L]
    o = F.scaled_dot_product_attention(qd, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, scale=scale,
                                       enable_gqa=True)
    out.index_copy_(0, idx, o.squeeze(2))
