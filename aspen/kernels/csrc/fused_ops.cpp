// The decoder's elementwise steps as single-pass CPU kernels with their backward passes: SwiGLU, RMSNorm and the
// rotary embedding (aspen.kernels.fused_ops wraps them). Each reads its inputs once and writes its outputs once;
// rows run in parallel on ATen's thread pool.
//
// Numerics follow torch's own kernels: silu(g) = g / (1 + exp(-g)) with ATen's vectorised exp; RMSNorm sums
// squares in float32 in another order than torch's mean (differences in the last bits). Built for ATen's AVX2
// Vectorized<float> (-mavx2 -mfma with CPU_CAPABILITY=AVX2).

#include "aspen_extension.h"
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
void swiglu_forward(at::Tensor out, at::Tensor gu) {
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
void swiglu_backward(at::Tensor dgu, at::Tensor dh, at::Tensor gu) {
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
void rms_norm_forward(at::Tensor y, at::Tensor rstd, at::Tensor x, at::Tensor w, double eps) {
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
void rms_norm_backward(at::Tensor dx, at::Tensor dy, at::Tensor x, at::Tensor rstd, at::Tensor w) {
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
void rotary(at::Tensor out, at::Tensor x, at::Tensor cos, at::Tensor sin, double sign) {
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("swiglu_forward", torch::wrap_pybind_function(swiglu_forward), "swiglu_forward");
  m.def("swiglu_backward", torch::wrap_pybind_function(swiglu_backward), "swiglu_backward");
  m.def("rms_norm_forward", torch::wrap_pybind_function(rms_norm_forward), "rms_norm_forward");
  m.def("rms_norm_backward", torch::wrap_pybind_function(rms_norm_backward), "rms_norm_backward");
  m.def("rotary", torch::wrap_pybind_function(rotary), "rotary");
}
