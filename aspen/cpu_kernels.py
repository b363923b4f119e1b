"""CPU kernels for the two decode hot spots, compiled on first use: the LoRA op over the paged pool (BGMV) and
attention over the paged KV cache.

BGMV: for each row ``n`` (one token, one adapter) it reads that adapter's pages straight from the pool — no gathered
copy — and adds the low-rank delta to the row's output:

    xa[j]            = x[tok[n], :in] . pool[rows[n, j], :in]                      (shrink)
    y[tok[n], o0+c] += sum_{j in part} xa[j] * pool[rows[n, j], in + c]              (expand, B scale folded)

Page 0 is the all-zero padding page and is skipped.

Paged decode attention: for each decode row ``d`` and head ``h`` (kv head ``h // group``), keys and values are
read in place from their slots ``slots[d, starts[d]:lens[d]]`` — no gathered copy of the context — then a
two-pass softmax (max, exp-sum) weights the values.

Rows run in parallel (ATen's thread pool); the inner loops are plain C++ that the compiler vectorises. Built with ``torch.utils.cpp_extension.load_inline`` into torch's
extension cache (about a minute, once per machine). If it cannot be built (no compiler), or
``ASPEN_CPU_KERNELS=0`` is set, callers fall back to their pure-torch paths — same results, slower.
"""
from __future__ import annotations

import logging
import os
import threading

import torch

log = logging.getLogger("aspen.kernels")

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <vector>
#include <cmath>
#include <limits>
#include <algorithm>

void bgmv_add(torch::Tensor y, torch::Tensor x, torch::Tensor pool, torch::Tensor tok, torch::Tensor rows,
              torch::Tensor parts, int64_t in_features) {
  TORCH_CHECK(y.scalar_type() == torch::kFloat && x.scalar_type() == torch::kFloat &&
              pool.scalar_type() == torch::kFloat, "bgmv_add: float32 tensors expected");
  TORCH_CHECK(y.is_contiguous() && x.is_contiguous() && pool.is_contiguous() && rows.is_contiguous() &&
              tok.is_contiguous() && parts.is_contiguous(), "bgmv_add: contiguous tensors expected");
  const int64_t N = rows.size(0), R = rows.size(1), W = pool.size(1), K = parts.size(0);
  const int64_t xs = x.size(1), ys = y.size(1);
  float* Y = y.data_ptr<float>();
  const float* X = x.data_ptr<float>();
  const float* P = pool.data_ptr<float>();
  const int64_t* T = tok.data_ptr<int64_t>();
  const int64_t* RW = rows.data_ptr<int64_t>();
  const int64_t* PT = parts.data_ptr<int64_t>();
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> xa(R);
    for (int64_t n = begin; n < end; ++n) {
      const float* xt = X + T[n] * xs;
      const int64_t* rn = RW + n * R;
      for (int64_t j = 0; j < R; ++j) {
        if (rn[j] == 0) { xa[j] = 0.f; continue; }
        const float* a = P + rn[j] * W;
        float s = 0.f;
        #pragma omp simd reduction(+:s)
        for (int64_t i = 0; i < in_features; ++i) s += xt[i] * a[i];
        xa[j] = s;
      }
      float* yt = Y + T[n] * ys;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t r0 = PT[4 * k], r1 = PT[4 * k + 1], o0 = PT[4 * k + 2], o1 = PT[4 * k + 3];
        float* yo = yt + o0;
        const int64_t width = o1 - o0;
        for (int64_t j = r0; j < r1; ++j) {
          if (rn[j] == 0) continue;
          const float c = xa[j];
          const float* b = P + rn[j] * W + in_features;
          #pragma omp simd
          for (int64_t o = 0; o < width; ++o) yo[o] += c * b[o];
        }
      }
    }
  });
}

void paged_decode_attention(torch::Tensor out, torch::Tensor q, torch::Tensor k_pool, torch::Tensor v_pool,
                            torch::Tensor slots, torch::Tensor starts, torch::Tensor lens, double scale) {
  TORCH_CHECK(q.scalar_type() == torch::kFloat && k_pool.scalar_type() == torch::kFloat &&
              v_pool.scalar_type() == torch::kFloat && out.scalar_type() == torch::kFloat,
              "paged_decode_attention: float32 tensors expected");
  TORCH_CHECK(out.is_contiguous() && q.is_contiguous() && k_pool.is_contiguous() && v_pool.is_contiguous() &&
              slots.is_contiguous() && starts.is_contiguous() && lens.is_contiguous(),
              "paged_decode_attention: contiguous tensors expected");
  const int64_t D = q.size(0), H = q.size(1), HD = q.size(2), KVH = k_pool.size(1), L = slots.size(1);
  const int64_t group = H / KVH;
  const float* Q = q.data_ptr<float>();
  const float* K = k_pool.data_ptr<float>();
  const float* V = v_pool.data_ptr<float>();
  const int64_t* S = slots.data_ptr<int64_t>();
  const int64_t* ST = starts.data_ptr<int64_t>();
  const int64_t* LN = lens.data_ptr<int64_t>();
  float* O = out.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, D * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> w(L);
    std::vector<float> acc(HD);
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t d = idx / H, h = idx % H, kvh = h / group;
      const float* qh = Q + (d * H + h) * HD;
      const int64_t* sd = S + d * L;
      const int64_t lo = ST[d], hi = LN[d];
      float m = -std::numeric_limits<float>::infinity();
      for (int64_t p = lo; p < hi; ++p) {
        const float* kp = K + (sd[p] * KVH + kvh) * HD;
        float s = 0.f;
        #pragma omp simd reduction(+:s)
        for (int64_t i = 0; i < HD; ++i) s += qh[i] * kp[i];
        s *= sc;
        w[p] = s;
        if (s > m) m = s;
      }
      float denom = 0.f;
      for (int64_t p = lo; p < hi; ++p) { w[p] = std::exp(w[p] - m); denom += w[p]; }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t p = lo; p < hi; ++p) {
        const float* vp = V + (sd[p] * KVH + kvh) * HD;
        const float c = w[p];
        #pragma omp simd
        for (int64_t i = 0; i < HD; ++i) acc[i] += c * vp[i];
      }
      float* oh = O + (d * H + h) * HD;
      const float inv = denom > 0.f ? 1.f / denom : 0.f;
      for (int64_t i = 0; i < HD; ++i) oh[i] = acc[i] * inv;
    }
  });
}
"""

_module = None
_failed = False
_lock = threading.Lock()


def kernel():
    """The compiled module, or None when unavailable (then callers use the torch path)."""
    global _module, _failed
    if _module is not None or _failed:
        return _module
    if os.environ.get("ASPEN_CPU_KERNELS", "1").lower() in ("0", "false", "no", "off"):
        _failed = True
        return None
    with _lock:
        if _module is None and not _failed:
            try:
                from torch.utils.cpp_extension import load_inline

                log.info("building the CPU kernels (once per machine, about a minute)...")
                _module = load_inline(name="aspen_cpu_kernels_v1", cpp_sources=_SOURCE,
                                      functions=["bgmv_add", "paged_decode_attention"],
                                      extra_cflags=["-O3", "-march=native", "-fopenmp"],
                                      extra_ldflags=["-fopenmp"], verbose=False)
            except Exception as e:  # no compiler / headers: the torch path still works
                log.warning("CPU kernels unavailable (%s); using the torch paths", e)
                _failed = True
    return _module


def bgmv_add(y: torch.Tensor, x: torch.Tensor, pool_layer: torch.Tensor, tok: torch.Tensor, rows: torch.Tensor,
             parts: torch.Tensor, in_features: int) -> bool:
    """y[tok] += LoRA delta, in place. Returns False (nothing done) when the kernel cannot take these tensors."""
    if y.device.type != "cpu" or torch.is_grad_enabled():
        return False
    mod = kernel()
    if mod is None:
        return False
    if not (y.dtype == x.dtype == pool_layer.dtype == torch.float32) or not y.is_contiguous():
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
