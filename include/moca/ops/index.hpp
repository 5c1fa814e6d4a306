// Gather and scatter-add of rows by index (dimension 0).
#pragma once

#include "moca/ops/common.hpp"

namespace moca::ops {

/// dst[i] = src[idx[i]] for each index i; src [R, ...], idx [M], dst [M, ...] (same row size).
template <class T, class D>
void gather_rows(const TensorView<T, D>& src, const TensorView<Index, D>& idx,
                 const TensorView<T, D>& dst) {
  MOCA_CHECK(src.rank() >= 1 && dst.rank() >= 1, "gather_rows: source ", src.shape(),
             " and destination ", dst.shape(), " need rows");
  const std::int64_t C = src.size(0) ? src.numel() / src.size(0) : 0;
  MOCA_CHECK(dst.size(0) == idx.numel() && dst.numel() == idx.numel() * C,
             "gather_rows: source ", src.shape(), " with ", idx.numel(),
             " indices cannot fill destination ", dst.shape());
  detail::count_traffic(idx, dst, dst);  // the rows read, as many as written
  Backend<D>::gather_rows(idx.numel(), C, src.data(), src.size(0), idx.data(), dst.data());
}

/// dst[idx[i]] += src[i] for each index i (repeated indices accumulate).
template <class T, class D>
void scatter_add_rows(const TensorView<T, D>& src, const TensorView<Index, D>& idx,
                      const TensorView<T, D>& dst) {
  MOCA_CHECK(src.rank() >= 1 && dst.rank() >= 1, "scatter_add_rows: source ", src.shape(),
             " and destination ", dst.shape(), " need rows");
  const std::int64_t C = dst.size(0) ? dst.numel() / dst.size(0) : 0;
  MOCA_CHECK(src.size(0) == idx.numel() && src.numel() == idx.numel() * C,
             "scatter_add_rows: source ", src.shape(), " with ", idx.numel(),
             " indices does not match destination ", dst.shape());
  detail::count_traffic(idx, src, src, src);  // src, and the rows it adds to read and written
  Backend<D>::scatter_add_rows(idx.numel(), C, src.data(), idx.data(), dst.size(0), dst.data());
}

}  // namespace moca::ops
