"""The fused elementwise kernels (SwiGLU, RMSNorm, rotary) against float64 references, forward and backward."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from aspen.kernels import fused_ops

pytestmark = pytest.mark.skipif(fused_ops.kernel() is None, reason="no AVX2 here, or the extension did not build")
TOL = {"rtol": 1e-5, "atol": 1e-5}


def _grad_of(fn, x: torch.Tensor, upstream: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    leaf = x.detach().clone().requires_grad_(True)
    out = fn(leaf)
    out.backward(upstream.to(out.dtype))
    return out.detach().double(), leaf.grad.double()


@pytest.mark.parametrize("rows,inter", [(1, 8), (29, 44), (70, 256)])  # widths with and without a vector tail
def test_swiglu_matches_silu_times_up(rows, inter):
    g = torch.Generator().manual_seed(rows)
    gu = torch.randn(rows, 2 * inter, generator=g, dtype=torch.float64) * 4
    dh = torch.randn(rows, inter, generator=g, dtype=torch.float64)
    ref_out, ref_grad = _grad_of(lambda t: F.silu(t[:, :inter]) * t[:, inter:], gu, dh)
    out, grad = _grad_of(fused_ops.swiglu, gu.float(), dh)
    torch.testing.assert_close(out, ref_out, **TOL)
    torch.testing.assert_close(grad, ref_grad, **TOL)


@pytest.mark.parametrize("shape", [(5, 96), (3, 7, 20), (64, 768)])
def test_rms_norm_matches_the_formula(shape):
    g = torch.Generator().manual_seed(len(shape))
    x = torch.randn(*shape, generator=g, dtype=torch.float64) * 3
    w = torch.randn(shape[-1], generator=g, dtype=torch.float64)
    dy = torch.randn(*shape, generator=g, dtype=torch.float64)
    ref_out, ref_grad = _grad_of(lambda t: w * (t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6)), x, dy)
    out, grad = _grad_of(lambda t: fused_ops.rms_norm(t, w.float(), 1e-6), x.float(), dy)
    torch.testing.assert_close(out, ref_out, **TOL)
    torch.testing.assert_close(grad, ref_grad, **TOL)


def test_rms_norm_leaves_other_cases_to_torch():
    x, w = torch.randn(4, 8), torch.ones(8)
    assert fused_ops.rms_norm(x, w.clone().requires_grad_(True), 1e-6) is None  # a weight gradient is needed
    assert fused_ops.rms_norm(x.double(), w.double(), 1e-6) is None
    assert fused_ops.rms_norm(x.t(), torch.ones(4), 1e-6) is None  # not contiguous
    assert fused_ops.rms_norm(x, torch.ones(9), 1e-6) is None


def test_rotary_on_a_column_slice_of_qkv_matches_rotate_half():
    """q is a strided view of the q/k/v projection's output, as the attention layer passes it."""
    g = torch.Generator().manual_seed(0)
    tokens, heads, hd = 13, 4, 20
    qkv = torch.randn(tokens, 3 * heads * hd, generator=g, dtype=torch.float64)
    angles = torch.randn(tokens, hd // 2, generator=g, dtype=torch.float64)
    emb = torch.cat((angles, angles), dim=-1)
    cos, sin = emb.cos()[:, None, :], emb.sin()[:, None, :]
    upstream = torch.randn(tokens, heads, hd, generator=g, dtype=torch.float64)

    def reference(t):
        q = t[:, :heads * hd].reshape(tokens, heads, hd)
        rotated_half = torch.cat((-q[..., hd // 2:], q[..., :hd // 2]), dim=-1)
        return q * cos + rotated_half * sin

    def fused(t):
        q = t[:, :heads * hd].reshape(tokens, heads, hd)
        assert not q.is_contiguous()
        out = fused_ops.rotary(q, cos.float(), sin.float())
        assert out is not None
        return out

    ref_out, ref_grad = _grad_of(reference, qkv, upstream)
    out, grad = _grad_of(fused, qkv.float(), upstream)
    torch.testing.assert_close(out, ref_out, **TOL)
    torch.testing.assert_close(grad, ref_grad, **TOL)
    assert fused_ops.rotary(torch.randn(13, heads, hd).transpose(0, 1), cos.float(), sin.float()) is None
