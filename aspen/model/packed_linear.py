"""Inference-only linear layers over weights pre-packed for the CPU's GEMM (MKL's packed sgemm).

A decode step multiplies 1 to 64 rows by every weight of the model. At those shapes the plain GEMM
(``F.linear``) spends much of its time re-laying out the weight: for the 125M model's 49 weight matrices, one pass
over all of them took 43 ms for 8 rows and 51 ms for 32 on this project's 2-core CPU, against 25 and 36 ms when the
weights were packed once beforehand (``cblas_sgemm_pack``) and multiplied with ``cblas_sgemm_compute``; from a few
hundred rows up (prefill) both run at the same speed. The packed copy replaces the weight — the layer keeps no
other — so memory stays the same (MKL reserves more address space for it than it writes; the resident size is the
weight's), except for a head tied to the embeddings: the embedding lookup keeps the original, the packed head
comes on top.

Packing is an explicit, irreversible choice for serving (:meth:`aspen.language_model.LanguageModel.pack_for_inference`,
``EngineConfig.packed_gemm``): a packed layer has no ``weight`` to train, quantize or save and refuses autograd.
It applies to float32 projections on the CPU when torch was built with MKL (x86 wheels are); elsewhere, or if the
small extension cannot be compiled, layers stay as they are. The extension calls MKL through the symbols
``libtorch_cpu`` exports; it is built on first use into torch's extension cache (seconds, once per machine).

Two layouts (``backend``): MKL's, and on CPUs with AVX-512 our own column panels (:mod:`aspen.kernels.panel_gemm`), which
measured 4-22% faster than MKL's at 8-64 rows and level with it at 2,048. ``"auto"`` (the default)
takes the panels where they are built, else MKL's.
"""
from __future__ import annotations

import torch
from torch import nn

from aspen.kernels import panel_gemm
from aspen.kernels.extension import LazyExtension

_SOURCE = r"""
#include <torch/extension.h>
#include <pybind11/pybind11.h>

// MKL's CBLAS packed GEMM (LP64 interface), exported by libtorch_cpu when torch is built with MKL
extern "C" {
size_t cblas_sgemm_pack_get_size(int identifier, int m, int n, int k);
void cblas_sgemm_pack(int layout, int identifier, int trans, int m, int n, int k, float alpha, const float* src,
                      int ld, float* dest);
void cblas_sgemm_compute(int layout, int transa, int transb, int m, int n, int k, const float* a, int lda,
                         const float* b, int ldb, float beta, float* c, int ldc);
}
enum { kRowMajor = 101, kNoTrans = 111, kTrans = 112, kPacked = 151, kBMatrix = 162 };

// B of C[M, N] = A[M, K] B, packed for any M: ``b`` is [N, K] with transposed (an nn.Linear weight: B = weight^T),
// else [K, N]
torch::Tensor pack_matrix(torch::Tensor b, bool transposed, int64_t rows_hint) {
  TORCH_CHECK(b.scalar_type() == torch::kFloat && b.dim() == 2 && b.is_contiguous() && b.device().is_cpu(),
              "pack_matrix: a contiguous 2-D float32 CPU matrix expected");
  const int n = transposed ? b.size(0) : b.size(1), k = transposed ? b.size(1) : b.size(0);
  const size_t bytes = cblas_sgemm_pack_get_size(kBMatrix, rows_hint, n, k);
  auto packed = torch::empty({static_cast<int64_t>((bytes + 3) / 4)}, b.options());
  cblas_sgemm_pack(kRowMajor, kBMatrix, transposed ? kTrans : kNoTrans, rows_hint, n, k, 1.0f, b.data_ptr<float>(),
                   b.size(1), packed.data_ptr<float>());
  return packed;
}

// out[M, N] = x[M, K] B with B packed by pack_matrix for this N and K (the caller keeps them paired)
void packed_mm(torch::Tensor out, torch::Tensor x, torch::Tensor packed) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && out.scalar_type() == torch::kFloat && x.dim() == 2 &&
              out.dim() == 2 && x.is_contiguous() && out.is_contiguous() && out.size(0) == x.size(0),
              "packed_mm: contiguous 2-D float32 x [M, K] and out [M, N] expected");
  const int m = x.size(0), k = x.size(1), n = out.size(1);
  pybind11::gil_scoped_release no_gil;
  cblas_sgemm_compute(kRowMajor, kNoTrans, kPacked, m, n, k, x.data_ptr<float>(), k, packed.data_ptr<float>(), n,
                      0.0f, out.data_ptr<float>(), n);
}
"""

#: rows the packing is tuned for (MKL's hint; any row count can be multiplied): a full decode batch
ROWS_HINT = 64
_EXTENSION = LazyExtension("aspen_packed_gemm_v2", _SOURCE, ["pack_matrix", "packed_mm"], "packed-GEMM extension",
                           available=torch.backends.mkl.is_available)


BACKENDS = ("auto", "mkl", "panels")


def kernel():
    """The compiled MKL extension, or None where MKL's packed GEMM is not available."""
    return _EXTENSION.get()


def available(backend: str = "auto") -> bool:
    """Whether :class:`PackedMatrix` can be built with ``backend`` here."""
    return (backend != "mkl" and panel_gemm.kernel() is not None) or (backend != "panels" and kernel() is not None)


class PackedMatrix:
    """The right-hand side ``B`` [K, N] of ``x @ B``, held in a packed layout, MKL's or our panels (a copy: the
    source may change or go). ``transposed``: ``matrix`` is ``B^T`` [N, K], as an ``nn.Linear`` weight is."""

    def __init__(self, matrix: torch.Tensor, transposed: bool, rows_hint: int = ROWS_HINT,
                 backend: str = "auto") -> None:
        if backend not in BACKENDS:
            raise ValueError(f"PackedMatrix: backend must be one of {BACKENDS}, got {backend!r}")
        if matrix.device.type != "cpu" or matrix.dtype != torch.float32 or matrix.dim() != 2:
            raise ValueError(f"PackedMatrix: a 2-D float32 CPU matrix expected, got {matrix.dtype} "
                             f"{list(matrix.shape)} on {matrix.device}")
        panels = panel_gemm.kernel() if backend in ("auto", "panels") else None
        mkl = kernel() if panels is None and backend in ("auto", "mkl") else None
        if panels is None and mkl is None:
            raise RuntimeError(f"PackedMatrix: no {'packed GEMM' if backend == 'auto' else backend + ' backend'} "
                               "is available here (MKL's needs a torch built with MKL, the panels AVX-512)")
        self.backend = "panels" if panels is not None else "mkl"
        n, k = matrix.shape if transposed else matrix.shape[::-1]
        self.in_features, self.out_features = k, n
        self.source_nbytes = matrix.numel() * matrix.element_size()  # what the packed copy holds (resident bytes)
        b_t = matrix.detach() if transposed else matrix.detach().t()  # B^T [N, K]
        if panels is not None:
            self._mm, self._packed = panels.panel_mm, panels.pack_panels(b_t)
        else:
            self._mm = mkl.packed_mm
            self._packed = mkl.pack_matrix(matrix.detach().contiguous(), transposed, rows_hint)

    def mm(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ B`` for a 2-D float32 CPU ``x`` [M, K], into ``out`` [M, N] when given (contiguous)."""
        if x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"PackedMatrix: float32 CPU input [M, {self.in_features}] expected, got {x.dtype} "
                             f"{list(x.shape)} on {x.device}")
        if out is None:
            out = torch.empty(x.shape[0], self.out_features, dtype=x.dtype)
        elif out.shape != (x.shape[0], self.out_features) or out.dtype != x.dtype or not out.is_contiguous():
            raise ValueError(f"PackedMatrix: out must be a contiguous float32 [{x.shape[0]}, {self.out_features}], got "
                             f"{out.dtype} {list(out.shape)}")
        if x.shape[0]:
            self._mm(out, x.contiguous(), self._packed)
        return out


class PackedLinear(nn.Module):
    """``y = x @ W^T + b`` with ``W`` held only in a packed layout. Inference only (no autograd)."""

    def __init__(self, linear: nn.Linear, backend: str = "auto") -> None:
        super().__init__()
        w = linear.weight.detach()
        if w.device.type != "cpu" or w.dtype != torch.float32:
            raise ValueError(f"PackedLinear: a float32 CPU weight expected, got {w.dtype} on {w.device}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._packed = PackedMatrix(w, transposed=True, backend=backend)  # not a buffer: never moved, saved or cast
        self.weight_nbytes = self._packed.source_nbytes
        self.backend = self._packed.backend
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError("PackedLinear is inference-only: its input requires grad")
        out = self._packed.mm(x.reshape(-1, self.in_features))  # checks dtype, device and width
        if self.bias is not None:
            out.add_(self.bias)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def pack_model(model: nn.Module, backend: str = "auto") -> int:
    """Swap every float32 CPU ``nn.Linear`` of ``model`` (the projections and the LM head) for a
    :class:`PackedLinear`, in place. Returns how many were packed (0 where the packed GEMM is unavailable)."""
    if not available(backend):
        return 0
    targets = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if type(child) is nn.Linear and child.weight.device.type == "cpu"
               and child.weight.dtype == torch.float32]
    for parent, name, child in targets:
        setattr(parent, name, PackedLinear(child, backend))
    return len(targets)


def backend_of(model: nn.Module) -> str | None:
    """The layout of ``model``'s packed layers: "panels" or "mkl" (None: nothing packed)."""
    return next((m.backend for m in model.modules() if isinstance(m, PackedLinear)), None)
