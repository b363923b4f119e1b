// MKL's packed sgemm (aspen.kernels.mkl_packed wraps it): a weight packed once (cblas_sgemm_pack) and multiplied
// by many inputs (cblas_sgemm_compute), through the CBLAS symbols libtorch_cpu exports when torch is built with MKL.

#include "aspen_extension.h"

// MKL's CBLAS packed GEMM (LP64 interface), exported by libtorch_cpu when torch is built with MKL
extern "C" {
size_t cblas_sgemm_pack_get_size(int identifier, int m, int n, int k);
void cblas_sgemm_pack(int layout, int identifier, int trans, int m, int n, int k, float alpha, const float* src,
                      int ld, float* dest);
void cblas_sgemm_compute(int layout, int transa, int transb, int m, int n, int k, const float* a, int lda,
                         const float* b, int ldb, float beta, float* c, int ldc);
}
enum { kRowMajor = 101, kNoTrans = 111, kTrans = 112, kPacked = 151, kBMatrix = 162 };

// B of C[M, N] = A[M, K] B, packed for any M: ``b`` is [N, K] with transposed (an nn.Linear weight: B = weight^T),
// else [K, N]
at::Tensor pack_matrix(at::Tensor b, bool transposed, int64_t rows_hint) {
  TORCH_CHECK(b.scalar_type() == at::kFloat && b.dim() == 2 && b.is_contiguous() && b.device().is_cpu(),
              "pack_matrix: a contiguous 2-D float32 CPU matrix expected");
  const int n = transposed ? b.size(0) : b.size(1), k = transposed ? b.size(1) : b.size(0);
  const size_t bytes = cblas_sgemm_pack_get_size(kBMatrix, rows_hint, n, k);
  auto packed = at::empty({static_cast<int64_t>((bytes + 3) / 4)}, b.options());
  cblas_sgemm_pack(kRowMajor, kBMatrix, transposed ? kTrans : kNoTrans, rows_hint, n, k, 1.0f, b.data_ptr<float>(),
                   b.size(1), packed.data_ptr<float>());
  return packed;
}

// out[M, N] = x[M, K] B with B packed by pack_matrix for this N and K (the caller keeps them paired)
void packed_mm(at::Tensor out, at::Tensor x, at::Tensor packed) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat && x.dim() == 2 &&
              out.dim() == 2 && x.is_contiguous() && out.is_contiguous() && out.size(0) == x.size(0),
              "packed_mm: contiguous 2-D float32 x [M, K] and out [M, N] expected");
  const int m = x.size(0), k = x.size(1), n = out.size(1);
  pybind11::gil_scoped_release no_gil;
  cblas_sgemm_compute(kRowMajor, kNoTrans, kPacked, m, n, k, x.data_ptr<float>(), k, packed.data_ptr<float>(), n,
                      0.0f, out.data_ptr<float>(), n);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pack_matrix", torch::wrap_pybind_function(pack_matrix), "pack_matrix");
  m.def("packed_mm", torch::wrap_pybind_function(packed_mm), "packed_mm");
}
