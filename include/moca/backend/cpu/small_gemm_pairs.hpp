// bf16 products of one attention head on the AVX-512 BF16 dot product, without packing A: the
// pair counterpart of small_gemm.hpp, for the bf16 heads of attention.hpp.
//
//   C[M, N] = α · Σ_q A(i, q) · B(q, j)     C row-major (ldc), N > 0 columns: float, or bf16
//                                            rounded as it is stored
//
// A(i, q) and B(q, j) are pairs: 32-bit words whose low half is the value at inner index 2q and
// whose high half is the value at 2q + 1, so that one vdpbf16ps adds both products to a float
// lane (the high one first, each step rounded as an FMA rounds; a product of two bf16 values is
// exact in float; subnormal inputs and sums are flushed to zero). A bf16 row whose elements run
// along the inner index is already a row of pairs. A's words are read in place from
// a + i·ars + q·acs (in bf16 units: a row-major matrix whose rows hold the inner index has
// ars = its row stride, acs = 2) and broadcast, as small_gemm broadcasts A's floats. B is written
// per column block into a contiguous panel of kp × 16·NV words by one of two builders:
//   - transposed_words: B(q, j) = the q-th pair of row j of X (the kᵀ of q·kᵀ, the vᵀ of dO·vᵀ);
//   - interleaved_rows: B(q, j) = (X[2q][j], X[2q+1][j]) (the v of p·v, the k of dS·k), a missing
//     row 2q + 1 (an odd inner length) read as zeros;
// interleaved_rows also writes a whole A whose inner index runs down X's rows (the Pᵀ of Pᵀ·dO,
// the dSᵀ of dSᵀ·q). Columns past N and pairs past the inner length are zero in every panel.
#pragma once

#include "moca/backend/cpu/sgemm_avx2.hpp"

#ifdef MOCA_CPU_SGEMM_BF16_PAIRS

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>

#include "moca/backend/cpu/bf16_lanes.hpp"
#include "moca/backend/cpu/small_gemm.hpp"
#include "moca/core/bf16.hpp"

namespace moca::cpu::small_gemm_pairs {

/// The pair of bf16 values at p and p + 1 as one word (p need not be 4-byte aligned).
inline int word_at(const bf16* p) {
  int w;
  std::memcpy(&w, p, sizeof w);
  return w;
}

/// Where a product goes: float C (row stride ldc), or, with `out`, bf16 rounded as it is stored
/// (row stride ldc too), so that no float copy is written and narrowed afterwards.
struct Destination {
  float* c;
  bf16* out;
  std::int64_t ldc;
};

// (The tile takes the destination's fields one by one: a struct passed on the stack is read back
// in one 16-byte load that cannot be forwarded from the 8-byte stores that wrote it, which made
// each call wait for every store before it, the previous tile's included.)
template <int MR, int NV>
[[gnu::noinline]] void tile(std::int64_t kp, const bf16* __restrict a, std::int64_t ars,
                            std::int64_t acs, const bf16* __restrict b, float* __restrict c,
                            bf16* __restrict out, std::int64_t ldc, float alpha, __mmask16 last) {
  __m512 acc[MR][NV];
#pragma GCC unroll 12
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  for (std::int64_t q = 0; q < kp; ++q, a += acs, b += 32 * NV) {
    __m512i bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      bv[v] = _mm512_load_si512(b + 32 * v);
      asm("" : "+v"(bv[v]));  // as in small_gemm's tile: one load of the row, not MR
    }
#pragma GCC unroll 12
    for (int r = 0; r < MR; ++r) {
      const __m512bh ak = (__m512bh)_mm512_set1_epi32(word_at(a + r * ars));
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], ak, (__m512bh)bv[v]);
    }
  }
  const __m512 va = _mm512_set1_ps(alpha);
  if (out != nullptr) {
#pragma GCC unroll 12
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v)
        _mm512_mask_cvtepi32_storeu_epi16(out + r * ldc + 16 * v,
                                          v + 1 < NV ? __mmask16(0xFFFF) : last,
                                          bf16_bits16(_mm512_mul_ps(va, acc[r][v])));
    return;
  }
#pragma GCC unroll 12
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v + 1 < NV; ++v)
      _mm512_storeu_ps(c + r * ldc + 16 * v, _mm512_mul_ps(va, acc[r][v]));
    _mm512_mask_storeu_ps(c + r * ldc + 16 * (NV - 1), last, _mm512_mul_ps(va, acc[r][NV - 1]));
  }
}

/// The destination's rows from i and columns from j.
inline Destination offset(const Destination& d, std::int64_t i, std::int64_t j) {
  return {d.c != nullptr ? d.c + i * d.ldc + j : nullptr,
          d.out != nullptr ? d.out + i * d.ldc + j : nullptr, d.ldc};
}

template <int NV, int... R>
void tile_rows(std::integer_sequence<int, R...>, int rows, std::int64_t kp, const bf16* a,
               std::int64_t ars, std::int64_t acs, const bf16* b, const Destination& d, float alpha,
               __mmask16 last) {
  ((rows == R + 1 ? tile<R + 1, NV>(kp, a, ars, acs, b, d.c, d.out, d.ldc, alpha, last) : void()),
   ...);
}

/// Words (lo[c], hi[c]) for the columns in `mask`, zero elsewhere; a null hi reads as zeros.
inline __m512i pair_words(const bf16* lo, const bf16* hi, __mmask16 mask) {
  // Zero-masked forms with every lane selected: see bf16_bits16.
  const __m512i l = _mm512_maskz_cvtepu16_epi32(0xFFFF, _mm256_maskz_loadu_epi16(mask, lo));
  if (hi == nullptr) return l;
  const __m512i h = _mm512_maskz_cvtepu16_epi32(0xFFFF, _mm256_maskz_loadu_epi16(mask, hi));
  return _mm512_or_si512(l, _mm512_maskz_slli_epi32(0xFFFF, h, 16));
}

/// out[q][j] = (x[2q][j], x[2q+1][j]) for q < ⌈K/2⌉ and j < width, zero for j in [n, width) and
/// for the missing row of an odd K; x is K × n bf16 with row stride ldx. Rows of out are ldo
/// words apart and written in whole vectors: ⌈width/16⌉·16 words each, so ldo must be at least
/// that.
inline void interleaved_rows(std::int64_t K, std::int64_t n, std::int64_t width, const bf16* x,
                             std::int64_t ldx, bf16* out, std::int64_t ldo) {
  for (std::int64_t q = 0; 2 * q < K; ++q) {
    const bf16* lo = x + 2 * q * ldx;
    const bf16* hi = 2 * q + 1 < K ? lo + ldx : nullptr;
    bf16* row = out + 2 * q * ldo;
    for (std::int64_t j = 0; j < width; j += 16)
      _mm512_storeu_si512(row + 2 * j, pair_words(lo + j, hi == nullptr ? nullptr : hi + j,
                                                  sgemm_avx2::prefix16(n - j)));
  }
}

/// out[q][j] = (x[j][2q], x[j][2q+1]) for q < kp and j < width (a multiple of 8), zero for j in
/// [n, width); x is n × 2·kp bf16 with row stride ldx, rows 4-byte aligned. Rows of out are ldo
/// words apart.
inline void transposed_words(std::int64_t kp, std::int64_t n, std::int64_t width, const bf16* x,
                             std::int64_t ldx, bf16* out, std::int64_t ldo) {
  // 8 × 8 blocks of words: 8 pairs of 8 rows of x loaded, transposed in registers, and stored as
  // 8 words of 8 rows of out.
  for (std::int64_t j = 0; j < width; j += 8)
    for (std::int64_t q = 0; q < kp; q += 8) {
      const std::int64_t pairs = std::min<std::int64_t>(8, kp - q);
      const __mmask8 words = static_cast<__mmask8>(sgemm_avx2::prefix16(pairs));
      __m256 v[8];
      for (std::int64_t r = 0; r < 8; ++r)
        v[r] = j + r < n
                   ? _mm256_castsi256_ps(_mm256_maskz_loadu_epi32(words, x + (j + r) * ldx + 2 * q))
                   : _mm256_setzero_ps();
      sgemm_avx2::transpose8(v);
      for (std::int64_t c = 0; c < pairs; ++c)
        _mm256_storeu_ps(reinterpret_cast<float*>(out + 2 * ((q + c) * ldo + j)), v[c]);
    }
}

/// Where B comes from: X transposed (transposed_words) or X's rows interleaved (interleaved_rows).
enum class Source { TransposedWords, InterleavedRows };

/// B as the builders read it: X (row stride ldx) and how B's pairs come from it.
struct BMatrix {
  Source source;
  const bf16* x;
  std::int64_t ldx;
};

template <int NV>
void column_block(std::int64_t M, std::int64_t n, std::int64_t K, float alpha, const bf16* a,
                  std::int64_t ars, std::int64_t acs, const BMatrix& b, const Destination& d,
                  bf16* panel, __mmask16 last) {
  constexpr int MR = small_gemm::rows_for16<NV>;
  const std::int64_t kp = (K + 1) / 2;
  if (b.source == Source::TransposedWords) {
    transposed_words(kp, n, 16 * NV, b.x, b.ldx, panel, 16 * NV);
  } else {
    interleaved_rows(K, n, 16 * NV, b.x, b.ldx, panel, 16 * NV);
  }
  for (std::int64_t i = 0; i < M; i += MR)
    tile_rows<NV>(std::make_integer_sequence<int, MR>{},
                  static_cast<int>(std::min<std::int64_t>(MR, M - i)), kp, a + i * ars, ars, acs,
                  panel, offset(d, i, 0), alpha, last);
}

/// bf16 values of the `panel` scratch that gemm needs for an inner length K (64-byte aligned).
inline std::int64_t panel_values(std::int64_t K) { return (K + 1) / 2 * 128; }

/// C = α·A·B as the header describes, over an inner length K > 0 (B's pairs past K are zero;
/// A's words there must be finite: a K that is odd reads the word holding A's last value and the
/// one after it), into d. `panel` is scratch of panel_values(K) bf16, 64-byte aligned.
inline void gemm(std::int64_t M, std::int64_t N, std::int64_t K, float alpha, const bf16* a,
                 std::int64_t ars, std::int64_t acs, const BMatrix& b, const Destination& d,
                 bf16* panel) {
  small_gemm::column_blocks16(N, [&]<int NV>(std::int64_t j, __mmask16 last) {
    const BMatrix block{b.source, b.source == Source::TransposedWords ? b.x + j * b.ldx : b.x + j,
                        b.ldx};
    column_block<NV>(M, std::min<std::int64_t>(16 * NV, N - j), K, alpha, a, ars, acs, block,
                     offset(d, 0, j), panel, last);
  });
}

}  // namespace moca::cpu::small_gemm_pairs

#endif
