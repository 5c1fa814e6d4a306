// Layout kernels of the CPU backend: strided block copies and patch (un)folding.
#pragma once

#include <cstdint>
#include <cstring>

#include "moca/backend/cpu/parallel.hpp"

namespace moca::cpu {

/// For each matrix b < count and row r < rows: dst[b·dst_stride + r·dst_ld + c] (+)= src[b·src_stride
/// + r·src_ld + c] for c < cols. src_ld or src_stride 0 broadcast one row / one matrix. With
/// `accumulate` the destination is added to, otherwise overwritten. Destinations must not overlap.
template <class T>
void copy_strided(std::int64_t count, std::int64_t rows, std::int64_t cols, const T* src,
                  std::int64_t src_ld, std::int64_t src_stride, T* dst, std::int64_t dst_ld,
                  std::int64_t dst_stride, bool accumulate) {
  parallel_for(count * rows, count * rows * cols, [&](std::int64_t t0, std::int64_t t1) {
    for (std::int64_t t = t0; t < t1; ++t) {
      const std::int64_t b = t / rows, r = t % rows;
      const T* s = src + b * src_stride + r * src_ld;
      T* d = dst + b * dst_stride + r * dst_ld;
      if (accumulate) {
#pragma omp simd
        for (std::int64_t c = 0; c < cols; ++c) d[c] += s[c];
      } else {
        std::memcpy(d, s, static_cast<std::size_t>(cols) * sizeof(T));
      }
    }
  });
}

/// Images [N, C, H, W] → patches [N, (H/p)·(W/p), C·p·p], patch index row-major over the grid,
/// features in (channel, ky, kx) order: a PyTorch Conv2d weight [D, C, p, p] is then a [D, C·p·p]
/// matrix as it is.
template <class T>
void patchify(std::int64_t N, std::int64_t C, std::int64_t H, std::int64_t W, std::int64_t p,
              const T* images, T* patches) {
  const std::int64_t gh = H / p, gw = W / p, L = gh * gw, F = C * p * p;
  parallel_for(N * L, N * L * F, [&](std::int64_t t0, std::int64_t t1) {
    for (std::int64_t t = t0; t < t1; ++t) {
      const std::int64_t n = t / L, l = t % L, gy = l / gw, gx = l % gw;
      T* out = patches + t * F;
      for (std::int64_t c = 0; c < C; ++c)
        for (std::int64_t ky = 0; ky < p; ++ky)
          std::memcpy(out + (c * p + ky) * p,
                      images + ((n * C + c) * H + gy * p + ky) * W + gx * p,
                      static_cast<std::size_t>(p) * sizeof(T));
    }
  });
}

/// The inverse of patchify (patches do not overlap, so it is a permutation): patches → images.
template <class T>
void unpatchify(std::int64_t N, std::int64_t C, std::int64_t H, std::int64_t W, std::int64_t p,
                const T* patches, T* images) {
  const std::int64_t gh = H / p, gw = W / p, L = gh * gw, F = C * p * p;
  parallel_for(N * L, N * L * F, [&](std::int64_t t0, std::int64_t t1) {
    for (std::int64_t t = t0; t < t1; ++t) {
      const std::int64_t n = t / L, l = t % L, gy = l / gw, gx = l % gw;
      const T* in = patches + t * F;
      for (std::int64_t c = 0; c < C; ++c)
        for (std::int64_t ky = 0; ky < p; ++ky)
          std::memcpy(images + ((n * C + c) * H + gy * p + ky) * W + gx * p,
                      in + (c * p + ky) * p, static_cast<std::size_t>(p) * sizeof(T));
    }
  });
}

}  // namespace moca::cpu
