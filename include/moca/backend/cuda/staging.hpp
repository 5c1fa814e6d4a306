// The CUDA policy of StagingBlocks: pinned host memory from cudaHostAlloc and timing-free events
// recorded on the backend's stream.
#pragma once

#include <cuda_runtime_api.h>

#include <atomic>
#include <cstddef>
#include <cstdint>

#include "moca/backend/cuda/check.hpp"
#include "moca/backend/cuda/host_waits.hpp"
#include "moca/backend/cuda/staging_blocks.hpp"

namespace moca::cuda {

struct CudaStaging {
  using Event = cudaEvent_t;
  const std::atomic<cudaStream_t>* stream = nullptr;  // the context's stream, read at each record
  HostWaitCounter* host_waits = nullptr;              // the context's, counting wait()

  void* allocate(std::size_t bytes) {
    void* p = nullptr;
    MOCA_CUDA_CHECK(cudaHostAlloc(&p, bytes, cudaHostAllocDefault));
    return p;
  }
  // Errors are ignored, as in a destructor: the runtime may be shutting down.
  void release(void* p) noexcept {
    if (p != nullptr && cudaFreeHost(p) != cudaSuccess) (void)cudaGetLastError();
  }
  Event create_event() {
    cudaEvent_t e = nullptr;
    MOCA_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    return e;
  }
  void destroy_event(Event e) noexcept {
    if (e != nullptr && cudaEventDestroy(e) != cudaSuccess) (void)cudaGetLastError();
  }
  void record(Event e) {
    MOCA_CUDA_CHECK(cudaEventRecord(e, stream->load(std::memory_order_acquire)));
  }
  bool done(Event e) {
    const cudaError_t err = cudaEventQuery(e);
    if (err == cudaErrorNotReady) {
      (void)cudaGetLastError();
      return false;
    }
    MOCA_CUDA_CHECK(err);
    return true;
  }
  void wait(Event e) {
    host_waits->wait([&] { MOCA_CUDA_CHECK(cudaEventSynchronize(e)); });
  }
};

}  // namespace moca::cuda
