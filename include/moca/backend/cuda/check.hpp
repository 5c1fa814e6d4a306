// Checked CUDA runtime and cuBLAS calls.
//
//   MOCA_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, stream));
//   MOCA_CUBLAS_CHECK(cublasSgemm(handle, ...));
//
// A failing call throws moca::Error naming the call, the source location and the library's own
// error name and text. The checks are compiled in every build type: a CUDA error left unchecked
// surfaces later, far from its cause, or not at all.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include "moca/core/check.hpp"

namespace moca::cuda::detail {

[[noreturn]] inline void throw_cuda_error(const char* file, int line, const char* call,
                                          cudaError_t err) {
  // The runtime remembers the last error per thread; reset it so that a later launch check does
  // not report this failure a second time.
  (void)cudaGetLastError();
  ::moca::detail::throw_check_failure(file, line, call, "CUDA call ", call, " failed: ",
                                      cudaGetErrorName(err), " (", cudaGetErrorString(err), ")");
}

[[noreturn]] inline void throw_cublas_error(const char* file, int line, const char* call,
                                            cublasStatus_t status) {
  ::moca::detail::throw_check_failure(file, line, call, "cuBLAS call ", call, " failed: ",
                                      cublasGetStatusName(status), " (",
                                      cublasGetStatusString(status), ")");
}

}  // namespace moca::cuda::detail

#define MOCA_CUDA_CHECK(call)                                                               \
  do {                                                                                      \
    const cudaError_t moca_cuda_err_ = (call);                                              \
    if (moca_cuda_err_ != cudaSuccess) [[unlikely]]                                         \
      ::moca::cuda::detail::throw_cuda_error(__FILE__, __LINE__, #call, moca_cuda_err_);    \
  } while (0)

#define MOCA_CUBLAS_CHECK(call)                                                             \
  do {                                                                                      \
    const cublasStatus_t moca_cublas_status_ = (call);                                      \
    if (moca_cublas_status_ != CUBLAS_STATUS_SUCCESS) [[unlikely]]                          \
      ::moca::cuda::detail::throw_cublas_error(__FILE__, __LINE__, #call,                   \
                                               moca_cublas_status_);                        \
  } while (0)
