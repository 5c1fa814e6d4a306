// Layout kernels: strided block copies and patch (un)folding. Contracts as in
// backend/cpu/layout.hpp. One thread per element written, so writes never collide (the
// destinations of copy_strided do not overlap, and patchify is a permutation).
#pragma once

#include "moca/backend/cuda/kernels/common.cuh"

namespace moca::cuda {
namespace kernels {

template <class T>
struct CopyStridedOp {  // over the flat index of count × [rows, cols]
  std::int64_t rows, cols, src_ld, src_stride, dst_ld, dst_stride;
  const T* src;
  T* dst;
  bool accumulate;
  __device__ void operator()(std::int64_t e) const {
    const std::int64_t t = e / cols, c = e - t * cols;
    const std::int64_t b = t / rows, r = t - b * rows;
    const T v = src[b * src_stride + r * src_ld + c];  // ld or stride 0 broadcasts
    T& d = dst[b * dst_stride + r * dst_ld + c];
    d = accumulate ? static_cast<T>(d + v) : v;
  }
};

/// Maps element e of patches [N, L, C·p·p] to its element of images [N, C, H, W].
struct PatchLayout {
  std::int64_t C, H, W, p, grid_w, L, F;
  __device__ std::int64_t image_index(std::int64_t e) const {
    const std::int64_t t = e / F, f = e - t * F;
    const std::int64_t n = t / L, l = t - n * L, gy = l / grid_w, gx = l - gy * grid_w;
    const std::int64_t c = f / (p * p), k = f - c * p * p, ky = k / p, kx = k - ky * p;
    return ((n * C + c) * H + gy * p + ky) * W + gx * p + kx;
  }
};

template <class T>
struct PatchifyOp {  // over the flat index of patches
  PatchLayout layout;
  const T* images;
  T* patches;
  __device__ void operator()(std::int64_t e) const { patches[e] = images[layout.image_index(e)]; }
};

template <class T>
struct UnpatchifyOp {  // over the flat index of patches
  PatchLayout layout;
  const T* patches;
  T* images;
  __device__ void operator()(std::int64_t e) const { images[layout.image_index(e)] = patches[e]; }
};

inline PatchLayout patch_layout(std::int64_t C, std::int64_t H, std::int64_t W, std::int64_t p) {
  const std::int64_t grid_w = W / p, L = (H / p) * grid_w;
  return {C, H, W, p, grid_w, L, C * p * p};
}

}  // namespace kernels

template <class T>
void copy_strided(std::int64_t count, std::int64_t rows, std::int64_t cols, const T* src,
                  std::int64_t src_ld, std::int64_t src_stride, T* dst, std::int64_t dst_ld,
                  std::int64_t dst_stride, bool accumulate) {
  if (count <= 0 || rows <= 0 || cols <= 0) return;
  kernels::launch_elementwise(count * rows * cols,
                              kernels::CopyStridedOp<T>{rows, cols, src_ld, src_stride, dst_ld,
                                                        dst_stride, src, dst, accumulate});
}

template <class T>
void patchify(std::int64_t N, std::int64_t C, std::int64_t H, std::int64_t W, std::int64_t p,
              const T* images, T* patches) {
  if (p <= 0) return;
  kernels::launch_elementwise(N * C * H * W,
                              kernels::PatchifyOp<T>{kernels::patch_layout(C, H, W, p), images,
                                                     patches});
}

template <class T>
void unpatchify(std::int64_t N, std::int64_t C, std::int64_t H, std::int64_t W, std::int64_t p,
                const T* patches, T* images) {
  if (p <= 0) return;
  kernels::launch_elementwise(N * C * H * W,
                              kernels::UnpatchifyOp<T>{kernels::patch_layout(C, H, W, p), patches,
                                                       images});
}

}  // namespace moca::cuda
