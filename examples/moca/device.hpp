// `--device cpu|cuda` of the commands that run a model (pretrain, knn, extract).
#pragma once

#include <moca/core/check.hpp>
#include <string>
#if MOCA_WITH_CUDA
#include <moca/cuda.hpp>
#endif

namespace moca::cli {

/// Checks a --device value: "cpu", or "cuda" in a build with the CUDA backend and a usable GPU.
/// Throws moca::Error saying which is missing.
inline void require_device(const std::string& device) {
  MOCA_CHECK(device == "cpu" || device == "cuda", "--device must be cpu or cuda, got '", device,
             "'");
  if (device == "cpu") return;
#if MOCA_WITH_CUDA
  MOCA_CHECK(cuda::available(),
             "--device cuda: no CUDA device is available (no GPU, or no "
             "usable driver)");
#else
  MOCA_CHECK(false,
             "--device cuda: this moca was built without the CUDA backend (configure "
             "with nvcc on the PATH, or -DMOCA_WITH_CUDA=ON)");
#endif
}

}  // namespace moca::cli
