// Layout ops: strided block copies (assembling token sequences, splitting heads) and patch
// (un)folding for the patch embedding.
#pragma once

#include "moca/ops/common.hpp"
#include "moca/ops/gemm.hpp"

namespace moca::ops {

/// Copies (or, with `accumulate`, adds) a strided batch of matrices onto another of the same
/// extent. The source may broadcast (ld 0: one row repeated; stride 0: one matrix repeated).
///
///   // seq [N, 1+K, D] ← cls [D] in row 0 of every sample, tokens [N, K, D] after it
///   copy_strided(strided_batch(cls, 0, 1, D, 0, 0, N), strided_batch(seq, 0, 1, D, D, (1+K)*D, N));
///   copy_strided(strided_batch(tok, 0, K, D, D, K*D, N), strided_batch(seq, D, K, D, D, (1+K)*D, N));
template <class T, class D>
void copy_strided(const StridedBatch<T, D>& src, const StridedBatch<T, D>& dst,
                  bool accumulate = false) {
  MOCA_CHECK(src.rows == dst.rows && src.cols == dst.cols && src.count == dst.count,
             "copy_strided: source ", src.count, "×[", src.rows, ", ", src.cols,
             "] and destination ", dst.count, "×[", dst.rows, ", ", dst.cols, "] differ");
  MOCA_CHECK(dst.ld >= dst.cols && (dst.stride >= dst.rows * dst.ld || dst.count <= 1),
             "copy_strided: destination rows or matrices overlap (ld ", dst.ld, ", stride ",
             dst.stride, ")");
  profiler::count_bytes(2.0 * sizeof(T) * double(src.count * src.rows * src.cols));
  Backend<D>::copy_strided(src.count, src.rows, src.cols, src.data, src.ld, src.stride, dst.data,
                           dst.ld, dst.stride, accumulate);
}

/// images [N, C, H, W] → patches [N, (H/p)(W/p), C·p·p] in (channel, ky, kx) feature order.
template <class T, class D>
void patchify(const TensorView<T, D>& images, std::int64_t patch, const TensorView<T, D>& patches) {
  MOCA_CHECK(images.rank() == 4, "patchify: expected images [N, C, H, W], got ", images.shape());
  const std::int64_t N = images.size(0), C = images.size(1), H = images.size(2),
                     W = images.size(3);
  MOCA_CHECK(patch > 0 && H % patch == 0 && W % patch == 0, "patchify: image size ", H, "×", W,
             " is not a multiple of the patch size ", patch);
  MOCA_CHECK(patches.numel() == images.numel() && patches.shape().last() == C * patch * patch,
             "patchify: patches ", patches.shape(), " do not match images ", images.shape(),
             " with patch ", patch);
  detail::count_traffic(images, patches);
  Backend<D>::patchify(N, C, H, W, patch, images.data(), patches.data());
}

/// The inverse permutation of patchify.
template <class T, class D>
void unpatchify(const TensorView<T, D>& patches, std::int64_t patch,
                const TensorView<T, D>& images) {
  MOCA_CHECK(images.rank() == 4, "unpatchify: expected images [N, C, H, W], got ",
             images.shape());
  const std::int64_t N = images.size(0), C = images.size(1), H = images.size(2),
                     W = images.size(3);
  MOCA_CHECK(patch > 0 && H % patch == 0 && W % patch == 0, "unpatchify: image size ", H, "×", W,
             " is not a multiple of the patch size ", patch);
  MOCA_CHECK(patches.numel() == images.numel() && patches.shape().last() == C * patch * patch,
             "unpatchify: patches ", patches.shape(), " do not match images ", images.shape(),
             " with patch ", patch);
  detail::count_traffic(patches, images);
  Backend<D>::unpatchify(N, C, H, W, patch, patches.data(), images.data());
}

}  // namespace moca::ops
