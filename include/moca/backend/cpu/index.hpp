// Gather and scatter of rows by index (token selection for masking, codebook reads).
#pragma once

#include <cstdint>
#include <cstring>

#include "moca/backend/cpu/parallel.hpp"
#include "moca/core/check.hpp"

namespace moca::cpu {

/// dst[i, :] = src[idx[i], :] for i < M; src is [rows, C]. Indices are checked.
template <class T, class I>
void gather_rows(std::int64_t M, std::int64_t C, const T* src, std::int64_t rows, const I* idx,
                 T* dst) {
  for (std::int64_t i = 0; i < M; ++i)
    MOCA_CHECK(idx[i] >= 0 && idx[i] < rows, "gather_rows: index ", idx[i], " at position ", i,
               " is out of range for ", rows, " rows");
  parallel_for(M, M * C, [&](std::int64_t r0, std::int64_t r1) {
    for (std::int64_t i = r0; i < r1; ++i)
      std::memcpy(dst + i * C, src + static_cast<std::int64_t>(idx[i]) * C, C * sizeof(T));
  });
}

/// dst[idx[i], :] += src[i, :] for i < M; dst is [rows, C]. Repeated indices accumulate, in
/// ascending i (deterministic: threads split the columns, not the indices).
template <class T, class I>
void scatter_add_rows(std::int64_t M, std::int64_t C, const T* src, const I* idx,
                      std::int64_t rows, T* dst) {
  for (std::int64_t i = 0; i < M; ++i)
    MOCA_CHECK(idx[i] >= 0 && idx[i] < rows, "scatter_add_rows: index ", idx[i], " at position ",
               i, " is out of range for ", rows, " rows");
  parallel_for(C, M * C, [&](std::int64_t c0, std::int64_t c1) {
    for (std::int64_t i = 0; i < M; ++i) {
      const T* s = src + i * C;
      T* d = dst + static_cast<std::int64_t>(idx[i]) * C;
#pragma omp simd
      for (std::int64_t c = c0; c < c1; ++c) d[c] += s[c];
    }
  });
}

}  // namespace moca::cpu
