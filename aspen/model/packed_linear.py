"""Inference-only linear layers over weights pre-packed for the CPU's GEMM.

A decode step multiplies 1 to 64 rows by every weight of the model. At those shapes the plain GEMM
(``F.linear``) spends much of its time re-laying out the weight; a weight packed once beforehand skips that, and
from a few hundred rows up (prefill) both run at the same speed. The packed copy replaces the weight — the layer
keeps no other — so memory stays the same (MKL reserves more address space for its layout than it writes; the
resident size is the weight's), except for a head tied to the embeddings: the embedding lookup keeps the
original, the packed head comes on top.

Packing is an explicit, irreversible choice for serving (:meth:`aspen.language_model.LanguageModel.pack_for_inference`,
``EngineConfig.packed_gemm``): a packed layer has no ``weight`` to train, quantize or save and refuses autograd.
It applies to float32 projections on the CPU where a packed GEMM extension is built; elsewhere layers stay as they
are.

Two layouts (``backend``): MKL's packed sgemm (:mod:`aspen.kernels.mkl_packed`, where torch was built with MKL),
and on CPUs with AVX-512 our own column panels (:mod:`aspen.kernels.panel_gemm`), faster than MKL's at decode
batch sizes and level with it at prefill sizes (BENCHMARKS.md). ``"auto"`` (the default) takes the panels where
they are built, else MKL's.
"""
from __future__ import annotations

import torch
from torch import nn

from aspen.kernels import panel_gemm
from aspen.kernels.mkl_packed import kernel

#: rows the packing is tuned for (MKL's hint; any row count can be multiplied): a full decode batch
ROWS_HINT = 64
BACKENDS = ("auto", "mkl", "panels")


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
