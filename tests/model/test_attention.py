"""Fresh prefills run as one right-padded causal batch: the same outputs and gradients as one call per sequence."""
from __future__ import annotations

import pytest
import torch

from aspen.model.attention import _prefill, paged_attention
from aspen.model.batch import FlatBatch, SeqChunk


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


def _decode_batch(contexts: list[int], block: int, window: int | None) -> tuple[FlatBatch, int]:
    """Decode rows with the given context lengths over shuffled blocks (not laid out in row order)."""
    needs = [-(-n // block) for n in contexts]
    order = torch.randperm(sum(needs), generator=torch.Generator().manual_seed(1)).tolist()
    chunks, at = [], 0
    for n, nb in zip(contexts, needs):
        chunks.append(SeqChunk([7], n - 1, order[at:at + nb]))
        at += nb
    return FlatBatch.build(chunks, block, sliding_window=window), sum(needs) * block


@pytest.mark.parametrize("heads,kv_heads,rows,window", [(4, 4, 9, None), (8, 2, 3, None), (6, 3, 20, 5),
                                                        (4, 1, 1, None)])
def test_decode_kernel_matches_torch_path(heads, kv_heads, rows, window, monkeypatch):
    """The compiled decode kernel (rows and kv-head chunks split across threads) equals the SDPA path: rows of
    mixed context lengths over shuffled blocks, multi-head and grouped-query, with and without a window."""
    import aspen.model.attention
    from aspen.kernels.cpu_kernels import kernel

    assert kernel() is not None, "the CPU kernels failed to build"
    g = torch.Generator().manual_seed(0)
    contexts = torch.randint(1, 40, (rows,), generator=g).tolist()
    batch, slots = _decode_batch(contexts, 4, window)
    q = torch.randn(rows, heads, 16, generator=g)
    k_pool, v_pool = (torch.randn(slots, kv_heads, 16, generator=g) for _ in range(2))
    calls = []
    real = aspen.model.attention.paged_decode_attention
    monkeypatch.setattr(aspen.model.attention, "paged_decode_attention", lambda *a: calls.append(real(*a)) or calls[-1])
    with torch.no_grad():
        fast = paged_attention(q, q, q, k_pool, v_pool, batch, 0.25)
        assert calls and calls[0] is not None  # the kernel took the rows
        monkeypatch.setattr(aspen.model.attention, "paged_decode_attention", lambda *a: None)
        slow = paged_attention(q, q, q, k_pool, v_pool, batch, 0.25)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)
