// 16-byte chunks: the widest load and store a CUDA thread issues in one instruction (8 bf16, 4
// floats, 2 doubles). Kernels that stream rows move whole chunks where the rows allow it
// (`chunked`), and element by element otherwise. Usable on the host too (the serial runs of
// the flash attention's block programs), where a chunk is copied with memcpy.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define MOCA_CHUNK_FN __host__ __device__ inline
#else
#define MOCA_CHUNK_FN inline
#endif

namespace moca::cuda {

/// Elements of X in one 16-byte chunk.
template <class X>
inline constexpr int kChunk = static_cast<int>(16 / sizeof(X));

/// 16 bytes of X, moved as one access on the device.
template <class X>
struct alignas(16) Chunk {
  X v[kChunk<X>];
};

/// The chunk at p (16-byte aligned).
template <class X>
MOCA_CHUNK_FN Chunk<X> load_chunk(const X* p) {
#if defined(__CUDA_ARCH__)
  return *reinterpret_cast<const Chunk<X>*>(p);
#else
  Chunk<X> c;
  std::memcpy(static_cast<void*>(&c), p, sizeof c);
  return c;
#endif
}

/// Stores c at p (16-byte aligned).
template <class X>
MOCA_CHUNK_FN void store_chunk(X* p, const Chunk<X>& c) {
#if defined(__CUDA_ARCH__)
  *reinterpret_cast<Chunk<X>*>(p) = c;
#else
  std::memcpy(static_cast<void*>(p), &c, sizeof c);
#endif
}

/// Whether p is 16-byte aligned (nullptr is: an absent operand does not stop a chunked path).
MOCA_CHUNK_FN bool aligned16(const void* p) {
  return reinterpret_cast<std::uintptr_t>(p) % 16 == 0;
}

/// Whether rows of `width` X at stride ld from p split into whole, aligned 16-byte chunks.
template <class X>
MOCA_CHUNK_FN bool chunked(const X* p, std::int64_t ld, std::int64_t width) {
  return aligned16(p) && ld % kChunk<X> == 0 && width % kChunk<X> == 0;
}

}  // namespace moca::cuda
