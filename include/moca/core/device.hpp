// Device tags. A tensor, a layer and an op are templated on one of these; only backend/ knows
// what a device is. Memory<Device> (core/memory.hpp, backend/cuda/memory.hpp) allocates on it and
// Backend<Device> (backend/backend.hpp) runs the op set on it.
#pragma once

#include <concepts>

namespace moca {

/// The host, computing with Eigen and OpenMP.
struct Cpu {
  static constexpr const char* name = "cpu";
};

/// An NVIDIA GPU, computing with cuBLAS and the kernels of backend/cuda/. Usable once
/// <moca/cuda.hpp> is included and the program links moca::cuda.
struct Cuda {
  static constexpr const char* name = "cuda";
};

template <class D>
concept Device = std::same_as<D, Cpu> || std::same_as<D, Cuda>;

/// Allocation and copies on a device; specialised per device.
template <class D>
struct Memory;

/// The op set on a device; specialised per device in backend/.
template <class D>
struct Backend;

}  // namespace moca
