// CUDA's names for kernels/flash_mma.cuh compiled on the host (MOCA_KERNELS_ON_HOST): a block's
// threads run as host threads, __syncthreads and __syncwarp are barriers, and the warp-wide
// instructions are emulated with the register layouts the PTX ISA gives them:
//
//   ldmatrix .x4   lane l gives the address of row l % 8 of matrix l / 8; register i of lane l
//                  holds row l / 4, columns 2(l % 4) and + 1 of matrix i (with .trans: rows
//                  2(l % 4) and + 1 of column l / 4);
//   mma m16n8k16   lane l = 4g + t holds a as (row g, k 2t…), (g + 8, 2t…), (g, 2t + 8…),
//                  (g + 8, 2t + 8…); b as (k 2t…, column g), (k 2t + 8…, g); c as (g, 2t),
//                  (g, 2t + 1), (g + 8, 2t), (g + 8, 2t + 1).
//
// A kernel launch runs the grid's blocks one after another, each as 128 threads over shared
// memory filled with 0xff bytes (bf16 and float NaN), so that a read of memory no copy wrote
// shows in the results. Copies complete at once (a schedule the device may also take).
// Include this, then define MOCA_KERNELS_ON_HOST and include the kernels.
#pragma once

#include <array>
#include <barrier>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <new>
#include <thread>
#include <vector>

#include "moca/core/bf16.hpp"

#define __global__
#define __device__
#define __launch_bounds__(...)

struct HostDim3 {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local HostDim3 threadIdx, blockIdx;

struct float2 {
  float x, y;
};

inline int min(int a, int b) { return a < b ? a : b; }

namespace host_warps {

inline constexpr int kThreads = 128;
inline constexpr int kWarps = kThreads / 32;

/// What a block's threads share: its shared memory, barriers, and each warp's exchange area for
/// its collective instructions.
struct Block {
  explicit Block(std::size_t shared_bytes)
      : shared(static_cast<unsigned char*>(::operator new(shared_bytes, std::align_val_t(128)))),
        bytes(shared_bytes) {
    std::memset(shared, 0xff, shared_bytes);
    for (auto& w : warp) w = std::make_unique<std::barrier<>>(32);
  }
  ~Block() { ::operator delete(shared, std::align_val_t(128)); }
  Block(const Block&) = delete;
  Block& operator=(const Block&) = delete;

  unsigned char* shared;
  std::size_t bytes;
  std::barrier<> all{kThreads};
  std::array<std::unique_ptr<std::barrier<>>, kWarps> warp;
  struct Exchange {
    const void* address[32];
    std::uint32_t words[32][6];
    float value[32];
  };
  std::array<Exchange, kWarps> exchange{};
};

struct Thread {
  Block* block = nullptr;
  int tid = 0;
};
inline thread_local Thread self;

inline int lane() { return self.tid % 32; }
inline Block::Exchange& exchange() { return self.block->exchange[self.tid / 32]; }
inline void warp_barrier() { self.block->warp[self.tid / 32]->arrive_and_wait(); }

inline float bf16_value(std::uint32_t word, int half) {
  return float(moca::bf16::from_bits(static_cast<std::uint16_t>(half ? word >> 16 : word)));
}

/// Runs kernel(args...) over grid blocks of 128 threads with `shared_bytes` of shared memory.
template <class Kernel, class... Args>
void launch(Kernel kernel, HostDim3 grid, std::size_t shared_bytes, Args... args) {
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        Block block(shared_bytes);
        std::vector<std::thread> threads;
        threads.reserve(kThreads);
        for (int t = 0; t < kThreads; ++t)
          threads.emplace_back([&, t] {
            self = {&block, t};
            threadIdx = {static_cast<unsigned>(t), 0, 0};
            blockIdx = {x, y, z};
            kernel(args...);
          });
        for (auto& th : threads) th.join();
      }
}

}  // namespace host_warps

inline void __syncthreads() { host_warps::self.block->all.arrive_and_wait(); }
inline void __syncwarp() { host_warps::warp_barrier(); }
inline float __shfl_xor_sync(unsigned, float v, int mask) {
  auto& ex = host_warps::exchange();
  ex.value[host_warps::lane()] = v;
  host_warps::warp_barrier();
  const float other = ex.value[host_warps::lane() ^ mask];
  host_warps::warp_barrier();
  return other;
}
inline unsigned char* host_shared_memory() { return host_warps::self.block->shared; }

namespace moca::cuda::kernels::flash_mma {

inline void copy16_async(void* dst, const void* src, bool valid) {
  if (valid)
    std::memcpy(dst, src, 16);
  else
    std::memset(dst, 0, 16);
}
inline void commit_copies() {}
template <int N>
inline void wait_copies() {}

inline std::uint32_t pack(float lo, float hi) {
  return static_cast<std::uint32_t>(bf16(lo).bits()) | static_cast<std::uint32_t>(bf16(hi).bits())
                                                           << 16;
}

inline float2 load_pair(const bf16* p) { return {float(p[0]), float(p[1])}; }

template <bool Trans>
void load_matrices(std::uint32_t r[4], const bf16* p) {
  auto& ex = host_warps::exchange();
  const int l = host_warps::lane(), g = l / 4, t = l % 4;
  ex.address[l] = p;
  host_warps::warp_barrier();
  for (int i = 0; i < 4; ++i) {
    std::uint16_t lo, hi;
    if (Trans) {
      lo = static_cast<const bf16*>(ex.address[i * 8 + 2 * t])[g].bits();
      hi = static_cast<const bf16*>(ex.address[i * 8 + 2 * t + 1])[g].bits();
    } else {
      const bf16* row = static_cast<const bf16*>(ex.address[i * 8 + g]);
      lo = row[2 * t].bits();
      hi = row[2 * t + 1].bits();
    }
    r[i] = static_cast<std::uint32_t>(lo) | static_cast<std::uint32_t>(hi) << 16;
  }
  host_warps::warp_barrier();
}

inline void mma(float c[4], const std::uint32_t a[4], std::uint32_t b0, std::uint32_t b1) {
  auto& ex = host_warps::exchange();
  const int l = host_warps::lane(), g = l / 4, t = l % 4;
  for (int i = 0; i < 4; ++i) ex.words[l][i] = a[i];
  ex.words[l][4] = b0;
  ex.words[l][5] = b1;
  host_warps::warp_barrier();
  auto A = [&](int row, int k) {
    return host_warps::bf16_value(ex.words[4 * (row % 8) + (k % 8) / 2][row / 8 + 2 * (k / 8)],
                                  k % 2);
  };
  auto B = [&](int k, int col) {
    return host_warps::bf16_value(ex.words[4 * col + (k % 8) / 2][4 + k / 8], k % 2);
  };
  for (int e = 0; e < 4; ++e) {
    const int row = g + 8 * (e / 2), col = 2 * t + e % 2;
    float sum = 0.0f;
    for (int k = 0; k < 16; ++k) sum += A(row, k) * B(k, col);
    c[e] += sum;
  }
  host_warps::warp_barrier();
}

}  // namespace moca::cuda::kernels::flash_mma
