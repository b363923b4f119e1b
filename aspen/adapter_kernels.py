"""C++ helpers for loading an adapter: the NaN/Inf check of its tensors and the write into the LoRA pool.

Loading a rank-16 all-module adapter of the 125M model moves 168 tensors (11.2 MB). Done with torch ops, that is
one call per tensor for the check and two per layer and projection for the pool write, ~500 calls in all; each
takes and drops the GIL. In the server, where a load runs beside the engine's step, every reacquisition may wait
on the engine thread, and a load that took ~10 ms alone took 25-40 ms there. These two functions do the same work
in one call each, with the GIL released, on float32 CPU tensors (the pool's usual dtype on the CPU); anything else
keeps the torch paths, which give the same result. ``ASPEN_CPU_KERNELS=0`` turns them off like the other kernels.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from aspen.extension import LazyExtension

_SOURCE = r"""
#include <torch/extension.h>
#include <pybind11/pybind11.h>
#include <algorithm>
#include <cstdint>
#include <cstring>

static void check_float_cpu(const torch::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat && t.is_contiguous(), what,
              ": contiguous float32 CPU tensors expected, got ", t.scalar_type(), " on ", t.device());
}

// true when no element is NaN or +-Inf (an exponent field of all ones)
bool all_finite(const std::vector<torch::Tensor>& tensors) {
  for (const auto& t : tensors) check_float_cpu(t, "all_finite");
  pybind11::gil_scoped_release no_gil;
  for (const auto& t : tensors) {
    const uint32_t* p = reinterpret_cast<const uint32_t*>(t.data_ptr<float>());
    const int64_t n = t.numel();
    uint32_t bad = 0;
    for (int64_t i = 0; i < n; ++i) bad |= (p[i] & 0x7f800000u) == 0x7f800000u;
    if (bad) return false;
  }
  return true;
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
  for (size_t e = 0; e < n_entries; ++e) {
    const int64_t rank = As[e].size(0), in = As[e].size(1), out = Bs[e].size(0), n = rows[e].numel();
    const int64_t* r = rows[e].data_ptr<int64_t>();
    const float* a = As[e].data_ptr<float>();
    const float* b = Bs[e].data_ptr<float>();
    const float s = static_cast<float>(scales[e]);
    float* layer = base + layers[e] * P * W;
    for (int64_t i = 0; i < rank; ++i) std::memcpy(layer + r[i] * W, a + i * in, in * sizeof(float));
    for (int64_t i = rank; i < n; ++i) std::memset(layer + r[i] * W, 0, (in + out) * sizeof(float));
    // B's column i goes to row i: walk B in tiles of 16 of its rows so each pool row gets 64 contiguous bytes
    constexpr int64_t kTile = 16;
    for (int64_t j0 = 0; j0 < out; j0 += kTile) {
      const int64_t j1 = std::min(out, j0 + kTile);
      for (int64_t i = 0; i < rank; ++i) {
        float* dst = layer + r[i] * W + in;
        for (int64_t j = j0; j < j1; ++j) dst[j] = s * b[j * rank + i];
      }
    }
  }
}
"""

_EXTENSION = LazyExtension("aspen_adapter_kernels_v2", _SOURCE, ["all_finite", "write_lora_rows"],
                           "adapter-loading kernels", cflags=("-O3", "-march=native"))


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
