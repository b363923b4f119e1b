// SGMV: the LoRA op over rows grouped by adapter, with AVX-512 (aspen.kernels.sgmv wraps it).
//
// Rows come grouped into segments (consecutive rows with one adapter) and each segment goes in blocks of up to 4
// rows. For a block and 4 rank rows at a time:
//   shrink  xa[t, j] = x[tok[t], :in] . pool[page_j, :in]        16 accumulators (4 tokens x 4 rank rows); each
//                                                                step loads 4 x and 4 A vectors
//   expand  y[tok[t], o0 + c] += sum_j xa[t, j] * pool[page_j, in + c]
//                                                                the 16 xa values stay in registers while the
//                                                                columns go by: 4 B vectors loaded per 16 FMAs
// Pool layout, row tables and parts are BGMV's (cpu_kernels.cpp): page 0 is all zeros, B's scale is folded in.
// The blocks of a segment run on one thread one after another, so the pages the first block reads stay in that
// core's L2 for the rest. Pool storage float32, float16 or bfloat16 (math in float32).
//
// The kernel exists only where the compiler targets AVX-512 (-march=native); built_for_avx512() says which.

#include "aspen_extension.h"
#include <ATen/Parallel.h>
#include <algorithm>
#include <utility>
#include <vector>
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define SGMV_BUILT 1
#endif

bool built_for_avx512() {
#ifdef SGMV_BUILT
  return true;
#else
  return false;
#endif
}

#ifdef SGMV_BUILT
// 16 pool elements as float32; `m` masks a tail
static inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
static inline __m512 load16(const c10::Half* p, __mmask16 m) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, reinterpret_cast<const void*>(p)));
}
static inline __m512 load16(const c10::BFloat16* p, __mmask16 m) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, reinterpret_cast<const void*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
static inline __mmask16 tail(int64_t left) { return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1); }

// xa[t * R + j0 + q] = x_t . A_{j0+q} for the T (<= 4) tokens and 4 rank rows of pages a[0..3]
template <int T, typename P>
static inline void shrink4(const float* const* x, const P* const* a, int64_t in, float* xa, int64_t R, int64_t j0,
                           int64_t rows) {
  __m512 acc[T][4];
  for (int t = 0; t < T; ++t)
    for (int q = 0; q < 4; ++q) acc[t][q] = _mm512_setzero_ps();
  for (int64_t i = 0; i < in; i += 16) {
    const __mmask16 m = tail(in - i);
    __m512 av[4];
    for (int q = 0; q < 4; ++q) av[q] = load16(a[q] + i, m);
    for (int t = 0; t < T; ++t) {
      const __m512 xv = _mm512_maskz_loadu_ps(m, x[t] + i);
      for (int q = 0; q < 4; ++q) acc[t][q] = _mm512_fmadd_ps(xv, av[q], acc[t][q]);
    }
  }
  for (int t = 0; t < T; ++t)
    for (int q = 0; q < rows; ++q) xa[t * R + j0 + q] = _mm512_reduce_add_ps(acc[t][q]);
}

// y_t[c] += sum_q xa[t, j0 + q] * B_{j0+q}[c] for columns [0, n) of the T tokens' outputs (rank rows j0 .. j0+3;
// missing ones read the zero page and have xa 0)
template <int T, typename P>
static inline void expand4(float* const* y, const P* const* b, int64_t n, const float* xa, int64_t R, int64_t j0) {
  __m512 c[T][4];
  for (int t = 0; t < T; ++t)
    for (int q = 0; q < 4; ++q) c[t][q] = _mm512_set1_ps(xa[t * R + j0 + q]);
  for (int64_t o = 0; o < n; o += 16) {
    const __mmask16 m = tail(n - o);
    __m512 bv[4];
    for (int q = 0; q < 4; ++q) bv[q] = load16(b[q] + o, m);
    for (int t = 0; t < T; ++t) {
      __m512 acc = _mm512_maskz_loadu_ps(m, y[t] + o);
      for (int q = 0; q < 4; ++q) acc = _mm512_fmadd_ps(c[t][q], bv[q], acc);
      _mm512_mask_storeu_ps(y[t] + o, m, acc);
    }
  }
}

// one block: T tokens of one segment, its page rows `rw` (R of them), parts PT (K of them)
template <int T, typename P>
static void block(float* Y, const float* X, const P* pool, const int64_t* tok, const int64_t* rw, int64_t R,
                  int64_t W, const int64_t* PT, int64_t K, int64_t xs, int64_t ys, int64_t in, float* xa) {
  const float* x[T];
  float* yb[T];
  for (int t = 0; t < T; ++t) { x[t] = X + tok[t] * xs; yb[t] = Y + tok[t] * ys; }
  std::fill(xa, xa + T * R, 0.f);
  for (int64_t j = 0; j < R; j += 4) {
    const P* a[4];
    for (int q = 0; q < 4; ++q) a[q] = pool + (j + q < R ? rw[j + q] : 0) * W;
    shrink4<T>(x, a, in, xa, R, j, std::min<int64_t>(4, R - j));
  }
  for (int64_t k = 0; k < K; ++k) {
    const int64_t r0 = PT[4 * k], r1 = PT[4 * k + 1], o0 = PT[4 * k + 2], o1 = PT[4 * k + 3];
    float* yo[T];
    for (int t = 0; t < T; ++t) yo[t] = yb[t] + o0;
    for (int64_t j = r0; j < r1; j += 4) {
      const P* b[4];
      float xa4[T * 4];  // this part's rank rows j..j+3 (zero past r1: those may belong to the next part)
      for (int t = 0; t < T; ++t)
        for (int q = 0; q < 4; ++q) xa4[t * 4 + q] = j + q < r1 ? xa[t * R + j + q] : 0.f;
      for (int q = 0; q < 4; ++q) b[q] = pool + (j + q < r1 ? rw[j + q] : 0) * W + in;
      expand4<T>(yo, b, o1 - o0, xa4, 4, 0);
    }
  }
}

template <typename P>
static void sgmv_impl(float* Y, const float* X, const P* pool, const int64_t* tok, const int64_t* RW,
                      const int64_t* seg, int64_t S, int64_t R, int64_t W, const int64_t* PT, int64_t K, int64_t xs,
                      int64_t ys, int64_t in) {
  std::vector<std::pair<int64_t, int64_t>> work;  // [first, end) rows of each block of <= 4 rows of one segment
  for (int64_t s = 0; s < S; ++s)
    for (int64_t n = seg[s]; n < seg[s + 1]; n += 4) work.emplace_back(n, std::min(n + 4, seg[s + 1]));
  at::parallel_for(0, static_cast<int64_t>(work.size()), 1, [&](int64_t w0, int64_t w1) {
    std::vector<float> xa(4 * R);
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t n = work[w].first, T = work[w].second - n;
      const int64_t* rw = RW + n * R;  // a segment's rows share their page rows
      switch (T) {
        case 4: block<4>(Y, X, pool, tok + n, rw, R, W, PT, K, xs, ys, in, xa.data()); break;
        case 3: block<3>(Y, X, pool, tok + n, rw, R, W, PT, K, xs, ys, in, xa.data()); break;
        case 2: block<2>(Y, X, pool, tok + n, rw, R, W, PT, K, xs, ys, in, xa.data()); break;
        default: block<1>(Y, X, pool, tok + n, rw, R, W, PT, K, xs, ys, in, xa.data()); break;
      }
    }
  });
}
#endif

// y[tok[n]] += LoRA delta of row n, rows [seg[s], seg[s+1]) sharing the page rows rows[seg[s]]
void sgmv_add(at::Tensor y, at::Tensor x, at::Tensor pool, at::Tensor tok, at::Tensor rows,
              at::Tensor seg, at::Tensor parts, int64_t in_features) {
  TORCH_CHECK(y.scalar_type() == at::kFloat && x.scalar_type() == at::kFloat,
              "sgmv_add: float32 activations expected");
  TORCH_CHECK(y.is_contiguous() && x.is_contiguous() && pool.is_contiguous() && rows.is_contiguous() &&
              tok.is_contiguous() && seg.is_contiguous() && parts.is_contiguous(),
              "sgmv_add: contiguous tensors expected");
  TORCH_CHECK(seg.dim() == 1 && seg.size(0) >= 1 && seg.scalar_type() == at::kLong && seg.device().is_cpu() &&
              tok.size(0) == rows.size(0), "sgmv_add: segment offsets from 0 to the number of rows expected");
  const int64_t* SG = seg.data_ptr<int64_t>();  // read in place: this runs once per layer and projection group
  const int64_t S = seg.size(0) - 1;
  TORCH_CHECK(SG[0] == 0 && SG[S] == rows.size(0), "sgmv_add: segment offsets from 0 to the number of rows expected");
  for (int64_t s = 0; s < S; ++s) TORCH_CHECK(SG[s] <= SG[s + 1], "sgmv_add: segment offsets must not decrease");
#ifdef SGMV_BUILT
  const int64_t R = rows.size(1), W = pool.size(1), K = parts.size(0);
  float* Y = y.data_ptr<float>();
  const float* X = x.data_ptr<float>();
  const int64_t* T_ = tok.data_ptr<int64_t>();
  const int64_t* RW = rows.data_ptr<int64_t>();
  const int64_t* PT = parts.data_ptr<int64_t>();
  pybind11::gil_scoped_release no_gil;
  switch (pool.scalar_type()) {
    case at::kFloat:
      sgmv_impl(Y, X, pool.data_ptr<float>(), T_, RW, SG, S, R, W, PT, K, x.size(1), y.size(1), in_features);
      break;
    case at::kHalf:
      sgmv_impl(Y, X, pool.data_ptr<c10::Half>(), T_, RW, SG, S, R, W, PT, K, x.size(1), y.size(1), in_features);
      break;
    case at::kBFloat16:
      sgmv_impl(Y, X, pool.data_ptr<c10::BFloat16>(), T_, RW, SG, S, R, W, PT, K, x.size(1), y.size(1),
                in_features);
      break;
    default:
      TORCH_CHECK(false, "sgmv_add: pool must be float32, float16 or bfloat16");
  }
#else
  TORCH_CHECK(false, "sgmv_add: this build has no AVX-512 kernel");
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("built_for_avx512", torch::wrap_pybind_function(built_for_avx512), "built_for_avx512");
  m.def("sgmv_add", torch::wrap_pybind_function(sgmv_add), "sgmv_add");
}
