"""The CPU decode kernels and training's dropout (``csrc/cpu_kernels.cpp``): the LoRA op over the paged adapter pool
one row at a time (BGMV), attention of one query per row over the paged KV cache, and counter-based dropout.

Each function returns False or None (having done nothing) where the kernel cannot take its tensors, or where the
extension is off (``ASPEN_CPU_KERNELS=0``) or cannot be built; callers then run their pure-torch paths, which give
the same results.
"""
from __future__ import annotations

import torch

from aspen.kernels.extension import HEADER, Extension

POOL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # pool storage the BGMV kernel reads (fp32 math)
EXTENSION = Extension("cpu_kernels", ("cpu_kernels.cpp", HEADER), "BGMV, paged decode attention and dropout",
                      cflags=("-O3", "-march=native", "-fopenmp"), ldflags=("-fopenmp",))


def kernel():
    """The compiled module, or None when unavailable (then callers use the torch path)."""
    return EXTENSION.get()


def bgmv_add(y: torch.Tensor, x: torch.Tensor, pool_layer: torch.Tensor, tok: torch.Tensor, rows: torch.Tensor,
             parts: torch.Tensor, in_features: int) -> bool:
    """y[tok] += LoRA delta, in place. Returns False (nothing done) when the kernel cannot take these tensors."""
    if y.device.type != "cpu" or torch.is_grad_enabled():
        return False
    mod = kernel()
    if mod is None:
        return False
    if not (y.dtype == x.dtype == torch.float32) or pool_layer.dtype not in POOL_DTYPES or not y.is_contiguous():
        return False
    mod.bgmv_add(y, x.contiguous(), pool_layer, tok, rows, parts, in_features)
    return True


def paged_decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, slots: torch.Tensor,
                           starts: torch.Tensor, lens: torch.Tensor, scale: float) -> torch.Tensor | None:
    """Attention of one query per row over its paged keys; None when the kernel cannot take these tensors."""
    if q.device.type != "cpu" or torch.is_grad_enabled():
        return None
    mod = kernel()
    if mod is None:
        return None
    if not (q.dtype == k_pool.dtype == v_pool.dtype == torch.float32):
        return None
    q = q.contiguous()
    out = torch.empty_like(q)
    mod.paged_decode_attention(out, q, k_pool, v_pool, slots, starts, lens, scale)
    return out


def dropout_threshold(p: float) -> int:
    """The kernel's 32-bit threshold for drop probability ``p``: an element whose hash is below it is dropped."""
    return min(2 ** 32 - 1, round(p * 2 ** 32))


def dropout_apply(x: torch.Tensor, p: float, seed: int, acc: torch.Tensor | None = None,
                  out: torch.Tensor | None = None) -> torch.Tensor | None:
    """Counter-based dropout ``keep`` mask (drop probability ``p``, ``seed`` in [0, 2**63)) over contiguous
    float32 ``x``: returns ``x * keep`` (no ``1/(1-p)``) in a new tensor or in ``out``, or with ``acc`` adds
    ``x * keep`` into it and returns it. The mask is a pure function of ``(seed, element index)``, so the same
    call gives the same mask. None when the kernel is not available or cannot take these tensors."""
    dst = acc if acc is not None else out
    if x.device.type != "cpu" or x.dtype != torch.float32 or not x.is_contiguous():
        return None
    if dst is not None and (dst.device.type != "cpu" or dst.dtype != torch.float32 or not dst.is_contiguous()):
        return None
    mod = kernel()
    if mod is None:
        return None
    if acc is not None:
        mod.dropout_apply(acc, x, acc, dropout_threshold(p), seed)
        return acc
    out = torch.empty_like(x) if out is None else out
    mod.dropout_apply(out, x, out.new_empty(0), dropout_threshold(p), seed)
    return out
