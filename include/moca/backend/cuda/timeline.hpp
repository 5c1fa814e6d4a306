// The CUDA stream as a profiler timeline (profiler::Timeline): a mark is an event recorded on
// the context's stream, and the time between two marks is the device's, read once the device has
// passed them. Profiling a step this way leaves it running as it does unprofiled.
//
//   cuda::EventTimeline timeline;
//   profiler::set_timeline(&timeline);
//   profiler::enable();
//   ... steps ...
//   profiler::enable(false);
//   const auto entries = profiler::report();   // waits for the device once
//   profiler::set_timeline(nullptr);
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <vector>

#include "moca/backend/cuda/check.hpp"
#include "moca/backend/cuda/context.hpp"
#include "moca/core/profiler.hpp"

namespace moca::cuda {

class EventTimeline final : public profiler::Timeline {
 public:
  EventTimeline() = default;
  EventTimeline(const EventTimeline&) = delete;
  EventTimeline& operator=(const EventTimeline&) = delete;
  ~EventTimeline() override {
    for (cudaEvent_t e : events_) (void)cudaEventDestroy(e);
  }

  /// Records the next event on the stream; events are created as the marks first need them and
  /// reused after clear().
  int mark() override {
    if (used_ == events_.size()) {
      cudaEvent_t e = nullptr;
      MOCA_CUDA_CHECK(cudaEventCreate(&e));
      events_.push_back(e);
    }
    MOCA_CUDA_CHECK(cudaEventRecord(events_[used_], stream()));
    return static_cast<int>(used_++);
  }

  double seconds_between(int first, int second) override {
    Context::get().host_wait(
        [&] { MOCA_CUDA_CHECK(cudaEventSynchronize(events_[static_cast<std::size_t>(second)])); });
    float ms = 0.0f;
    MOCA_CUDA_CHECK(cudaEventElapsedTime(&ms, events_[static_cast<std::size_t>(first)],
                                         events_[static_cast<std::size_t>(second)]));
    return 1e-3 * static_cast<double>(ms);
  }

  void clear() override { used_ = 0; }

 private:
  std::vector<cudaEvent_t> events_;
  std::size_t used_ = 0;
};

}  // namespace moca::cuda
