"""The chunked head cross-entropy of training against torch's cross_entropy on the full logits."""
import pytest
import torch
import torch.nn.functional as F

from aspen.train import loss


@pytest.mark.parametrize("chunk_elements", [1 << 23, 3 * 50])  # one chunk; chunks of 3 rows (last one short)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])  # float32: softmax over the logits buffer
def test_token_nll_matches_cross_entropy_and_its_gradient(monkeypatch, chunk_elements, dtype):
    monkeypatch.setattr(loss, "CHUNK_ELEMENTS", chunk_elements)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(11, 16, generator=g, dtype=torch.float64)
    weight = torch.randn(50, 16, generator=g, dtype=torch.float64)
    tol = 1e-6 if dtype == torch.float64 else 1e-5
    targets = torch.randint(0, 50, (11,), generator=g)
    upstream = torch.rand(11, generator=g, dtype=torch.float64)  # per-token loss weights, as the trainer's

    h1 = hidden.to(dtype, copy=True).requires_grad_(True)
    ours = loss.token_nll(h1, weight.to(dtype), targets)
    (ours.double() * upstream).sum().backward()
    h2 = hidden.clone().requires_grad_(True)
    ref = F.cross_entropy(h2 @ weight.t(), targets, reduction="none")
    (ref * upstream).sum().backward()

    assert ours.dtype == torch.float32
    if dtype == torch.float32 and torch.backends.mkl.is_available():  # the head packed for MKL was the one used
        assert loss.FrozenHead(weight.to(dtype))._fwd is not None
    torch.testing.assert_close(ours.double(), ref.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(h1.grad.double(), h2.grad, rtol=1e-5, atol=tol)  # softmax in float32


def test_token_nll_without_grad_and_with_a_trainable_head():
    hidden, weight = torch.randn(4, 8), torch.randn(10, 8)
    targets = torch.tensor([0, 3, 9, 1])
    with torch.no_grad():
        torch.testing.assert_close(loss.token_nll(hidden, weight, targets),
                                   F.cross_entropy(hidden @ weight.t(), targets, reduction="none"))
    with pytest.raises(ValueError, match="LM head must be frozen"):
        loss.token_nll(hidden, weight.requires_grad_(True), targets)
