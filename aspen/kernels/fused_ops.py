"""The decoder's elementwise steps as single-pass CPU kernels, with their backward passes: SwiGLU, RMSNorm and
the rotary embedding.

Written with torch ops, each step is a chain of passes over ``[tokens, width]`` tensors — SwiGLU is a split,
``silu`` and a multiply forward, and ``silu_backward``, two multiplies and a concatenation of the two halves'
gradients backward; RMSNorm is five passes each way. On one core at 2,041 tokens of the 125M model, SwiGLU's
forward and backward took 31 ms against 8 here, and these steps together were about a tenth of a training step.
Each kernel reads its inputs once and writes its outputs once, keeps less for backward (SwiGLU only its input,
RMSNorm its input and one float per row), and runs rows in parallel on ATen's thread pool.

Numerics follow torch's own kernels: ``silu(g) = g / (1 + exp(-g))`` with the same vectorised ``exp``; RMSNorm
sums squares in float32 in another order than ``mean`` (differences in the last bits). The kernels serve float32 CPU tensors in the layouts the model produces and only where the CPU has
AVX2 (ATen's ``Vectorized`` with that capability); anything else, or ``ASPEN_CPU_KERNELS=0``, keeps the torch
paths. RMSNorm's kernel is used only with a frozen weight (its backward gives no weight gradient).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from aspen.kernels.extension import LazyExtension

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/cpu/vec/functional.h>
#include <algorithm>

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kGrain = 16;  // rows per task

// f(t) for every row t, rows split over ATen's thread pool
template <typename F> void each_row(int64_t rows, const F& f) {
  at::parallel_for(0, rows, kGrain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) f(t);
  });
}

// out[t, j] = silu(g) * u with g = gu[t, j], u = gu[t, I + j]
void swiglu_forward(torch::Tensor out, torch::Tensor gu) {
  const int64_t I = gu.size(1) / 2;
  const float* src = gu.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  each_row(gu.size(0), [&](int64_t t) {
    const float* g = src + t * 2 * I;
    const float* u = g + I;
    float* o = dst + t * I;
    for (int64_t j = 0; j < I; j += Vec::size()) {
      const int64_t n = std::min<int64_t>(Vec::size(), I - j);
      const Vec gv = Vec::loadu(g + j, n);
      ((gv / (Vec(1.f) + gv.neg().exp())) * Vec::loadu(u + j, n)).store(o + j, n);
    }
  });
}

// dgu[t, j] = dh * u * s * (1 + g * (1 - s)), dgu[t, I + j] = dh * g * s, with s = sigmoid(g)
void swiglu_backward(torch::Tensor dgu, torch::Tensor dh, torch::Tensor gu) {
  const int64_t I = gu.size(1) / 2;
  const float* src = gu.data_ptr<float>();
  const float* grad = dh.data_ptr<float>();
  float* dst = dgu.data_ptr<float>();
  each_row(gu.size(0), [&](int64_t t) {
    const float* g = src + t * 2 * I;
    const float* u = g + I;
    const float* d = grad + t * I;
    float* dg = dst + t * 2 * I;
    float* du = dg + I;
    for (int64_t j = 0; j < I; j += Vec::size()) {
      const int64_t n = std::min<int64_t>(Vec::size(), I - j);
      const Vec gv = Vec::loadu(g + j, n), dv = Vec::loadu(d + j, n);
      const Vec s = Vec(1.f) / (Vec(1.f) + gv.neg().exp());
      (dv * gv * s).store(du + j, n);
      (dv * Vec::loadu(u + j, n) * s * (Vec(1.f) + gv * (Vec(1.f) - s))).store(dg + j, n);
    }
  });
}

static float sum_of_squares(const float* x, int64_t n) {
  Vec acc(0.f);
  for (int64_t j = 0; j < n; j += Vec::size()) {
    const Vec v = Vec::loadu(x + j, std::min<int64_t>(Vec::size(), n - j));  // the lanes past n load as 0
    acc = at::vec::fmadd(v, v, acc);
  }
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, acc);
}

// rows of x [R, D]: rstd[r] = 1 / sqrt(mean(x^2) + eps), y = w * (x * rstd)
void rms_norm_forward(torch::Tensor y, torch::Tensor rstd, torch::Tensor x, torch::Tensor w, double eps) {
  const int64_t D = x.size(-1), R = x.numel() / D;
  const float* xs = x.data_ptr<float>();
  const float* ws = w.data_ptr<float>();
  float* ys = y.data_ptr<float>();
  float* rs = rstd.data_ptr<float>();
  each_row(R, [&](int64_t r) {
    const float* xr = xs + r * D;
    float* yr = ys + r * D;
    const float rv = 1.f / std::sqrt(sum_of_squares(xr, D) / D + static_cast<float>(eps));
    rs[r] = rv;
    for (int64_t j = 0; j < D; j += Vec::size()) {
      const int64_t n = std::min<int64_t>(Vec::size(), D - j);
      (Vec::loadu(ws + j, n) * (Vec::loadu(xr + j, n) * Vec(rv))).store(yr + j, n);
    }
  });
}

// dx = rstd * (g - x * rstd^2 * mean(g * x)) with g = w * dy (the weight is frozen: no weight gradient)
void rms_norm_backward(torch::Tensor dx, torch::Tensor dy, torch::Tensor x, torch::Tensor rstd, torch::Tensor w) {
  const int64_t D = x.size(-1), R = x.numel() / D;
  const float* xs = x.data_ptr<float>();
  const float* ds = dy.data_ptr<float>();
  const float* ws = w.data_ptr<float>();
  const float* rs = rstd.data_ptr<float>();
  float* out = dx.data_ptr<float>();
  each_row(R, [&](int64_t r) {
    const float* xr = xs + r * D;
    const float* dr = ds + r * D;
    float* o = out + r * D;
    Vec acc(0.f);
    for (int64_t j = 0; j < D; j += Vec::size()) {
      const int64_t n = std::min<int64_t>(Vec::size(), D - j);
      acc = at::vec::fmadd(Vec::loadu(ws + j, n) * Vec::loadu(dr + j, n), Vec::loadu(xr + j, n), acc);
    }
    const float dot = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, acc);
    const float rv = rs[r], c = rv * rv * rv * dot / D;
    for (int64_t j = 0; j < D; j += Vec::size()) {
      const int64_t n = std::min<int64_t>(Vec::size(), D - j);
      (Vec(rv) * Vec::loadu(ws + j, n) * Vec::loadu(dr + j, n) - Vec::loadu(xr + j, n) * Vec(c)).store(o + j, n);
    }
  });
}

// x [T, H, hd] (heads contiguous within a token, any token stride), cos/sin [T, hd] (halves repeat):
// out[t, h, i] = x1 c - sign x2 s, out[t, h, half + i] = x2 c + sign x1 s; out [T, H, hd] contiguous
void rotary(torch::Tensor out, torch::Tensor x, torch::Tensor cos, torch::Tensor sin, double sign) {
  const int64_t T = x.size(0), H = x.size(1), hd = x.size(2), half = hd / 2, xs = x.stride(0);
  const float* xp = x.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const Vec sg(static_cast<float>(sign));
  each_row(T, [&](int64_t t) {
    const float* c = cp + t * hd;
    const float* s = sp + t * hd;
    for (int64_t h = 0; h < H; ++h) {
      const float* x1 = xp + t * xs + h * hd;
      const float* x2 = x1 + half;
      float* o1 = op + (t * H + h) * hd;
      float* o2 = o1 + half;
      for (int64_t i = 0; i < half; i += Vec::size()) {
        const int64_t n = std::min<int64_t>(Vec::size(), half - i);
        const Vec a = Vec::loadu(x1 + i, n), b = Vec::loadu(x2 + i, n);
        const Vec cv = Vec::loadu(c + i, n), sv = Vec::loadu(s + i, n) * sg;
        (a * cv - b * sv).store(o1 + i, n);
        (b * cv + a * sv).store(o2 + i, n);
      }
    }
  });
}
"""

_EXTENSION = LazyExtension(
    "aspen_fused_ops_v3", _SOURCE, ["swiglu_forward", "swiglu_backward", "rms_norm_forward", "rms_norm_backward",
                                    "rotary"], "fused elementwise kernels",
    cflags=("-O3", "-mavx2", "-mfma", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"),
    available=lambda: torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"))


def kernel():
    """The compiled extension, or None where it is turned off, not applicable or failed to build."""
    return _EXTENSION.get()


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
