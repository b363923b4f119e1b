"""C++ helpers for loading an adapter: the NaN/Inf check of its tensors and the write into the LoRA pool.

Loading a rank-16 all-module adapter of the 125M model moves 168 tensors (11.2 MB). Done with torch ops, that is
one call per tensor for the check and two per layer and projection for the pool write, ~500 calls in all; each
takes and drops the GIL. In the server, where a load runs beside the engine's step, every reacquisition may wait
on the engine thread, and a load that took ~10 ms alone took 25-40 ms there. These two functions do the same work
in one call each, with the GIL released, on float32 CPU tensors (the pool's usual dtype on the CPU); anything else
keeps the torch paths, which give the same result. ``ASPEN_CPU_KERNELS=0`` turns them off like the other kernels.

Both run on ATen's threads (tensors, or one projection of one layer, per task). The pool write streams whole
cache lines to the pool where the CPU has AVX-512 (the rows it writes are not read before the next decode step,
and the pool is larger than the caches, so reading each destination line before writing it was wasted).
Loading that adapter alone with a full host tier, the two took 1.2 and 1.9-2.4 ms on one thread with plain
stores, 0.7-1.3 and 1.5-1.8 ms now (BENCHMARKS.md, row 4).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from aspen.kernels.extension import LazyExtension

_SOURCE = r"""
#include <torch/extension.h>
#include <pybind11/pybind11.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

static void check_float_cpu(const torch::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat && t.is_contiguous(), what,
              ": contiguous float32 CPU tensors expected, got ", t.scalar_type(), " on ", t.device());
}

// true when no element is NaN or +-Inf (an exponent field of all ones)
bool all_finite(const std::vector<torch::Tensor>& tensors) {
  for (const auto& t : tensors) check_float_cpu(t, "all_finite");
  pybind11::gil_scoped_release no_gil;
  std::atomic<bool> ok{true};
  at::parallel_for(0, static_cast<int64_t>(tensors.size()), 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1 && ok.load(std::memory_order_relaxed); ++t) {
      const uint32_t* p = reinterpret_cast<const uint32_t*>(tensors[t].data_ptr<float>());
      const int64_t n = tensors[t].numel();
      uint32_t bad = 0;
      for (int64_t i = 0; i < n; ++i) bad |= (p[i] & 0x7f800000u) == 0x7f800000u;
      if (bad) ok.store(false, std::memory_order_relaxed);
    }
  });
  return ok.load();
}

// The pool is larger than the caches and the rows written now are read at the next decode step at the
// earliest, so with AVX-512 full cache lines go out as streaming stores: no read of each destination line first.
#if defined(__AVX512F__)
static inline bool aligned64(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 63) == 0; }
#endif

// dst[0:n] = src[0:n]
static inline void copy_row(float* dst, const float* src, int64_t n) {
#if defined(__AVX512F__)
  int64_t i = 0;
  for (; i < n && !aligned64(dst + i); ++i) dst[i] = src[i];
  for (; i + 16 <= n; i += 16) _mm512_stream_ps(dst + i, _mm512_loadu_ps(src + i));
  for (; i < n; ++i) dst[i] = src[i];
#else
  std::memcpy(dst, src, n * sizeof(float));
#endif
}

// dst[j] = s * src[j * stride] for j in [0, n), n <= 16
static inline void column_tile(float* dst, const float* src, int64_t stride, int64_t n, float s) {
#if defined(__AVX512F__)
  if (n == 16 && aligned64(dst) && stride < (1 << 26)) {
    const __m512i idx = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                           _mm512_set1_epi32(static_cast<int>(stride)));
    _mm512_stream_ps(dst, _mm512_mul_ps(_mm512_set1_ps(s), _mm512_i32gather_ps(idx, src, 4)));
    return;
  }
#endif
  for (int64_t j = 0; j < n; ++j) dst[j] = s * src[j * stride];
}

// For each entry e, into layer layers[e] of pool data [L, P, W] at the pool rows rows[e] (int64, n of them):
//   data[l, rows[i], :in]         = A[i]            (A [r, in], r <= n)
//   data[l, rows[i], in:in + out] = scale * B[:, i] (B [out, r])
// and rows i >= r zeroed in [:in + out].
void write_lora_rows(torch::Tensor data, const std::vector<int64_t>& layers, const std::vector<torch::Tensor>& rows,
                     const std::vector<torch::Tensor>& As, const std::vector<torch::Tensor>& Bs,
                     const std::vector<double>& scales) {
  check_float_cpu(data, "write_lora_rows (pool)");
  TORCH_CHECK(data.dim() == 3, "write_lora_rows: pool data [L, P, W] expected");
  const size_t n_entries = layers.size();
  TORCH_CHECK(rows.size() == n_entries && As.size() == n_entries && Bs.size() == n_entries &&
              scales.size() == n_entries, "write_lora_rows: one layer, row list, A, B and scale per entry");
  const int64_t L = data.size(0), P = data.size(1), W = data.size(2);
  for (size_t e = 0; e < n_entries; ++e) {
    check_float_cpu(As[e], "write_lora_rows (lora_A)");
    check_float_cpu(Bs[e], "write_lora_rows (lora_B)");
    TORCH_CHECK(rows[e].device().is_cpu() && rows[e].scalar_type() == torch::kLong && rows[e].dim() == 1 &&
                rows[e].is_contiguous(), "write_lora_rows: row ids must be a contiguous int64 CPU vector");
    TORCH_CHECK(As[e].dim() == 2 && Bs[e].dim() == 2 && Bs[e].size(1) == As[e].size(0) &&
                As[e].size(0) <= rows[e].numel() && As[e].size(1) + Bs[e].size(0) <= W,
                "write_lora_rows: entry ", e, " has A ", As[e].sizes(), " and B ", Bs[e].sizes(), " for ",
                rows[e].numel(), " rows of width ", W);
    TORCH_CHECK(layers[e] >= 0 && layers[e] < L, "write_lora_rows: layer ", layers[e], " out of range");
    const int64_t* r = rows[e].data_ptr<int64_t>();
    for (int64_t i = 0; i < rows[e].numel(); ++i)
      TORCH_CHECK(r[i] >= 0 && r[i] < P, "write_lora_rows: pool row ", r[i], " out of range [0, ", P, ")");
  }
  pybind11::gil_scoped_release no_gil;
  float* base = data.data_ptr<float>();
  // entries write disjoint rows (the rows of one projection in one layer each): one entry per task
  at::parallel_for(0, static_cast<int64_t>(n_entries), 1, [&](int64_t e0, int64_t e1) {
    for (int64_t e = e0; e < e1; ++e) {
      const int64_t rank = As[e].size(0), in = As[e].size(1), out = Bs[e].size(0), n = rows[e].numel();
      const int64_t* r = rows[e].data_ptr<int64_t>();
      const float* a = As[e].data_ptr<float>();
      const float* b = Bs[e].data_ptr<float>();
      const float s = static_cast<float>(scales[e]);
      float* layer = base + layers[e] * P * W;
      for (int64_t i = 0; i < rank; ++i) copy_row(layer + r[i] * W, a + i * in, in);
      for (int64_t i = rank; i < n; ++i) std::memset(layer + r[i] * W, 0, (in + out) * sizeof(float));
      // B's column i goes to row i: walk B in tiles of 16 of its rows, so that the tile stays in L1 while each
      // pool row gets its 16 values (one cache line) of it
      for (int64_t j0 = 0; j0 < out; j0 += 16) {
        const int64_t j1 = std::min(out, j0 + 16);
        for (int64_t i = 0; i < rank; ++i)
          column_tile(layer + r[i] * W + in + j0, b + j0 * rank + i, rank, j1 - j0, s);
      }
    }
#if defined(__AVX512F__)
    _mm_sfence();  // this thread's streaming stores reach memory before the engine thread reads these rows
#endif
  });
}
"""

_EXTENSION = LazyExtension("aspen_adapter_kernels_v3", _SOURCE, ["all_finite", "write_lora_rows"],
                           "adapter-loading kernels", cflags=("-O3", "-march=native", "-fopenmp"),
                           ldflags=("-fopenmp",))


def kernel():
    """The compiled extension, or None where it is turned off or cannot be built."""
    return _EXTENSION.get()


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
