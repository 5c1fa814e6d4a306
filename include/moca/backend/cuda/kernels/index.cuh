// Gather and scatter-add of rows by int32 index. Contracts as in backend/cpu/index.hpp, with two
// differences that come from the indices living on the device:
//
// - Indices are not checked: reporting a bad one would need a device-to-host round trip on
//   every call. An out-of-range index is skipped instead of followed, so memory outside the
//   buffers is never touched: gather_rows writes a zero row, scatter_add_rows adds nothing. The
//   CPU backend throws for the same input, so the parity tests of a caller catch such a bug.
// - scatter_add_rows accumulates repeated indices atomically (atomic_add in common.cuh). The
//   additions into one row happen in no fixed order, so with repeated indices the last bits of
//   the result may change from run to run (the CPU backend adds in ascending i).
#pragma once

#include "moca/backend/cuda/kernels/common.cuh"

namespace moca::cuda {
namespace kernels {

template <class T>
struct GatherRowsOp {  // over the flat index of dst [M, C]
  std::int64_t C, rows;
  const T* src;
  const std::int32_t* idx;
  T* dst;
  __device__ void operator()(std::int64_t e) const {
    const std::int64_t i = e / C, c = e - i * C;
    const std::int64_t r = idx[i];
    dst[e] = (r >= 0 && r < rows) ? src[r * C + c] : T(0);
  }
};

template <class T>
struct ScatterAddRowsOp {  // over the flat index of src [M, C]
  std::int64_t C, rows;
  const T* src;
  const std::int32_t* idx;
  T* dst;
  __device__ void operator()(std::int64_t e) const {
    const std::int64_t i = e / C, c = e - i * C;
    const std::int64_t r = idx[i];
    if (r >= 0 && r < rows) atomic_add(dst + r * C + c, src[e]);
  }
};

}  // namespace kernels

template <class T>
void gather_rows(std::int64_t M, std::int64_t C, const T* src, std::int64_t rows,
                 const std::int32_t* idx, T* dst) {
  if (M <= 0 || C <= 0) return;
  kernels::launch_elementwise(M * C, kernels::GatherRowsOp<T>{C, rows, src, idx, dst});
}

template <class T>
void scatter_add_rows(std::int64_t M, std::int64_t C, const T* src, const std::int32_t* idx,
                      std::int64_t rows, T* dst) {
  if (M <= 0 || C <= 0) return;
  kernels::launch_elementwise(M * C, kernels::ScatterAddRowsOp<T>{C, rows, src, idx, dst});
}

}  // namespace moca::cuda
