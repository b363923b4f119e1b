// CPU kernels for the decode hot spots and training's dropout (aspen.kernels.cpu_kernels wraps them).
//
// bgmv_add: the LoRA op over the paged adapter pool, one row (token, adapter) at a time. Each row reads its
// adapter's pages in place and adds the low-rank delta to its output (float32 activations and math; the pool is
// float32, float16 or bfloat16, converted as loaded):
//   xa[j]            = x[tok[n], :in] . pool[rows[n, j], :in]            (shrink)
//   y[tok[n], o0+c] += sum_{j in part} xa[j] * pool[rows[n, j], in + c]   (expand, B's scale folded in)
// Page 0 is the all-zero padding page: padding rows read it and add nothing.
//
// paged_decode_attention: one query per decode row over its keys and values, read in place from their slots
// slots[d, starts[d]:lens[d]] of the paged KV cache, slot by slot (each slot's heads are one contiguous read).
//
// dropout_apply: counter-based dropout; element i of a draw is kept when a hash of (seed, i) clears a 32-bit
// threshold, so a mask is a pure function of its seed and backward regenerates it instead of keeping it.
//
// Rows run in parallel on ATen's thread pool. BGMV's inner loops use AVX2/FMA/F16C intrinsics where the compiler
// targets them (-march=native) and plain C++ otherwise; attention's and dropout's are loops the compiler vectorises.

#include "aspen_extension.h"
#include <ATen/Parallel.h>
#include <vector>
#include <cmath>
#include <limits>
#include <algorithm>

// Pool elements as float32: float itself, IEEE half (F16C converts 8 at a time) or bfloat16 (the top 16 bits
// of a float32). The pool is read once per step and is the bandwidth bill of the LoRA op; a 16-bit pool halves it.
inline float to_f32(float v) { return v; }
inline float to_f32(c10::Half v) { return static_cast<float>(v); }
inline float to_f32(c10::BFloat16 v) { return static_cast<float>(v); }

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline __m256 load8(const c10::BFloat16* p) {
  __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
// Shrink: four rank rows at a time share each load of x. Expand: four rank rows at a time share each load and
// store of y. (Row by row, the y traffic in L1 — not DRAM — bounded the op.)
template <typename T> void dot4(const float* x, const T* a0, const T* a1, const T* a2, const T* a3, int64_t n,
                                float* out) {
  __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 xv = _mm256_loadu_ps(x + i);
    s0 = _mm256_fmadd_ps(xv, load8(a0 + i), s0);
    s1 = _mm256_fmadd_ps(xv, load8(a1 + i), s1);
    s2 = _mm256_fmadd_ps(xv, load8(a2 + i), s2);
    s3 = _mm256_fmadd_ps(xv, load8(a3 + i), s3);
  }
  out[0] = hsum(s0); out[1] = hsum(s1); out[2] = hsum(s2); out[3] = hsum(s3);
  for (; i < n; ++i) {
    out[0] += x[i] * to_f32(a0[i]); out[1] += x[i] * to_f32(a1[i]);
    out[2] += x[i] * to_f32(a2[i]); out[3] += x[i] * to_f32(a3[i]);
  }
}
template <typename T> float dot(const float* x, const T* a, int64_t n) {
  __m256 s0 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), load8(a + i), s0);
  float s = hsum(s0);
  for (; i < n; ++i) s += x[i] * to_f32(a[i]);
  return s;
}
template <typename T> void axpy4(float* y, const float* c, const T* b0, const T* b1, const T* b2, const T* b3,
                                 int64_t n) {
  const __m256 c0 = _mm256_set1_ps(c[0]), c1 = _mm256_set1_ps(c[1]), c2 = _mm256_set1_ps(c[2]),
               c3 = _mm256_set1_ps(c[3]);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 acc = _mm256_fmadd_ps(c0, load8(b0 + i), _mm256_loadu_ps(y + i));
    acc = _mm256_fmadd_ps(c1, load8(b1 + i), acc);
    acc = _mm256_fmadd_ps(c2, load8(b2 + i), acc);
    acc = _mm256_fmadd_ps(c3, load8(b3 + i), acc);
    _mm256_storeu_ps(y + i, acc);
  }
  for (; i < n; ++i) y[i] += c[0] * to_f32(b0[i]) + c[1] * to_f32(b1[i]) + c[2] * to_f32(b2[i]) + c[3] * to_f32(b3[i]);
}
template <typename T> void axpy(float* y, float c, const T* b, int64_t n) {
  const __m256 cv = _mm256_set1_ps(c);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(cv, load8(b + i), _mm256_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += c * to_f32(b[i]);
}
#else
template <typename T> float dot(const float* x, const T* a, int64_t n) {
  float s = 0.f;
  for (int64_t i = 0; i < n; ++i) s += x[i] * to_f32(a[i]);
  return s;
}
template <typename T> void dot4(const float* x, const T* a0, const T* a1, const T* a2, const T* a3, int64_t n,
                                float* out) {
  out[0] = dot(x, a0, n); out[1] = dot(x, a1, n); out[2] = dot(x, a2, n); out[3] = dot(x, a3, n);
}
template <typename T> void axpy(float* y, float c, const T* b, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += c * to_f32(b[i]);
}
template <typename T> void axpy4(float* y, const float* c, const T* b0, const T* b1, const T* b2, const T* b3,
                                 int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    y[i] += c[0] * to_f32(b0[i]) + c[1] * to_f32(b1[i]) + c[2] * to_f32(b2[i]) + c[3] * to_f32(b3[i]);
}
#endif

template <typename T>
void bgmv_impl(float* Y, const float* X, const T* P, const int64_t* T_, const int64_t* RW, const int64_t* PT,
               int64_t N, int64_t R, int64_t W, int64_t K, int64_t xs, int64_t ys, int64_t in_features) {
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> xa(R);
    for (int64_t n = begin; n < end; ++n) {
      const float* xt = X + T_[n] * xs;
      const int64_t* rn = RW + n * R;
      // page 0 is all zeros: padding rows read it and add nothing
      int64_t j = 0;
      for (; j + 4 <= R; j += 4)
        dot4(xt, P + rn[j] * W, P + rn[j + 1] * W, P + rn[j + 2] * W, P + rn[j + 3] * W, in_features, &xa[j]);
      for (; j < R; ++j) xa[j] = dot(xt, P + rn[j] * W, in_features);
      float* yt = Y + T_[n] * ys;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t r0 = PT[4 * k], r1 = PT[4 * k + 1], o0 = PT[4 * k + 2], o1 = PT[4 * k + 3];
        const T* B = P + in_features;
        int64_t i = r0;
        for (; i + 4 <= r1; i += 4)
          axpy4(yt + o0, &xa[i], B + rn[i] * W, B + rn[i + 1] * W, B + rn[i + 2] * W, B + rn[i + 3] * W, o1 - o0);
        for (; i < r1; ++i) axpy(yt + o0, xa[i], B + rn[i] * W, o1 - o0);
      }
    }
  });
}

void bgmv_add(at::Tensor y, at::Tensor x, at::Tensor pool, at::Tensor tok, at::Tensor rows,
              at::Tensor parts, int64_t in_features) {
  TORCH_CHECK(y.scalar_type() == at::kFloat && x.scalar_type() == at::kFloat,
              "bgmv_add: float32 activations expected");
  TORCH_CHECK(y.is_contiguous() && x.is_contiguous() && pool.is_contiguous() && rows.is_contiguous() &&
              tok.is_contiguous() && parts.is_contiguous(), "bgmv_add: contiguous tensors expected");
  const int64_t N = rows.size(0), R = rows.size(1), W = pool.size(1), K = parts.size(0);
  float* Y = y.data_ptr<float>();
  const float* X = x.data_ptr<float>();
  const int64_t* T_ = tok.data_ptr<int64_t>();
  const int64_t* RW = rows.data_ptr<int64_t>();
  const int64_t* PT = parts.data_ptr<int64_t>();
  switch (pool.scalar_type()) {
    case at::kFloat:
      bgmv_impl(Y, X, pool.data_ptr<float>(), T_, RW, PT, N, R, W, K, x.size(1), y.size(1), in_features); break;
    case at::kHalf:
      bgmv_impl(Y, X, pool.data_ptr<c10::Half>(), T_, RW, PT, N, R, W, K, x.size(1), y.size(1), in_features);
      break;
    case at::kBFloat16:
      bgmv_impl(Y, X, pool.data_ptr<c10::BFloat16>(), T_, RW, PT, N, R, W, K, x.size(1), y.size(1),
                in_features);
      break;
    default:
      TORCH_CHECK(false, "bgmv_add: pool must be float32, float16 or bfloat16");
  }
}

void paged_decode_attention(at::Tensor out, at::Tensor q, at::Tensor k_pool, at::Tensor v_pool,
                            at::Tensor slots, at::Tensor starts, at::Tensor lens, double scale) {
  TORCH_CHECK(q.scalar_type() == at::kFloat && k_pool.scalar_type() == at::kFloat &&
              v_pool.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat,
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
  // Each task is one row and a chunk of its kv heads; a row is split into chunks only when there are too few rows
  // to keep every thread busy. A task walks its slots once per pass (keys, then values), reading each slot's
  // heads of the chunk as one contiguous run: slot-major, so the reads stream through whole cache blocks instead of
  // one head's 256 bytes per slot, which leaves the memory bus waiting between short reads.
  const int64_t nt = at::get_num_threads();
  int64_t C = 1;
  while (C < KVH && D * C < 4 * nt) C *= 2;
  C = std::min(C, KVH);
  const int64_t per = (KVH + C - 1) / C;
  at::parallel_for(0, D * C, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> w;
    std::vector<float> acc;
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t d = idx / C, c = idx % C;
      const int64_t g0 = c * per, g1 = std::min(KVH, g0 + per);
      if (g0 >= g1) continue;
      const int64_t h0 = g0 * group, nh = (g1 - g0) * group;
      const int64_t* sd = S + d * L;
      const int64_t lo = ST[d], n = LN[d] - lo;
      float* od = O + (d * H + h0) * HD;
      if (n <= 0) { std::fill(od, od + nh * HD, 0.f); continue; }
      w.resize(nh * n);
      acc.assign(nh * HD, 0.f);
      const float* qd = Q + (d * H + h0) * HD;
      for (int64_t p = 0; p < n; ++p) {  // scores w[h, p] = q_h . k_p * scale
        const float* kp = K + (sd[lo + p] * KVH + g0) * HD;
        for (int64_t h = 0; h < nh; ++h) {
          const float* kh = kp + (h / group) * HD;
          const float* qh = qd + h * HD;
          float s = 0.f;
          #pragma omp simd reduction(+:s)
          for (int64_t i = 0; i < HD; ++i) s += qh[i] * kh[i];
          w[h * n + p] = s * sc;
        }
      }
      for (int64_t h = 0; h < nh; ++h) {  // softmax over each head's keys
        float* wh = w.data() + h * n;
        float m = -std::numeric_limits<float>::infinity();
        for (int64_t p = 0; p < n; ++p) m = std::max(m, wh[p]);
        float den = 0.f;
        for (int64_t p = 0; p < n; ++p) { wh[p] = std::exp(wh[p] - m); den += wh[p]; }
        const float inv = 1.f / den;
        for (int64_t p = 0; p < n; ++p) wh[p] *= inv;
      }
      for (int64_t p = 0; p < n; ++p) {  // acc[h] += w[h, p] * v_p
        const float* vp = V + (sd[lo + p] * KVH + g0) * HD;
        for (int64_t h = 0; h < nh; ++h) {
          const float* vh = vp + (h / group) * HD;
          float* ah = acc.data() + h * HD;
          const float wp = w[h * n + p];
          #pragma omp simd
          for (int64_t i = 0; i < HD; ++i) ah[i] += wp * vh[i];
        }
      }
      std::copy(acc.begin(), acc.end(), od);
    }
  });
}

// Counter-based dropout: element i of a draw with seed (lo, hi) is kept iff mix(i, seed) >= threshold, a pure
// function of (seed, i), so backward regenerates the mask instead of keeping it. Two rounds of MurmurHash3's
// 32-bit finaliser; plain loops the compiler vectorises.
static inline uint32_t fmix32(uint32_t h) {
  h ^= h >> 16; h *= 0x85ebca6bu; h ^= h >> 13; h *= 0xc2b2ae35u; h ^= h >> 16; return h;
}
static inline uint32_t keep_hash(uint32_t i_lo, uint32_t lo, uint32_t add) {
  return fmix32(fmix32(i_lo ^ lo) + add);
}

// dst[i] (+)= keep(i) ? x[i] : 0 over [begin, end), within one 2^32-element block (i's high word constant)
template <bool ACC>
static void dropout_block(float* dst, const float* x, int64_t begin, int64_t end, uint32_t thr, uint32_t lo,
                          uint32_t hi) {
  const uint32_t add = (static_cast<uint32_t>(static_cast<uint64_t>(begin) >> 32) ^ hi) * 0x9e3779b9u;
  const uint32_t j0 = static_cast<uint32_t>(begin);
  const uint32_t n = static_cast<uint32_t>(end - begin);
  float* d = dst + begin;
  const float* xs = x + begin;
  #pragma omp simd
  for (uint32_t k = 0; k < n; ++k) {
    const float v = keep_hash(j0 + k, lo, add) >= thr ? xs[k] : 0.f;
    if (ACC) d[k] += v; else d[k] = v;
  }
}

// out = x * keep, or acc += x * keep when acc is not empty (keep: 0 or 1; no 1/(1-p) scaling here)
void dropout_apply(at::Tensor out, at::Tensor x, at::Tensor acc, int64_t threshold, int64_t seed) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous(), "dropout_apply: contiguous float32 x");
  const bool accumulate = acc.numel() > 0;
  at::Tensor& dst = accumulate ? acc : out;
  TORCH_CHECK(dst.scalar_type() == at::kFloat && dst.is_contiguous() && dst.numel() == x.numel(),
              "dropout_apply: a contiguous float32 output of x's size expected");
  const float* X = x.data_ptr<float>();
  float* O = dst.data_ptr<float>();
  const uint32_t thr = static_cast<uint32_t>(threshold);
  const uint32_t lo = static_cast<uint32_t>(seed), hi = static_cast<uint32_t>(static_cast<uint64_t>(seed) >> 32);
  at::parallel_for(0, x.numel(), 1 << 16, [&](int64_t begin, int64_t end) {
    while (begin < end) {  // split at 2^32-element boundaries, where the index's high word changes
      const int64_t stop = std::min<int64_t>(end, (begin | int64_t{0xffffffff}) + 1);
      if (accumulate) dropout_block<true>(O, X, begin, stop, thr, lo, hi);
      else dropout_block<false>(O, X, begin, stop, thr, lo, hi);
      begin = stop;
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("bgmv_add", torch::wrap_pybind_function(bgmv_add), "bgmv_add");
  m.def("paged_decode_attention", torch::wrap_pybind_function(paged_decode_attention), "paged_decode_attention");
  m.def("dropout_apply", torch::wrap_pybind_function(dropout_apply), "dropout_apply");
}
