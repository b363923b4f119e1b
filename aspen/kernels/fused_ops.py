"""The decoder's elementwise steps as single-pass CPU kernels, with their backward passes (``csrc/fused_ops.cpp``):
SwiGLU, RMSNorm and the rotary embedding.

Written with torch ops, each step is a chain of passes over ``[tokens, width]`` tensors (SwiGLU a split, ``silu``
and a multiply forward, more backward; RMSNorm five passes each way). Each kernel reads its inputs once and
writes its outputs once, and keeps less for backward (SwiGLU only its input, RMSNorm its input and one float per
row).

Numerics follow torch's own kernels (RMSNorm sums its squares in another order than ``mean``: differences in the
last bits). The kernels serve float32 CPU tensors in the layouts the model produces, and only where the CPU has
AVX2 (ATen's ``Vectorized`` at that capability); anything else, or ``ASPEN_CPU_KERNELS=0``, keeps the torch paths.
RMSNorm's kernel is used only with a frozen weight (its backward gives no weight gradient).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from aspen.kernels.extension import HEADER, Extension

EXTENSION = Extension(
    "fused_ops", ("fused_ops.cpp", HEADER), "fused elementwise kernels",
    cflags=("-O3", "-mavx2", "-mfma", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"),
    available=lambda: torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"))


def kernel():
    """The compiled extension, or None where it is turned off, not applicable or failed to build."""
    return EXTENSION.get()


def _fits(*tensors: torch.Tensor) -> bool:
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors) and kernel() is not None


# ---- SwiGLU -------------------------------------------------------------------------------------------------
def swiglu(gu: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of ``gu = [gate | up]`` [T, 2I] (the packed gate/up projection's output)."""
    if _fits(gu) and gu.dim() == 2 and gu.is_contiguous() and gu.shape[1] % 2 == 0:
        return _SwiGLU.apply(gu)
    gate, up = gu.chunk(2, dim=-1)
    return F.silu(gate) * up


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gu: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gu)
        out = torch.empty(gu.shape[0], gu.shape[1] // 2, dtype=gu.dtype)
        kernel().swiglu_forward(out, gu)
        return out

    @staticmethod
    def backward(ctx, dh: torch.Tensor):
        (gu,) = ctx.saved_tensors
        dgu = torch.empty_like(gu)
        kernel().swiglu_backward(dgu, dh.contiguous(), gu)
        return dgu


# ---- RMSNorm ------------------------------------------------------------------------------------------------
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """``weight * x / sqrt(mean(x^2) + eps)`` over the last dimension, or None where the kernel does not apply
    (then the caller runs its torch path): float32 CPU, contiguous ``x``, a frozen weight."""
    if not (_fits(x, weight) and x.is_contiguous() and weight.is_contiguous() and weight.shape == x.shape[-1:]
            and not weight.requires_grad and x.numel()):
        return None
    return _RMSNorm.apply(x, weight, eps)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        y = torch.empty_like(x)
        rstd = torch.empty(x.shape[:-1], dtype=x.dtype)
        kernel().rms_norm_forward(y, rstd, x, weight, eps)
        ctx.save_for_backward(x, rstd, weight)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, rstd, weight = ctx.saved_tensors
        dx = torch.empty_like(x)
        kernel().rms_norm_backward(dx, dy.contiguous(), x, rstd, weight)
        return dx, None, None


# ---- rotary -------------------------------------------------------------------------------------------------
def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
    """``x`` [T, H, hd] rotated by the tables ``cos``/``sin`` [T, 1, hd], or None where the kernel does not apply
    (float32 CPU; each token's heads contiguous, as a column slice of the q/k/v projection leaves them)."""
    if not (_fits(x, cos, sin) and x.dim() == 3 and x.stride(2) == 1 and x.stride(1) == x.shape[2]
            and x.shape[2] % 2 == 0 and cos.is_contiguous() and sin.is_contiguous()
            and cos.shape == sin.shape == (x.shape[0], 1, x.shape[2])):
        return None
    return Rotation.apply(x, cos, sin, _rotate_by)


def _rotate_by(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
    """The kernel's rotation of ``x`` by the tables' angles (``sign`` -1: by minus them), into a new tensor."""
    out = torch.empty(x.shape, dtype=x.dtype)
    kernel().rotary(out, x, cos.view(cos.shape[0], -1), sin.view(sin.shape[0], -1), sign)
    return out


class Rotation(torch.autograd.Function):
    """``rotate(x, cos, sin, 1.0)`` under autograd; its backward is the inverse rotation, ``rotate(grad, cos, sin,
    -1.0)``. ``rotate``: this module's kernel, or the torch path of :mod:`aspen.model.layers`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotate) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        ctx.rotate = rotate
        return rotate(x, cos, sin, 1.0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return ctx.rotate(grad.contiguous(), cos, sin, -1.0), None, None, None
