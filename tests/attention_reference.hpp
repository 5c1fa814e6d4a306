// The log-sum-exp of each attention score row, in double: what a flash-style forward keeps for
// its backward ([B, H, S]), from a [B, S, 3·dim] qkv buffer laid out as ops/attention.hpp says.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace moca::attention_reference {

template <class T>
std::vector<double> log_sum_exp_rows(const T* qkv, std::int64_t B, std::int64_t H, std::int64_t S,
                                     std::int64_t hd, double scale) {
  const std::int64_t dim = H * hd, ld = 3 * dim;
  std::vector<double> out(static_cast<std::size_t>(B * H * S)), s(static_cast<std::size_t>(S));
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t h = 0; h < H; ++h)
      for (std::int64_t i = 0; i < S; ++i) {
        const T* q = qkv + (b * S + i) * ld + h * hd;
        double m = -INFINITY;
        for (std::int64_t j = 0; j < S; ++j) {
          const T* k = qkv + (b * S + j) * ld + dim + h * hd;
          double dot = 0;
          for (std::int64_t c = 0; c < hd; ++c) dot += double(q[c]) * double(k[c]);
          s[j] = scale * dot;
          m = std::max(m, s[j]);
        }
        double sum = 0;
        for (std::int64_t j = 0; j < S; ++j) sum += std::exp(s[j] - m);
        out[(b * H + h) * S + i] = m + std::log(sum);
      }
  return out;
}

}  // namespace moca::attention_reference
