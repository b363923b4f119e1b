"""The batched LoRA op on the CPU for rows grouped by adapter (SGMV, ``csrc/sgmv.cpp``), with AVX-512.

BGMV (:mod:`aspen.kernels.cpu_kernels`) takes one row at a time, so rows that share an adapter repeat the same
loads of its pages. SGMV takes the rows grouped into segments (consecutive rows with one adapter: a popular
adapter's decode rows, or one adapter's short prefill) and runs each segment in blocks of up to 4 rows that share
every load. Same pool layout, row tables and parts as BGMV; pool storage float32, float16 or bfloat16.

Built only where the compiler targets AVX-512 (``-march=native``); elsewhere :func:`kernel` is None and the LoRA op
keeps BGMV.
"""
from __future__ import annotations

import torch

from aspen.kernels.extension import HEADER, Extension, cpu_has_avx512

POOL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


EXTENSION = Extension("sgmv", ("sgmv.cpp", HEADER), "SGMV kernel", cflags=("-O3", "-march=native", "-fopenmp"),
                      ldflags=("-fopenmp",), available=cpu_has_avx512)


def kernel():
    """The compiled extension where it was built with AVX-512, else None."""
    mod = EXTENSION.get()
    return mod if mod is not None and mod.built_for_avx512() else None


def sgmv_add(y: torch.Tensor, x: torch.Tensor, pool_layer: torch.Tensor, tok: torch.Tensor, rows: torch.Tensor,
             seg: torch.Tensor, parts: torch.Tensor, in_features: int) -> bool:
    """``y[tok] +=`` the LoRA delta in place, rows grouped into segments; False (nothing done) when the kernel
    cannot take these tensors."""
    if y.device.type != "cpu" or torch.is_grad_enabled():
        return False
    mod = kernel()
    if mod is None or not (y.dtype == x.dtype == torch.float32) or pool_layer.dtype not in POOL_DTYPES \
            or not y.is_contiguous():
        return False
    mod.sgmv_add(y, x.contiguous(), pool_layer, tok, rows, seg, parts, in_features)
    return True
