// An fp32 GEMM x @ B with B stored in column panels, for CPUs with AVX-512 (aspen.kernels.panel_gemm wraps it).
//
// Layout: B [K, N] is held as [ceil(N / 64), K, 64]: panel p holds columns 64p .. 64p + 63 of every row of B, row
// after row (the last panel zero-padded), so that streaming one panel is one sequential run of memory that the
// hardware prefetchers follow.
//
// Each thread takes whole panels. For a panel it runs the rows of x in groups of 6: 6 rows x 64 columns = 24
// AVX-512 accumulators; each step of k loads 4 vectors of the panel and broadcasts 6 values of x into 24 FMAs.
// While it works on one panel it prefetches the next into L2. Rows come in chunks of 192, so that the chunk of x
// stays in L2 while the panels go by; with more than 12 rows K goes in slabs of 128 panel rows (32 KiB), so that
// every row group reads the slab from L1 (partial sums wait in out).
//
// The kernel exists only where the compiler targets AVX-512 (-march=native); built_for_avx512() says which.

#include "aspen_extension.h"
#include <ATen/Parallel.h>
#include <algorithm>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

bool built_for_avx512() {
#if defined(__AVX512F__)
  return true;
#else
  return false;
#endif
}

// b_t: B^T [N, K] (any strides) -> panels [ceil(N / 64), K, 64]
at::Tensor pack_panels(at::Tensor b_t) {
  TORCH_CHECK(b_t.scalar_type() == at::kFloat && b_t.dim() == 2 && b_t.device().is_cpu(),
              "pack_panels: a 2-D float32 CPU matrix expected");
  const int64_t n = b_t.size(0), k = b_t.size(1), panels = (n + 63) / 64;
  auto out = at::zeros({panels, k, 64}, b_t.options().memory_format(at::MemoryFormat::Contiguous));
  auto src = b_t.accessor<float, 2>();
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p)
      for (int64_t j = 0; j < 64 && p * 64 + j < n; ++j)
        for (int64_t i = 0; i < k; ++i) dst[(p * k + i) * 64 + j] = src[p * 64 + j][i];
  });
  return out;
}

#if defined(__AVX512F__)
// out[0:R, cols of panel] = x[0:R, :] @ panel; prefetches `lines` cache lines from `pf` on the way
template <int R>
static inline void tile(const float* x, int64_t ldx, int64_t k0, int64_t k1, const float* panel, float* out,
                        int64_t ldo, int64_t cols, const char* pf, int64_t lines) {
  __m512 acc[R][4];
  __mmask16 mask[4];  // the columns of each vector that exist (the last panel may be partial)
  for (int c = 0; c < 4; ++c) {
    const int64_t left = cols - c * 16;
    mask[c] = left >= 16 ? (__mmask16)0xFFFF : left > 0 ? (__mmask16)((1u << left) - 1) : 0;
    for (int r = 0; r < R; ++r)
      acc[r][c] = k0 == 0 || !mask[c] ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(mask[c], out + r * ldo + c * 16);
  }
  const int64_t k = k1 - k0, per_step = lines > 0 ? (lines + k - 1) / k : 0;
  for (int64_t i = k0; i < k1; ++i) {
    const int64_t j = i - k0;
    for (int64_t l = j * per_step; l < std::min(lines, (j + 1) * per_step); ++l) _mm_prefetch(pf + l * 64, _MM_HINT_T1);
    const float* w = panel + i * 64;
    const __m512 w0 = _mm512_load_ps(w), w1 = _mm512_load_ps(w + 16), w2 = _mm512_load_ps(w + 32),
                 w3 = _mm512_load_ps(w + 48);
    for (int r = 0; r < R; ++r) {
      const __m512 xv = _mm512_set1_ps(x[r * ldx + i]);
      acc[r][0] = _mm512_fmadd_ps(xv, w0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(xv, w1, acc[r][1]);
      acc[r][2] = _mm512_fmadd_ps(xv, w2, acc[r][2]);
      acc[r][3] = _mm512_fmadd_ps(xv, w3, acc[r][3]);
    }
  }
  for (int c = 0; c < 4 && mask[c]; ++c)
    for (int r = 0; r < R; ++r) _mm512_mask_storeu_ps(out + r * ldo + c * 16, mask[c], acc[r][c]);
}

// rows [0, m) of x against one panel, the next panel's lines prefetched across the row groups. With more than
// two row groups K goes in slabs of kSlab rows of the panel (32 KiB), so that every group reads the slab from L1.
constexpr int64_t kSlab = 128;
static void panel_rows(const float* x, int64_t m, int64_t k, const float* panel, float* out, int64_t ldo,
                       int64_t cols, const char* next) {
  const int64_t groups = (m + 5) / 6, slab = groups > 2 ? kSlab : k, slabs = (k + slab - 1) / slab;
  const int64_t lines = next ? k * 4 : 0, share = (lines + groups * slabs - 1) / (groups * slabs);
  int64_t step = 0;
  for (int64_t k0 = 0; k0 < k; k0 += slab) {
    const int64_t k1 = std::min(k, k0 + slab);
    for (int64_t g = 0; g < groups; ++g, ++step) {
      const int64_t r0 = g * 6, rows = std::min<int64_t>(6, m - r0);
      const int64_t l0 = std::min(lines, step * share), n_lines = std::min(lines, l0 + share) - l0;
      const char* pf = next ? next + l0 * 64 : nullptr;
      const float* xr = x + r0 * k;
      float* o = out + r0 * ldo;
      switch (rows) {
        case 6: tile<6>(xr, k, k0, k1, panel, o, ldo, cols, pf, n_lines); break;
        case 5: tile<5>(xr, k, k0, k1, panel, o, ldo, cols, pf, n_lines); break;
        case 4: tile<4>(xr, k, k0, k1, panel, o, ldo, cols, pf, n_lines); break;
        case 3: tile<3>(xr, k, k0, k1, panel, o, ldo, cols, pf, n_lines); break;
        case 2: tile<2>(xr, k, k0, k1, panel, o, ldo, cols, pf, n_lines); break;
        default: tile<1>(xr, k, k0, k1, panel, o, ldo, cols, pf, n_lines); break;
      }
    }
  }
}
#endif

// out[M, N] = x[M, K] @ B, B in panels from pack_panels (N = out.size(1))
void panel_mm(at::Tensor out, at::Tensor x, at::Tensor panels) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat && x.dim() == 2 &&
              out.dim() == 2 && x.is_contiguous() && out.is_contiguous() && out.size(0) == x.size(0) &&
              panels.dim() == 3 && panels.size(1) == x.size(1) && panels.size(2) == 64 &&
              panels.size(0) == (out.size(1) + 63) / 64,
              "panel_mm: contiguous float32 x [M, K], out [M, N] and panels [ceil(N/64), K, 64] expected");
#if defined(__AVX512F__)
  const int64_t m = x.size(0), k = x.size(1), n = out.size(1), np = panels.size(0);
  const float* xp = x.data_ptr<float>();
  const float* bp = panels.data_ptr<float>();
  float* op = out.data_ptr<float>();
  pybind11::gil_scoped_release no_gil;
  constexpr int64_t kChunk = 192;  // rows of x kept in L2 while the panels go by
  for (int64_t r0 = 0; r0 < m; r0 += kChunk) {
    const int64_t rows = std::min(kChunk, m - r0);
    at::parallel_for(0, np, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const char* next = p + 1 < p1 ? reinterpret_cast<const char*>(bp + (p + 1) * k * 64) : nullptr;
        panel_rows(xp + r0 * k, rows, k, bp + p * k * 64, op + r0 * n + p * 64, n, std::min<int64_t>(64, n - p * 64),
                   next);
      }
    });
  }
#else
  TORCH_CHECK(false, "panel_mm: this build has no AVX-512 kernel");
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("built_for_avx512", torch::wrap_pybind_function(built_for_avx512), "built_for_avx512");
  m.def("pack_panels", torch::wrap_pybind_function(pack_panels), "pack_panels");
  m.def("panel_mm", torch::wrap_pybind_function(panel_mm), "panel_mm");
}
