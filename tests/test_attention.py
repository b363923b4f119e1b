"""Fresh prefills run as one right-padded causal batch: the same outputs and gradients as one call per sequence."""
from __future__ import annotations

import torch

from aspen.attention import _prefill, paged_attention
from aspen.batch import FlatBatch, SeqChunk


def _batch(lengths: list[int]) -> FlatBatch:
    chunks, block = [], 0
    for n in lengths:
        nb = -(-n // 4)
        chunks.append(SeqChunk(list(range(4, 4 + n)), 0, range(block, block + nb)))
        block += nb
    return FlatBatch.build(chunks, 4)


def test_padded_prefill_equals_one_call_per_sequence_with_gradients():
    batch = _batch([5, 3, 7])
    assert batch.padded_prefill is not None and batch.padded_prefill[0].shape == (3, 7)
    g = torch.Generator().manual_seed(0)
    T = batch.num_tokens
    q, k, v = (torch.randn(T, h, 8, generator=g, dtype=torch.float64) for h in (4, 2, 2))  # GQA: 4 heads, 2 kv
    q1, k1, v1 = (t.clone().requires_grad_(True) for t in (q, k, v))
    q2, k2, v2 = (t.clone().requires_grad_(True) for t in (q, k, v))
    ours = paged_attention(q1, k1, v1, None, None, batch, 0.3)
    ref = torch.cat([_prefill(q2, k2, v2, None, None, p, 0.3) for p in batch.prefills])
    torch.testing.assert_close(ours, ref)
    w = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    (ours * w).sum().backward()
    (ref * w).sum().backward()
    for a, b in ((q1, q2), (k1, k2), (v1, v2)):
        torch.testing.assert_close(a.grad, b.grad)


def test_padded_prefill_only_where_it_pays():
    assert _batch([6]).padded_prefill is None  # one sequence: nothing to batch
    assert _batch([20, 2, 2, 2]).padded_prefill is None  # 4 x 20 padded > 2 x 26 real tokens
    decode = FlatBatch.build([SeqChunk([4, 5], 0, [0]), SeqChunk([6], 3, [1])], 4)
    assert decode.padded_prefill is None  # a decode row needs the paged path
