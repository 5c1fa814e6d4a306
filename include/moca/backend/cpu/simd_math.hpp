// Vectorised exp, log and standard normal CDF for float on AVX2 + FMA, for the kernels whose time
// is mostly transcendental functions: softmax rows (one exp per logit), GELU (one erf per hidden
// unit, plus an exp in backward) and the entropy of soft targets (one log per target). std::exp,
// std::log and std::erf are scalar calls, 8-16× slower per value.
//
// exp: Cody-Waite range reduction x = n·ln 2 + r, |r| <= ln2/2, and the degree-5 polynomial of
// Cephes' expf for e^r (about 1 ulp); 2^n is built in the exponent bits. Below ln(FLT_MIN) the
// result is 0 (softmax of a -inf or hugely negative logit is exactly 0, as with std::exp in
// float up to denormals); above 88.376 it is e^88.376 = 2.4e38: the callers pass x <= 0.
//
// log: x = 2^e·m with m in [√½, √2), log x = e·ln 2 + log(1 + f), f = m − 1, with the degree-9
// polynomial of Cephes' logf for log(1 + f) (about 1 ulp for normal x). Zero and subnormal
// inputs are read as FLT_MIN (log = −87.34), so x·log x is 0 at x = 0 as in torch.xlogy; the
// callers pass x >= 0.
//
// Φ(x) = ½ erfc(-x/√2). For z = |x|/√2, erfc(z) = t·e^(-z²)·P(t) with t = 2/(2+z): P is a
// degree-8 polynomial fitted in this project (relative least squares on Chebyshev nodes against
// 40-digit erfc, t in [0.15, 1], i.e. z <= 11.3) with a maximum relative error of 5e-8, about
// 2e-7 after float rounding. Both tails keep relative accuracy: Φ(-|x|) is the product itself,
// Φ(|x|) = 1 - Φ(-|x|). Measured against double: relative error below 5e-7 for every x.
#pragma once

#if defined(__AVX2__) && defined(__FMA__) && !defined(__CUDACC__)
#define MOCA_CPU_SIMD_MATH 1

#include <immintrin.h>

namespace moca::cpu::simd {

/// e^x lane by lane.
inline __m256 exp(__m256 x) {
  const __m256 hi = _mm256_set1_ps(88.3762626647949f);
  const __m256 min_normal_log = _mm256_set1_ps(-87.3365447504f);  // ln(FLT_MIN)
  const __m256 underflow = _mm256_cmp_ps(x, min_normal_log, _CMP_LT_OQ);
  // x as the second operand: min/max return it when it is NaN, so NaN propagates.
  x = _mm256_min_ps(hi, x);
  x = _mm256_max_ps(min_normal_log, x);
  // n = round(x / ln 2); r = x - n ln 2 in two parts (ln 2 = 0.693359375 - 2.12194440e-4).
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  // e^r = 1 + r + r²·(c2 + c3 r + c4 r² + c5 r³ + c6 r⁴ + c7 r⁵), Cephes' coefficients.
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  // × 2^n: add n to the exponent field. n is in [-126, 127], so 2^n is a normal float.
  const __m256i bits = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const __m256 result = _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
  return _mm256_andnot_ps(underflow, result);
}

/// log x lane by lane, for x >= 0 (x below FLT_MIN is read as FLT_MIN).
inline __m256 log(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(1.17549435e-38f));  // FLT_MIN
  const __m256i bits = _mm256_castps_si256(x);
  // x = 2^e · m, m in [0.5, 1).
  __m256 e = _mm256_cvtepi32_ps(
      _mm256_sub_epi32(_mm256_srli_epi32(bits, 23), _mm256_set1_epi32(126)));
  __m256 m = _mm256_castsi256_ps(_mm256_or_si256(
      _mm256_and_si256(bits, _mm256_set1_epi32(0x007fffff)), _mm256_set1_epi32(0x3f000000)));
  // m < √½: use 2m (in [√½, 1)) and e − 1, so that f = m − 1 lies in [√½ − 1, √2 − 1).
  const __m256 small = _mm256_cmp_ps(m, _mm256_set1_ps(0.707106781186547524f), _CMP_LT_OQ);
  e = _mm256_sub_ps(e, _mm256_and_ps(small, _mm256_set1_ps(1.0f)));
  const __m256 f = _mm256_sub_ps(_mm256_add_ps(m, _mm256_and_ps(small, m)), _mm256_set1_ps(1.0f));
  const __m256 f2 = _mm256_mul_ps(f, f);
  __m256 p = _mm256_set1_ps(7.0376836292e-2f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(-1.1514610310e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.1676998740e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(-1.2420140846e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.4249322787e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(-1.6668057665e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.0000714765e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(-2.4999993993e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(3.3333331174e-1f));
  // log(1 + f) = f − f²/2 + f³·p(f); e·ln 2 added in two parts (0.693359375 − 2.12194440e-4).
  __m256 y = _mm256_mul_ps(_mm256_mul_ps(p, f), f2);
  y = _mm256_fmadd_ps(e, _mm256_set1_ps(-2.12194440e-4f), y);
  y = _mm256_fnmadd_ps(f2, _mm256_set1_ps(0.5f), y);
  return _mm256_fmadd_ps(e, _mm256_set1_ps(0.693359375f), _mm256_add_ps(f, y));
}

/// Φ(x) (the standard normal CDF) and, through `pdf`, φ(x) = e^(-x²/2)/√(2π), lane by lane.
inline __m256 normal_cdf(__m256 x, __m256* pdf = nullptr) {
  const __m256 sign_mask = _mm256_set1_ps(-0.0f);
  const __m256 ax = _mm256_andnot_ps(sign_mask, x);
  const __m256 z = _mm256_mul_ps(ax, _mm256_set1_ps(0.70710678118654752f));
  const __m256 t = _mm256_div_ps(_mm256_set1_ps(2.0f), _mm256_add_ps(_mm256_set1_ps(2.0f), z));
  // e^(-x²/2) with x² split into its float value and rounding error (an FMA gives the error
  // exactly): e^(-(s + d)/2) = e^(-s/2)·(1 - d/2). Rounding x² alone would cost 6e-8·x²/2 of
  // relative accuracy (1e-6 at x = 4).
  const __m256 sq = _mm256_mul_ps(x, x);
  const __m256 sq_err = _mm256_fmsub_ps(x, x, sq);
  const __m256 half = _mm256_set1_ps(0.5f);
  const __m256 e = _mm256_mul_ps(exp(_mm256_mul_ps(sq, _mm256_set1_ps(-0.5f))),
                                 _mm256_fnmadd_ps(sq_err, half, _mm256_set1_ps(1.0f)));
  __m256 p = _mm256_set1_ps(-6.024568309e-02f);
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(2.900955133e-01f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-4.981316319e-01f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(2.899517648e-01f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-3.434922915e-02f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(2.057445845e-01f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(2.423870697e-01f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(2.824658482e-01f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(2.820817123e-01f));
  // Φ(-|x|) = ½ erfc(z) = ½ t e^(-z²) P(t).
  const __m256 lower = _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), t), _mm256_mul_ps(e, p));
  if (pdf) *pdf = _mm256_mul_ps(e, _mm256_set1_ps(0.39894228040143267794f));
  const __m256 negative = _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_LT_OQ);
  return _mm256_blendv_ps(_mm256_sub_ps(_mm256_set1_ps(1.0f), lower), lower, negative);
}

#ifdef __AVX512F__
#define MOCA_CPU_SIMD_MATH_512 1
// The same functions on 16 lanes, operation for operation, so that every lane rounds exactly as
// in the 8-lane forms above: a value's result does not depend on which form computed it.

/// e^x lane by lane (see exp(__m256)). Where an unmasked intrinsic is defined through an
/// undefined merge source, its zero-masked form with every lane selected is used instead (the
/// same instruction): GCC 12 warns that the undefined source may be used uninitialized.
inline __m512 exp(__m512 x) {
  constexpr __mmask16 all = 0xFFFF;
  const __m512 hi = _mm512_set1_ps(88.3762626647949f);
  const __m512 min_normal_log = _mm512_set1_ps(-87.3365447504f);
  const __mmask16 underflow = _mm512_cmp_ps_mask(x, min_normal_log, _CMP_LT_OQ);
  x = _mm512_maskz_min_ps(all, hi, x);
  x = _mm512_maskz_max_ps(all, min_normal_log, x);
  const __m512 n =
      _mm512_maskz_roundscale_ps(all, _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                 _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  const __m512i bits = _mm512_maskz_slli_epi32(
      all, _mm512_add_epi32(_mm512_maskz_cvtps_epi32(all, n), _mm512_set1_epi32(127)), 23);
  const __m512 result = _mm512_mul_ps(p, _mm512_castsi512_ps(bits));
  return _mm512_maskz_mov_ps(static_cast<__mmask16>(~underflow), result);
}

/// Φ(x) and, through `pdf`, φ(x), lane by lane (see normal_cdf(__m256)).
inline __m512 normal_cdf(__m512 x, __m512* pdf = nullptr) {
  const __m512 ax = _mm512_abs_ps(x);
  const __m512 z = _mm512_mul_ps(ax, _mm512_set1_ps(0.70710678118654752f));
  const __m512 t = _mm512_div_ps(_mm512_set1_ps(2.0f), _mm512_add_ps(_mm512_set1_ps(2.0f), z));
  const __m512 sq = _mm512_mul_ps(x, x);
  const __m512 sq_err = _mm512_fmsub_ps(x, x, sq);
  const __m512 half = _mm512_set1_ps(0.5f);
  const __m512 e = _mm512_mul_ps(exp(_mm512_mul_ps(sq, _mm512_set1_ps(-0.5f))),
                                 _mm512_fnmadd_ps(sq_err, half, _mm512_set1_ps(1.0f)));
  __m512 p = _mm512_set1_ps(-6.024568309e-02f);
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(2.900955133e-01f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-4.981316319e-01f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(2.899517648e-01f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(-3.434922915e-02f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(2.057445845e-01f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(2.423870697e-01f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(2.824658482e-01f));
  p = _mm512_fmadd_ps(p, t, _mm512_set1_ps(2.820817123e-01f));
  const __m512 lower = _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), t), _mm512_mul_ps(e, p));
  if (pdf) *pdf = _mm512_mul_ps(e, _mm512_set1_ps(0.39894228040143267794f));
  const __mmask16 negative = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ);
  return _mm512_mask_blend_ps(negative, _mm512_sub_ps(_mm512_set1_ps(1.0f), lower), lower);
}
#endif

/// Horizontal sum of the 8 lanes, in a fixed order.
inline float sum(__m256 v) {
  const __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  __m128 s = _mm_add_ps(lo, hi);
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

/// Horizontal maximum of the 8 lanes.
inline float max(__m256 v) {
  const __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  __m128 m = _mm_max_ps(lo, hi);
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

/// A mask whose first `n` lanes (0 <= n <= 8) are set, for the ragged end of a row.
inline __m256i first_lanes(long n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

}  // namespace moca::cpu::simd

#endif
