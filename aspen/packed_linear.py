"""Inference-only linear layers over weights pre-packed for the CPU's GEMM (MKL's packed sgemm).

A decode step multiplies 1 to 64 rows by every weight of the model. At those shapes the plain GEMM
(``F.linear``) spends much of its time re-laying out the weight: for the 125M model's 49 weight matrices, one pass
over all of them took 43 ms for 8 rows and 51 ms for 32 on this project's 2-core CPU, against 25 and 36 ms when the
weights were packed once beforehand (``cblas_sgemm_pack``) and multiplied with ``cblas_sgemm_compute``; from a few
hundred rows up (prefill) both run at the same speed. The packed copy replaces the weight — the layer keeps no
other — so memory stays the same (MKL reserves more address space for it than it writes; the resident size is the
weight's), except for a head tied to the embeddings: the embedding lookup keeps the original, the packed head
comes on top.

Packing is an explicit, irreversible choice for serving (:meth:`aspen.llm.LanguageModel.pack_for_inference`,
``EngineConfig.packed_gemm``): a packed layer has no ``weight`` to train, quantize or save and refuses autograd.
It applies to float32 projections on the CPU when torch was built with MKL (x86 wheels are); elsewhere, or if the
small extension cannot be compiled, layers stay as they are. The extension calls MKL through the symbols
``libtorch_cpu`` exports; it is built on first use into torch's extension cache (seconds, once per machine).
"""
from __future__ import annotations

import torch
from torch import nn

from aspen.extension import LazyExtension

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

// weight [N, K] (row-major, as nn.Linear stores it) packed as B = weight^T for C[M, N] = A[M, K] B
torch::Tensor pack_weight(torch::Tensor weight, int64_t rows_hint) {
  TORCH_CHECK(weight.scalar_type() == torch::kFloat && weight.dim() == 2 && weight.is_contiguous(),
              "pack_weight: a contiguous 2-D float32 weight expected");
  const int n = weight.size(0), k = weight.size(1);
  const size_t bytes = cblas_sgemm_pack_get_size(kBMatrix, rows_hint, n, k);
  auto packed = torch::empty({static_cast<int64_t>((bytes + 3) / 4)}, weight.options());
  cblas_sgemm_pack(kRowMajor, kBMatrix, kTrans, rows_hint, n, k, 1.0f, weight.data_ptr<float>(), k,
                   packed.data_ptr<float>());
  return packed;
}

void packed_linear(torch::Tensor out, torch::Tensor x, torch::Tensor packed) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat && out.scalar_type() == torch::kFloat && x.dim() == 2 &&
              out.dim() == 2 && x.is_contiguous() && out.is_contiguous() && out.size(0) == x.size(0),
              "packed_linear: contiguous 2-D float32 x [M, K] and out [M, N] expected");
  const int m = x.size(0), k = x.size(1), n = out.size(1);
  pybind11::gil_scoped_release no_gil;
  cblas_sgemm_compute(kRowMajor, kNoTrans, kPacked, m, n, k, x.data_ptr<float>(), k, packed.data_ptr<float>(), n,
                      0.0f, out.data_ptr<float>(), n);
}
"""

#: rows the packing is tuned for (MKL's hint; any row count can be multiplied): a full decode batch
ROWS_HINT = 64
_EXTENSION = LazyExtension("aspen_packed_gemm_v1", _SOURCE, ["pack_weight", "packed_linear"], "packed-GEMM extension",
                           available=torch.backends.mkl.is_available)


def kernel():
    """The compiled extension, or None where MKL's packed GEMM is not available."""
    return _EXTENSION.get()


class PackedLinear(nn.Module):
    """``y = x @ W^T + b`` with ``W`` held only in MKL's packed layout. Inference only (no autograd)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self._mod = kernel()
        if self._mod is None:
            raise RuntimeError("PackedLinear: MKL's packed GEMM is not available in this torch build")
        w = linear.weight.detach()
        if w.device.type != "cpu" or w.dtype != torch.float32:
            raise ValueError(f"PackedLinear: a float32 CPU weight expected, got {w.dtype} on {w.device}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight_nbytes = w.numel() * w.element_size()  # what the packed copy holds (resident bytes)
        self._packed = self._mod.pack_weight(w.contiguous(), ROWS_HINT)  # not a buffer: never moved, saved or cast
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError("PackedLinear is inference-only: its input requires grad")
        if x.dtype != torch.float32 or x.device.type != "cpu":
            raise ValueError(f"PackedLinear: float32 CPU input expected, got {x.dtype} on {x.device}")
        x2 = x.reshape(-1, self.in_features).contiguous()
        out = torch.empty(x2.shape[0], self.out_features, dtype=x.dtype)
        if x2.shape[0]:
            self._mod.packed_linear(out, x2, self._packed)
        if self.bias is not None:
            out.add_(self.bias)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def pack_model(model: nn.Module) -> int:
    """Swap every float32 CPU ``nn.Linear`` of ``model`` (the projections and the LM head) for a
    :class:`PackedLinear`, in place. Returns how many were packed (0 where the packed GEMM is unavailable)."""
    if kernel() is None:
        return 0
    targets = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if type(child) is nn.Linear and child.weight.device.type == "cpu"
               and child.weight.dtype == torch.float32]
    for parent, name, child in targets:
        setattr(parent, name, PackedLinear(child))
    return len(targets)
