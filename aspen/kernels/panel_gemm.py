"""An fp32 GEMM for ``x @ B`` with ``B`` stored in column panels, for CPUs with AVX-512 (``csrc/panel_gemm.cpp``).

``pack_panels(B^T)`` lays ``B`` [K, N] out as ``[ceil(N / 64), K, 64]`` (panel ``p``: columns ``64p .. 64p + 63`` of
every row, the last panel zero-padded) so that a decode step streams each weight as one sequential run of memory;
``panel_mm(out, x, panels)`` multiplies. It is the packed layout :mod:`aspen.model.packed_linear` prefers, over
MKL's (:mod:`aspen.kernels.mkl_packed`), where it is built: only where the compiler targets AVX-512
(``-march=native``); elsewhere :func:`kernel` is None.
"""
from __future__ import annotations

from aspen.kernels.extension import HEADER, Extension, cpu_has_avx512

EXTENSION = Extension("panel_gemm", ("panel_gemm.cpp", HEADER), "panel GEMM",
                      cflags=("-O3", "-march=native", "-fopenmp"), ldflags=("-fopenmp",), available=cpu_has_avx512)


def kernel():
    """The compiled extension where it was built with AVX-512, else None."""
    mod = EXTENSION.get()
    return mod if mod is not None and mod.built_for_avx512() else None
