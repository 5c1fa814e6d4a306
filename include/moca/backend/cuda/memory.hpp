// Device memory: Memory<Cuda>, the allocator and copier behind Tensor<T, Cuda>.
//
//   Tensor<float, Cuda> x({128, 192});          // cudaMalloc + zero fill, counted in memory_stats<Cuda>()
//   Tensor<float, Cuda> g = host.to<Cuda>();    // host -> device
//   Tensor<float> back = g.to<Cpu>();           // device -> host; the data is ready on return
//
// Every allocation is a plain cudaMalloc (256-byte aligned). Tensors and arenas are sized once
// and reused, so a training step allocates nothing in steady state and a caching allocator would
// buy little yet; it can replace allocate/deallocate without changing the interface.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "moca/backend/cuda/check.hpp"
#include "moca/backend/cuda/context.hpp"
#include "moca/core/device.hpp"
#include "moca/core/memory.hpp"

namespace moca {

template <>
struct Memory<Cuda> {
  static void* allocate(std::size_t bytes) {
    if (bytes == 0) return nullptr;
    cuda::Context::get();  // a clear error when there is no device, before cudaMalloc's own
    void* p = nullptr;
    const cudaError_t err = cudaMalloc(&p, bytes);
    if (err != cudaSuccess) {
      (void)cudaGetLastError();
      detail::throw_check_failure(__FILE__, __LINE__, "cudaMalloc", "out of GPU memory allocating ",
                                  bytes, " bytes (", memory_stats<Cuda>().bytes_in_use,
                                  " bytes in use by moca): ", cudaGetErrorName(err), " (",
                                  cudaGetErrorString(err), ")");
    }
    detail::memory_counters<Cuda>().on_allocate(static_cast<std::int64_t>(bytes));
    return p;
  }

  /// Frees p. Errors are ignored: a destructor cannot report them, and at exit the runtime may
  /// already be shutting down (cudaErrorCudartUnloading).
  static void deallocate(void* p, std::size_t bytes) noexcept {
    if (p == nullptr) return;
    if (cudaFree(p) != cudaSuccess) (void)cudaGetLastError();
    detail::memory_counters<Cuda>().on_free(static_cast<std::int64_t>(bytes));
  }

  /// Zero-fills p, queued on the backend's stream (ordered before any later op).
  static void zero(void* p, std::size_t bytes) {
    if (bytes == 0) return;
    MOCA_CUDA_CHECK(cudaMemsetAsync(p, 0, bytes, cuda::stream()));
  }

  /// Copies in any direction (host or device on either side; unified addressing tells which),
  /// ordered after the work queued on the backend's stream. Returns once the copy has finished,
  /// so host memory on either side may be used or freed right away.
  static void copy(void* dst, const void* src, std::size_t bytes) {
    if (bytes == 0) return;
    const cudaStream_t s = cuda::stream();
    MOCA_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, s));
    MOCA_CUDA_CHECK(cudaStreamSynchronize(s));
  }
};

}  // namespace moca
