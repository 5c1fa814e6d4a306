// Conversions between bf16 and float arrays, 8 values at a time on AVX2 (a scalar loop
// elsewhere and for the ragged end): widening puts the 16 bits above 16 zero bits, which is exact;
// narrowing rounds as moca::bf16 does (to nearest, ties to even; NaN to the canonical 0x7fc0), so
// both give bit for bit what an element-by-element conversion gives. The bf16 paths of the CPU
// backend (the widened GEMM, GELU, ops::convert) convert through these.
#pragma once

#include <cstdint>
#include <cstring>

#include "moca/backend/cpu/simd_math.hpp"
#include "moca/core/bf16.hpp"

namespace moca::cpu {

/// y[i] = x[i], exactly.
inline void widen_bf16(std::int64_t n, const bf16* x, float* y) {
  std::int64_t i = 0;
#ifdef MOCA_CPU_SIMD_MATH
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x + i));
    const __m256i w = _mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16);
    _mm256_storeu_ps(y + i, _mm256_castsi256_ps(w));
  }
#endif
  for (; i < n; ++i) y[i] = x[i];
}

#ifdef __AVX512F__
/// 16 floats rounded to bf16 as narrow_to_bf16 rounds them, each in the low half of its lane
/// (vpmovdw then stores them as 16-bit values).
/// (The shifts are the zero-masked forms with every lane selected: GCC 12 warns that the
/// unmasked forms' undefined merge source may be used uninitialized.)
inline __m512i bf16_bits16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb =
      _mm512_and_si512(_mm512_maskz_srli_epi32(0xFFFF, u, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_maskz_srli_epi32(
      0xFFFF, _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
  return _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q),
                               _mm512_set1_epi32(0x7fc0));
}
#endif

#ifdef MOCA_CPU_SIMD_MATH
/// 8 floats rounded to bf16 (to nearest, ties to even; NaN to 0x7fc0), packed into the low
/// 128 bits.
inline __m128i bf16_bits8(__m256 v) {
  const __m256i bias = _mm256_set1_epi32(0x7fff), one = _mm256_set1_epi32(1);
  const __m256i nan = _mm256_set1_epi32(0x7fc0);
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), one);
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, bias), lsb), 16);
  r = _mm256_blendv_epi8(r, nan, _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
  // Eight 32-bit values below 2^16 to eight 16-bit ones: packus works within 128-bit halves,
  // so pack, then gather the two low quarters.
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0b1000));
}

/// The first min(n, 8) values of x widened (exactly); the other lanes hold `fill`, and nothing
/// past x + n is read.
inline __m256 widen8(const bf16* x, std::int64_t n, __m256 fill) {
  __m128i h;
  if (n >= 8) {
    h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x));
  } else {
    alignas(16) std::uint16_t part[8] = {};
    std::memcpy(part, static_cast<const void*>(x), static_cast<std::size_t>(n) * sizeof(bf16));
    h = _mm_load_si128(reinterpret_cast<const __m128i*>(part));
  }
  const __m256 w = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  if (n >= 8) return w;
  return _mm256_blendv_ps(fill, w, _mm256_castsi256_ps(simd::first_lanes(n)));
}

/// The first min(n, 8) lanes of v rounded to bf16 (as narrow_to_bf16 rounds) and stored to y.
inline void narrow8(__m256 v, bf16* y, std::int64_t n) {
  const __m128i bits = bf16_bits8(v);
  if (n >= 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(y), bits);
    return;
  }
  alignas(16) std::uint16_t part[8];
  _mm_store_si128(reinterpret_cast<__m128i*>(part), bits);
  std::memcpy(static_cast<void*>(y), part, static_cast<std::size_t>(n) * sizeof(bf16));
}
#endif

/// y[i] = x[i] rounded to bf16.
inline void narrow_to_bf16(std::int64_t n, const float* x, bf16* y) {
  std::int64_t i = 0;
#ifdef MOCA_CPU_SIMD_MATH
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(y + i), bf16_bits8(_mm256_loadu_ps(x + i)));
#endif
  for (; i < n; ++i) y[i] = bf16(x[i]);
}

}  // namespace moca::cpu
