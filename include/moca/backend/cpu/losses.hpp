// Soft-target cross-entropy (or KL divergence) of logit rows, fused with its gradient, on the
// host: one task per row reads the logits and the target row (gathered by index when asked)
// twice while they sit in cache, instead of the seven whole-tensor passes of the composed form
// (gather, log-softmax, product, sum, entropy, softmax, axpby).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "moca/backend/cpu/parallel.hpp"
#include "moca/backend/cpu/rows.hpp"
#include "moca/backend/cpu/simd_math.hpp"

namespace moca::cpu {

namespace detail {

/// Per-row losses of one call, summed afterwards in row order so that the total does not depend
/// on the thread count. Grows only: no allocation once the largest call has run.
inline std::vector<double>& row_loss_buffer(std::int64_t rows) {
  thread_local std::vector<double> buffer;
  if (static_cast<std::int64_t>(buffer.size()) < rows)
    buffer.resize(static_cast<std::size_t>(rows));
  return buffer;
}

// One row: returns Σ_k t_k·(lse − z_k) [+ Σ_k t_k log t_k], writes dz = s·(softmax(z) − t) when
// dz is not null (dz may alias z: z is read only before dz is written, element by element).
// Float rows run 8 lanes at a time, bf16 rows through them in float.
template <class T>
double soft_target_row(std::int64_t K, const T* z, const T* t, bool entropy, T s, T* dz) {
#ifdef MOCA_CPU_SIMD_MATH
  if constexpr (std::is_same_v<T, float>) {
    const float mx = lanes::row_max(K, z);
    const __m256 zero = _mm256_setzero_ps(), shift = _mm256_set1_ps(mx);
    const __m256 lowest = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
    __m256 sum_e = zero, sum_tz = zero, sum_t = zero, sum_tlogt = zero;
    for (std::int64_t j = 0; j < K; j += 8) {
      const std::int64_t left = K - j;
      const __m256 zj = lanes::load(z + j, left, lowest), tj = lanes::load(t + j, left, zero);
      const __m256 e = simd::exp(_mm256_sub_ps(zj, shift));  // padding: e^-inf = 0
      sum_e = _mm256_add_ps(sum_e, e);
      // Σ t·(z − max): the padding lanes hold t = 0 against z − max = −inf, so mask them.
      const __m256 zs = _mm256_blendv_ps(zero, _mm256_sub_ps(zj, shift),
                                         _mm256_cmp_ps(tj, zero, _CMP_NEQ_UQ));
      sum_tz = _mm256_fmadd_ps(tj, zs, sum_tz);
      sum_t = _mm256_add_ps(sum_t, tj);
      if (entropy) sum_tlogt = _mm256_fmadd_ps(tj, simd::log(tj), sum_tlogt);
      if (dz) lanes::store(dz + j, left, e);
    }
    const float total_e = simd::sum(sum_e);
    const double lse_shifted = std::log(static_cast<double>(total_e));  // lse − max
    const double tsum = simd::sum(sum_t);
    double loss = tsum * lse_shifted - static_cast<double>(simd::sum(sum_tz));
    if (entropy) loss += simd::sum(sum_tlogt);
    if (dz) {
      const __m256 a = _mm256_set1_ps(s / total_e), neg_s = _mm256_set1_ps(-s);
      for (std::int64_t j = 0; j < K; j += 8) {
        const std::int64_t left = K - j;
        const __m256 v = _mm256_fmadd_ps(lanes::load(dz + j, left, zero), a,
                                         _mm256_mul_ps(neg_s, lanes::load(t + j, left, zero)));
        lanes::store(dz + j, left, v);
      }
    }
    return loss;
  } else if constexpr (std::is_same_v<T, bf16>) {
    // The row and its target widened into the thread's buffer, the float row above, and dz
    // rounded once as it is stored.
    float* zf = lanes::scratch<0>(static_cast<std::size_t>(3 * K));
    float *tf = zf + K, *df = tf + K;
    widen_bf16(K, z, zf);
    widen_bf16(K, t, tf);
    const double loss = soft_target_row<float>(K, zf, tf, entropy, static_cast<float>(s),
                                               dz ? df : nullptr);
    if (dz) narrow_to_bf16(K, df, dz);
    return loss;
  }
#endif
  acc_t<T> mx = -std::numeric_limits<acc_t<T>>::infinity();
  for (std::int64_t j = 0; j < K; ++j) mx = std::max(mx, static_cast<acc_t<T>>(z[j]));
  acc_t<T> sum_e = 0, sum_tz = 0, sum_t = 0;
  double sum_tlogt = 0;
  for (std::int64_t j = 0; j < K; ++j) {
    const acc_t<T> e = std::exp(z[j] - mx);
    sum_e += e;
    if (t[j] != T(0)) sum_tz += t[j] * (z[j] - mx);
    sum_t += t[j];
    if (entropy && t[j] != T(0))
      sum_tlogt += static_cast<double>(t[j]) * std::log(static_cast<double>(t[j]));
    if (dz) dz[j] = e;
  }
  const double lse_shifted = std::log(static_cast<double>(sum_e));
  double loss = static_cast<double>(sum_t) * lse_shifted - static_cast<double>(sum_tz);
  if (entropy) loss += sum_tlogt;
  if (dz) {
    const acc_t<T> a = s / sum_e;
    for (std::int64_t j = 0; j < K; ++j) dz[j] = dz[j] * a - s * t[j];
  }
  return loss;
}

}  // namespace detail

/// For each row r of z [M, K] and its target row t_r = t[idx ? idx[r] : r] (t has at least
/// max(idx) + 1 rows): returns Σ_r Σ_k t_rk·(log t_rk [when `entropy`] − log softmax(z_r)_k),
/// in double, with 0·log 0 = 0; when dz is not null also writes dz_r = s·(softmax(z_r) − t_r)
/// (dz may alias z). Targets are probabilities (non-negative).
template <class T>
double soft_target_rows(std::int64_t M, std::int64_t K, const T* z, const T* t,
                        const std::int32_t* idx, bool entropy, T s, T* dz) {
  if (M <= 0) return 0.0;
  std::vector<double>& row_loss = detail::row_loss_buffer(M);
  double* losses = row_loss.data();
  parallel_for(M, 6 * M * K, [&](std::int64_t r0, std::int64_t r1) {
    for (std::int64_t r = r0; r < r1; ++r) {
      const std::int64_t tr = idx ? static_cast<std::int64_t>(idx[r]) : r;
      losses[r] = detail::soft_target_row(K, z + r * K, t + tr * K, entropy, s,
                                          dz ? dz + r * K : nullptr);
    }
  });
  double total = 0.0;
  for (std::int64_t r = 0; r < M; ++r) total += losses[r];
  return total;
}

}  // namespace moca::cpu
