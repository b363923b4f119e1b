"""MKL's packed sgemm for the CPU (``csrc/mkl_packed.cpp``): a right-hand side packed once, multiplied by many
inputs.

``pack_matrix(b, transposed, rows_hint)`` packs ``B`` of ``C[M, N] = A[M, K] B`` (``b`` is ``B^T`` [N, K] when
``transposed``, as an ``nn.Linear`` weight is, else ``B`` [K, N]; ``rows_hint`` is the ``M`` MKL tunes the packing
for, any ``M`` can be multiplied); ``packed_mm(out, x, packed)`` computes ``out = x @ B`` with the GIL released.
The extension calls MKL through the CBLAS symbols ``libtorch_cpu`` exports, so it applies where torch was built
with MKL (x86 wheels are); elsewhere :func:`kernel` is None. :mod:`aspen.model.packed_linear` holds layers in it.
"""
from __future__ import annotations

import torch

from aspen.kernels.extension import HEADER, Extension

EXTENSION = Extension("mkl_packed", ("mkl_packed.cpp", HEADER), "MKL packed GEMM",
                      available=torch.backends.mkl.is_available)


def kernel():
    """The compiled extension, or None where MKL's packed GEMM is not available."""
    return EXTENSION.get()
