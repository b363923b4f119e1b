"""Weights packed for MKL's GEMM or in our AVX-512 column panels: same outputs as the plain layers, inference
only."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import aspen
from aspen.kernels import panel_gemm
from aspen.kernels.extension import cpu_has_avx512
from aspen.model.packed_linear import PackedLinear, PackedMatrix, available, backend_of, kernel, pack_model
from aspen.model.quantize import weight_bytes

BACKENDS = [
    pytest.param("mkl", marks=pytest.mark.skipif(not torch.backends.mkl.is_available(),
                                                 reason="torch built without MKL")),
    pytest.param("panels", marks=pytest.mark.skipif(not cpu_has_avx512(), reason="no AVX-512 on this CPU")),
]


def require(backend: str) -> None:
    built = kernel() if backend == "mkl" else panel_gemm.kernel()
    assert built is not None, f"the {backend} extension failed to build"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rows", [0, 1, 5, 7, 64, 300])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_equals_linear(rows, bias, backend):
    """Any row count (MKL's packing is tuned for 64; the panels take rows 6 at a time, in chunks of 192), 2-D and
    3-D inputs, with and without bias; 200 columns are 3 panels and a partial one."""
    require(backend)
    g = torch.Generator().manual_seed(rows)
    linear = nn.Linear(96, 200, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(200, 96, generator=g))
        if bias:
            linear.bias.copy_(torch.randn(200, generator=g))
    packed = PackedLinear(linear, backend)
    assert packed._packed.backend == backend
    x = torch.randn(rows, 96, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(packed(x), linear(x), rtol=1e-5, atol=1e-4)
        x3 = torch.randn(2, rows, 96, generator=g)
        torch.testing.assert_close(packed(x3), linear(x3), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("transposed", [True, False])
def test_packed_matrix_multiplies_like_mm_both_ways_and_checks_shapes(transposed, backend):
    require(backend)
    g = torch.Generator().manual_seed(int(transposed))
    m = torch.randn(70, 40, generator=g)
    b = (m.t() if transposed else m).clone()  # B [K, N]
    packed = PackedMatrix(m, transposed=transposed, rows_hint=7, backend=backend)
    m.zero_()  # a copy: the source may change
    x = torch.randn(9, b.shape[0], generator=g)
    torch.testing.assert_close(packed.mm(x), x @ b, rtol=1e-5, atol=1e-4)
    out = torch.full((9, b.shape[1]), float("nan"))
    assert packed.mm(x, out) is out
    torch.testing.assert_close(out, x @ b, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match=rf"input \[M, {b.shape[0]}\]"):
        packed.mm(torch.randn(9, b.shape[0] + 1))
    with pytest.raises(ValueError, match="out must be"):
        packed.mm(x, torch.empty(9, b.shape[1] + 1))


def test_packed_linear_refuses_autograd_and_other_dtypes():
    packed = PackedLinear(nn.Linear(8, 4))
    with pytest.raises(RuntimeError, match="inference-only"):
        packed(torch.randn(3, 8, requires_grad=True))
    with pytest.raises(ValueError, match="float32 CPU input"):
        packed(torch.randn(3, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="float32 CPU weight"):
        PackedLinear(nn.Linear(8, 4).double())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family,overrides", [("qwen2", {}), ("llama", {"tie_word_embeddings": True})])
def test_packed_model_matches_transformers_and_cannot_train(tmp_path, family, overrides, backend):
    """Every projection and the head are packed (q/k/v biases, a head tied to the embeddings); the paged
    prefill + decode logits still match transformers; training the packed model is refused."""
    from aspen.train.config import parse_config
    from aspen.train.trainer import Trainer
    from tests.helpers.tiny_models import hf_model, make_checkpoint

    path = make_checkpoint(str(tmp_path / "ckpt"), family, **overrides)
    packed = aspen.load_model(path, progress=False)
    plain_bytes = weight_bytes(packed.model)
    require(backend)
    assert backend_of(packed.model) is None
    assert packed.pack_for_inference(backend) == 4 * packed.config.num_hidden_layers + 1
    assert backend_of(packed.model) == backend
    assert not any(type(m) is nn.Linear for m in packed.model.modules())
    # the packed copies count as the weights they hold; a tied head's packed copy comes on top of the embeddings
    head = packed.config.vocab_size * packed.config.hidden_size * 4
    assert weight_bytes(packed.model) == plain_bytes + (head if overrides.get("tie_word_embeddings") else 0)
    ids = torch.randint(4, 320, (45,), generator=torch.Generator().manual_seed(1)).tolist()
    ours = packed.score(ids, block_size=8)
    with torch.inference_mode():
        ref = hf_model(path)(torch.tensor([ids])).logits[0]
    assert (ours - ref).abs().max().item() < 1e-4
    assert pack_model(packed.model, backend) == 0  # nothing left to pack
    with pytest.raises(ValueError, match="packed for inference"):
        Trainer(packed, parse_config({"output_dir": "/tmp/unused", "adapters": [
            {"name": "a", "data": "unused.json", "r": 4, "max_steps": 1}]}), progress=False)


def test_backend_choice_is_explicit_and_checked():
    with pytest.raises(ValueError, match="backend must be one of"):
        PackedMatrix(torch.randn(4, 4), transposed=True, backend="blas")
    # against what the CPU and the torch build offer (an extension that fails to build where it should fails here)
    assert available("panels") == (panel_gemm.kernel() is not None) == cpu_has_avx512()
    assert available("mkl") == (kernel() is not None) == torch.backends.mkl.is_available()
    if available("panels"):  # "auto" takes the panels where they are built
        assert PackedMatrix(torch.randn(4, 4), transposed=True).backend == "panels"


@pytest.mark.skipif(not cpu_has_avx512(), reason="no AVX-512 on this CPU")
@settings(max_examples=40, deadline=None)
@given(m=st.integers(0, 400), n=st.integers(1, 300), k=st.integers(1, 300), seed=st.integers(0, 2**16))
def test_panel_kernel_equals_mm_for_any_shape(m, n, k, seed):
    """Row counts around the 6-row tiles and 192-row chunks, partial panels, odd K."""
    mod = panel_gemm.kernel()
    assert mod is not None, "the panel-GEMM extension failed to build"
    g = torch.Generator().manual_seed(seed)
    w, x = torch.randn(n, k, generator=g), torch.randn(m, k, generator=g)
    out = torch.full((m, n), float("nan"))
    mod.panel_mm(out, x, mod.pack_panels(w))
    torch.testing.assert_close(out, x @ w.t(), rtol=1e-5, atol=1e-4)
