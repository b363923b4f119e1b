// Adapter-loading helpers (aspen.kernels.adapter_kernels wraps them): the NaN/Inf check of an adapter's tensors and
// its write into the LoRA pool, each one call with the GIL released, on float32 CPU tensors. Both run on ATen's
// threads (a tensor, or one projection of one layer, per task).

#include "aspen_extension.h"
#include <ATen/Parallel.h>
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

static void check_float_cpu(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(), what,
              ": contiguous float32 CPU tensors expected, got ", t.scalar_type(), " on ", t.device());
}

// true when no element is NaN or +-Inf (an exponent field of all ones)
bool all_finite(const std::vector<at::Tensor>& tensors) {
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
void write_lora_rows(at::Tensor data, const std::vector<int64_t>& layers, const std::vector<at::Tensor>& rows,
                     const std::vector<at::Tensor>& As, const std::vector<at::Tensor>& Bs,
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
    TORCH_CHECK(rows[e].device().is_cpu() && rows[e].scalar_type() == at::kLong && rows[e].dim() == 1 &&
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("all_finite", torch::wrap_pybind_function(all_finite), "all_finite");
  m.def("write_lora_rows", torch::wrap_pybind_function(write_lora_rows), "write_lora_rows");
}
