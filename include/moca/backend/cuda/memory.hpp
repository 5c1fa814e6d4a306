// Device memory: Memory<Cuda>, the allocator and copier behind Tensor<T, Cuda>.
//
//   Tensor<float, Cuda> x({128, 192});          // from the pool + zero fill, counted in memory_stats<Cuda>()
//   Tensor<float, Cuda> g = host.to<Cuda>();    // host -> device
//   Tensor<float> back = g.to<Cpu>();           // device -> host; the data is ready on return
//   cuda::release_cached_memory();              // hand the pool's unused memory back to the driver
//
// A stream-ordered caching allocator: tensors come from the context's memory pool
// (cudaMallocFromPoolAsync) and go back to it (cudaFreeAsync), both queued on the backend's
// stream. Freed memory stays in the pool (release threshold: unlimited) and the next allocation
// of the same stream reuses it at once: the stream runs the earlier users of the block before the
// new one, so there is no device-wide synchronisation as with cudaFree, and no driver mapping
// call in steady state. This is the CUDA runtime's own stream-ordered allocator (CUDA 11.2+)
// rather than a hand-written free list; its reuse across streams follows event dependencies.
// Where pools are unsupported the allocator falls back to cudaMalloc/cudaFree.
//
// The stream rule: memory is valid on the backend's stream from its allocation to its free. Code
// that uses a tensor's memory on a stream of its own must order that stream after the backend's
// (the default, the legacy stream 0, orders itself with every blocking stream).
//
// memory_stats<Cuda>() counts the bytes tensors asked for; pool_stats() says what the pool holds
// from the driver (reserved) beyond that.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "moca/backend/cuda/check.hpp"
#include "moca/backend/cuda/context.hpp"
#include "moca/core/device.hpp"
#include "moca/core/memory.hpp"

namespace moca {

namespace cuda {

/// What the memory pool holds, in bytes: `reserved` is mapped from the driver (in use by tensors
/// or cached for reuse), `used` is handed out to tensors (rounded up to the pool's granularity);
/// each with its high-water mark. All zero where the device has no memory pools.
struct PoolStats {
  std::uint64_t reserved = 0, reserved_peak = 0, used = 0, used_peak = 0;
};

inline PoolStats pool_stats() {
  PoolStats s;
  const cudaMemPool_t pool = Context::get().memory_pool();
  if (pool == nullptr) return s;
  MOCA_CUDA_CHECK(cudaMemPoolGetAttribute(pool, cudaMemPoolAttrReservedMemCurrent, &s.reserved));
  MOCA_CUDA_CHECK(cudaMemPoolGetAttribute(pool, cudaMemPoolAttrReservedMemHigh, &s.reserved_peak));
  MOCA_CUDA_CHECK(cudaMemPoolGetAttribute(pool, cudaMemPoolAttrUsedMemCurrent, &s.used));
  MOCA_CUDA_CHECK(cudaMemPoolGetAttribute(pool, cudaMemPoolAttrUsedMemHigh, &s.used_peak));
  return s;
}

/// Resets the pool's high-water marks to the current values (e.g. before measuring one step).
inline void reset_pool_peaks() {
  const cudaMemPool_t pool = Context::get().memory_pool();
  if (pool == nullptr) return;
  std::uint64_t zero = 0;  // the only value these attributes accept: it resets to the current
  MOCA_CUDA_CHECK(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReservedMemHigh, &zero));
  MOCA_CUDA_CHECK(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrUsedMemHigh, &zero));
}

/// Waits for the stream, then returns the pool's cached (unused) memory to the driver, e.g. for
/// another library or process. Tensors still alive keep theirs.
inline void release_cached_memory() { Context::get().trim_memory_pool(); }

namespace detail {
inline cudaError_t pool_allocate(Context& ctx, void** p, std::size_t bytes) {
  if (ctx.memory_pool() == nullptr) return cudaMalloc(p, bytes);
  return cudaMallocFromPoolAsync(p, bytes, ctx.memory_pool(), ctx.stream());
}
}  // namespace detail

}  // namespace cuda

template <>
struct Memory<Cuda> {
  /// Alignment of every allocation (cudaMalloc's; checked for the pool's): enough for any vector
  /// load and for cuBLAS's fastest kernels.
  static constexpr std::size_t kAlignment = 256;

  static void* allocate(std::size_t bytes) {
    if (bytes == 0) return nullptr;
    cuda::Context& ctx = cuda::Context::get();  // a clear error when there is no device
    void* p = nullptr;
    // Whole 32-bit words: the bf16 atomic addition swaps the aligned word holding its element,
    // which for the last element of an odd-length buffer reaches past the bytes asked for.
    const std::size_t words = (bytes + 3) & ~std::size_t{3};
    cudaError_t err = cuda::detail::pool_allocate(ctx, &p, words);
    if (err == cudaErrorMemoryAllocation && ctx.memory_pool() != nullptr) {
      // Blocks freed on another stream may not be reusable on this one yet, and the cache may
      // hold memory another allocation (cuBLAS's, a workspace) needs: wait, trim, and try again.
      (void)cudaGetLastError();
      cuda::release_cached_memory();
      err = cuda::detail::pool_allocate(ctx, &p, words);
    }
    if (err != cudaSuccess) {
      (void)cudaGetLastError();
      detail::throw_check_failure(__FILE__, __LINE__, "cudaMallocFromPoolAsync",
                                  "out of GPU memory allocating ", bytes, " bytes (",
                                  memory_stats<Cuda>().bytes_in_use, " bytes in use by moca): ",
                                  cudaGetErrorName(err), " (", cudaGetErrorString(err), ")");
    }
    if (reinterpret_cast<std::uintptr_t>(p) % kAlignment != 0) {
      (void)cudaFreeAsync(p, ctx.stream());
      MOCA_CHECK(false, "CUDA allocator: the memory pool returned an address not aligned to ",
                 kAlignment, " bytes");
    }
    detail::memory_counters<Cuda>().on_allocate(static_cast<std::int64_t>(bytes));
    return p;
  }

  /// Returns p to the pool, ordered after the work already queued on the backend's stream (so a
  /// tensor may be destroyed while kernels that read it are still pending). Errors are ignored:
  /// a destructor cannot report them, and at exit the runtime may already be shutting down
  /// (cudaErrorCudartUnloading).
  static void deallocate(void* p, std::size_t bytes) noexcept {
    if (p == nullptr) return;
    const cuda::Context& ctx = cuda::Context::get();
    const cudaError_t err =
        ctx.memory_pool() != nullptr ? cudaFreeAsync(p, ctx.stream()) : cudaFree(p);
    if (err != cudaSuccess) (void)cudaGetLastError();
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
    cuda::Context& ctx = cuda::Context::get();
    MOCA_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, ctx.stream()));
    ctx.wait_for_stream();
  }

  /// Copies host memory to the device, queued on the backend's stream like a kernel and not
  /// waited for: the bytes are staged in pinned memory (Context::upload), so `src` may be used or
  /// freed right away, and the device's queue is not emptied.
  static void upload(void* dst, const void* src, std::size_t bytes) {
    cuda::Context::get().upload(dst, src, bytes);
  }

  /// Copies between two device buffers, queued on the backend's stream like a kernel: ordered
  /// after the work before it and before the work after it, without waiting for it (a wait
  /// would empty the device's queue at every copy of a step).
  static void copy_within(void* dst, const void* src, std::size_t bytes) {
    if (bytes == 0) return;
    MOCA_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, cuda::stream()));
  }
};

}  // namespace moca
