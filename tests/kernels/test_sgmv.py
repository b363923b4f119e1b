"""The SGMV kernel (rows grouped by adapter, AVX-512) against the LoRA math in torch and against BGMV."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from aspen.kernels import cpu_kernels
from aspen.kernels import sgmv as sgmv_kernel

pytestmark = pytest.mark.skipif(sgmv_kernel.kernel() is None,
                                reason="the SGMV kernel is built only where the compiler targets AVX-512")


def reference(y, x, pool, tok, rows, parts, in_features):
    """y[tok[n], o0:o1] += (x[tok[n]] @ A_n^T) @ B_n for every row n and part (r0, r1, o0, o1)."""
    out, p = y.clone(), pool.float()
    for n, t in enumerate(tok.tolist()):
        for r0, r1, o0, o1 in parts.tolist():
            a = p[rows[n, r0:r1], :in_features]
            b = p[rows[n, r0:r1], in_features:in_features + o1 - o0]
            out[t, o0:o1] += (x[t] @ a.T) @ b
    return out


@settings(max_examples=30, deadline=None)
@given(sizes=st.lists(st.integers(1, 9), min_size=1, max_size=6), ranks=st.lists(st.integers(1, 7), min_size=1,
       max_size=3), in_features=st.integers(1, 40), gap=st.integers(0, 5),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), seed=st.integers(0, 2**16))
def test_segments_match_the_lora_math_and_bgmv(sizes, ranks, in_features, gap, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    parts, r0, o0 = [], 0, 0
    for i, r in enumerate(ranks):  # projections of 17 + 3i columns (tails of every width), `gap` untargeted between
        parts.append((r0, r0 + r, o0, o0 + 17 + 3 * i))
        r0, o0 = r0 + r, o0 + 17 + 3 * i + gap
    width = o0
    pool = torch.randn(30, in_features + width, generator=g).to(dtype)
    pool[0] = 0  # the zero page
    seg_rows = [torch.randint(1, 30, (r0,), generator=g) for _ in sizes]
    rows = torch.stack([seg_rows[s] for s, n in enumerate(sizes) for _ in range(n)]).contiguous()
    n_rows = rows.shape[0]
    tok = torch.randperm(n_rows + 3, generator=g)[:n_rows]  # rows scattered over the tokens of a flat batch
    seg = torch.tensor([0] + [sum(sizes[:i + 1]) for i in range(len(sizes))])
    x, y = torch.randn(n_rows + 3, in_features, generator=g), torch.randn(n_rows + 3, width, generator=g)
    parts_t = torch.tensor(parts)
    want = reference(y, x, pool, tok, rows, parts_t, in_features)
    with torch.no_grad():
        got = y.clone()
        assert sgmv_kernel.sgmv_add(got, x, pool, tok, rows, seg, parts_t, in_features)
        bgmv = y.clone()
        assert cpu_kernels.bgmv_add(bgmv, x, pool, tok, rows, parts_t, in_features)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    assert torch.allclose(got, bgmv, atol=1e-4, rtol=1e-4)


def test_segment_offsets_must_cover_the_rows():
    rows = torch.ones(3, 4, dtype=torch.long)
    args = (torch.zeros(3, 8), torch.zeros(3, 4), torch.zeros(2, 12), torch.arange(3), rows)
    parts = torch.tensor([[0, 4, 0, 8]])
    for seg in ([0, 2], [1, 3], [], [0, 5, 3]):
        with pytest.raises(RuntimeError, match="segment offsets"):
            sgmv_kernel.kernel().sgmv_add(*args, torch.tensor(seg, dtype=torch.long), parts, 4)


def test_not_taken_with_autograd_on():
    y = torch.zeros(1, 8)
    assert not sgmv_kernel.sgmv_add(y, torch.zeros(1, 4), torch.zeros(2, 12), torch.arange(1),
                                    torch.ones(1, 4, dtype=torch.long), torch.tensor([0, 1]),
                                    torch.tensor([[0, 4, 0, 8]]), 4)
