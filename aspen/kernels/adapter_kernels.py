"""C++ helpers for loading an adapter (``csrc/adapter_kernels.cpp``): the NaN/Inf check of its tensors and the write
into the LoRA pool.

With torch ops, loading an adapter is one call per tensor for the check and two per layer and projection for the
pool write, each of which takes and drops the GIL; in the server, where a load runs beside the engine's step,
every reacquisition may wait on the engine thread. These two functions do the same work in one call each, with
the GIL released, on float32 CPU tensors (the pool's usual dtype on the CPU); anything else keeps the torch paths,
which give the same result. ``ASPEN_CPU_KERNELS=0`` turns them off like the other kernels.

The pool write streams whole cache lines to the pool where the CPU has AVX-512: the rows it writes are not read
before the next decode step, and the pool is larger than the caches, so reading each destination line first
would be wasted.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from aspen.kernels.extension import HEADER, Extension

EXTENSION = Extension("adapter_kernels", ("adapter_kernels.cpp", HEADER), "adapter-loading kernels",
                      cflags=("-O3", "-march=native", "-fopenmp"), ldflags=("-fopenmp",))


def kernel():
    """The compiled extension, or None where it is turned off or cannot be built."""
    return EXTENSION.get()


def _plain_float_cpu(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()


def all_finite(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether no element of ``tensors`` is NaN or +-Inf."""
    mod = kernel()
    if mod is not None and all(_plain_float_cpu(t) for t in tensors):
        return mod.all_finite(list(tensors))
    # a NaN or Inf anywhere makes the sum non-finite (a sum is ~10x cheaper than isfinite); only then is the
    # exact check needed, to tell a real NaN/Inf from a sum of huge finite values overflowing
    return all(_sum_is_finite(t) or bool(torch.isfinite(t).all()) for t in tensors)


def _sum_is_finite(t: torch.Tensor) -> bool:
    s = float(t.sum())
    return s - s == 0.0


def write_rows_kernel(data: torch.Tensor, sources: Sequence[torch.Tensor]):
    """The kernel's ``write_lora_rows`` when it can copy ``sources`` (an adapter's A and B) into pool ``data``,
    else None."""
    mod = kernel()
    if mod is None or not _plain_float_cpu(data) or not all(_plain_float_cpu(t) for t in sources):
        return None
    return mod.write_lora_rows
