// The attention core on the host: one task per (image, head) pair, so the pair's S×S scores,
// its softmax and both products stay in cache, and the threads split pairs rather than each
// small product. Layout as ops/attention.hpp documents; every GEMM inside runs on the task's
// thread (cpu::gemm does not nest parallel regions).
//
// Float heads of up to kSmallHeadTokens tokens with hd a multiple of 8 (every preset) run the
// register-tiled products of small_gemm.hpp (A read in place, B copied per column block): K
// and V are transposed once per head into a buffer padded to 8 tokens, and the scores go to a
// padded buffer whose rows the softmax reads in place. bf16 heads of those shapes run on the
// AVX-512 BF16 dot product where the compiler targets it (small_gemm_pairs.hpp: the operands'
// bf16 pairs read in place or interleaved per column block; scores and softmax in float; the
// probabilities and dS rounded to bf16 for the products that read them, as PyTorch's bf16
// autocast rounds them); elsewhere they are widened into float buffers per head and run the
// float code (probabilities, ctx and gradients rounded once as stored). Other shapes and double
// run the packed cpu::gemm.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "moca/backend/cpu/gemm.hpp"
#include "moca/backend/cpu/parallel.hpp"
#include "moca/backend/cpu/rows.hpp"
#include "moca/backend/cpu/small_gemm.hpp"
#include "moca/backend/cpu/small_gemm_pairs.hpp"

namespace moca::cpu {

#ifdef MOCA_CPU_SGEMM_AVX2
namespace small_head {

// Per-target linker names, as small_gemm's: a file's heads run that file's products.
#ifdef MOCA_CPU_SGEMM_AVX512
inline namespace zmm {
#else
inline namespace ymm {
#endif

/// Longest token sequence run unpacked: its [S, S] scores (256 KiB) still fit in L2.
inline constexpr std::int64_t kSmallHeadTokens = 256;

inline bool applies(std::int64_t S, std::int64_t hd) {
  return S <= kSmallHeadTokens && hd % 8 == 0;
}

inline std::int64_t padded(std::int64_t S) { return (S + 7) / 8 * 8; }

/// xt[d, t] = x[t, d] for t < S, 0 for S ≤ t < Sp; x is [S, hd] with row stride ldx.
inline void transpose_padded(std::int64_t S, std::int64_t hd, const float* x, std::int64_t ldx,
                             float* xt, std::int64_t Sp) {
  for (std::int64_t t0 = 0; t0 < Sp; t0 += 8)
    for (std::int64_t d0 = 0; d0 < hd; d0 += 8) {
      __m256 v[8];
      for (std::int64_t i = 0; i < 8; ++i)
        v[i] = t0 + i < S ? _mm256_loadu_ps(x + (t0 + i) * ldx + d0) : _mm256_setzero_ps();
      sgemm_avx2::transpose8(v);
      for (std::int64_t j = 0; j < 8; ++j) _mm256_storeu_ps(xt + (d0 + j) * Sp + t0, v[j]);
    }
}

/// Asks for `rows` rows of `width` values (row stride ld) in L2: the next head's operands
/// arrive while this head computes.
template <class T>
void prefetch_rows(std::int64_t rows, std::int64_t width, const T* x, std::int64_t ld) {
  constexpr std::int64_t line = 64 / sizeof(T);
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t j = 0; j < width; j += line)
      _mm_prefetch(reinterpret_cast<const char*>(x + r * ld + j), _MM_HINT_T1);
}

/// Per-thread buffers of one head: a transposed operand [hd, Sp], a score matrix [S, Sp] and
/// small_gemm's B panel.
struct Scratch {
  sgemm_avx2::PackBuffer transposed, scores, panel;
};

inline Scratch& scratch() {
  thread_local Scratch buffers;
  return buffers;
}

inline void forward(std::int64_t S, std::int64_t hd, std::int64_t dim, float scale,
                    const float* q, float* P, float* ctx) {
  const std::int64_t ld = 3 * dim, Sp = padded(S);
  const float *k = q + dim, *v = q + 2 * dim;
  Scratch& s = scratch();
  float* kt = s.transposed.reserve(hd * Sp);
  float* scores = s.scores.reserve(S * Sp);
  float* panel = s.panel.reserve(small_gemm::panel_floats(std::max(S, hd)));
  transpose_padded(S, hd, k, ld, kt, Sp);
  small_gemm::gemm(S, Sp, hd, scale, q, ld, 1, kt, Sp, scores, Sp, panel);
  for (std::int64_t i = 0; i < S; ++i) {
    float* row = scores + i * Sp;
    const float mx = lanes::row_max(S, row);
    const __m256 inv = _mm256_set1_ps(1.0f / lanes::sum_exp(S, row, mx, row));
    for (std::int64_t j = 0; j < S; j += 8) {
      const __m256 p = _mm256_mul_ps(lanes::load(row + j, S - j, inv), inv);
      lanes::store(row + j, S - j, p);
      lanes::store(P + i * S + j, S - j, p);
    }
  }
  small_gemm::gemm(S, hd, S, 1.0f, scores, Sp, 1, v, ld, ctx, dim, panel);
}

inline void backward(std::int64_t S, std::int64_t hd, std::int64_t dim, float scale,
                     const float* q, const float* P, const float* dout, float* dq) {
  const std::int64_t ld = 3 * dim, Sp = padded(S);
  const float *k = q + dim, *v = q + 2 * dim;
  float *dk = dq + dim, *dv = dq + 2 * dim;
  Scratch& s = scratch();
  float* vt = s.transposed.reserve(hd * Sp);
  float* ds = s.scores.reserve(S * Sp);
  float* panel = s.panel.reserve(small_gemm::panel_floats(std::max(S, hd)));
  // o = P v:  dP = do · vᵀ,  dv = Pᵀ · do
  transpose_padded(S, hd, v, ld, vt, Sp);
  small_gemm::gemm(S, Sp, hd, 1.0f, dout, dim, 1, vt, Sp, ds, Sp, panel);
  small_gemm::gemm(S, hd, S, 1.0f, P, 1, S, dout, dim, dv, ld, panel);
  // dS = P ⊙ (dP − Σ_j P·dP), row by row
  const __m256 zero = _mm256_setzero_ps();
  for (std::int64_t i = 0; i < S; ++i) {
    float* row = ds + i * Sp;
    const float* prow = P + i * S;
    const __m256 d = _mm256_set1_ps(lanes::dot(S, row, prow));
    for (std::int64_t j = 0; j < S; j += 8)
      lanes::store(row + j, S - j,
                   _mm256_mul_ps(lanes::load(prow + j, S - j, zero),
                                 _mm256_sub_ps(lanes::load(row + j, S - j, zero), d)));
  }
  // S = q kᵀ · scale:  dq = dS · k · scale,  dk = dSᵀ · q · scale
  small_gemm::gemm(S, hd, S, scale, ds, Sp, 1, k, ld, dq, ld, panel);
  small_gemm::gemm(S, hd, S, scale, ds, 1, Sp, q, ld, dk, ld, panel);
}

/// Per-thread float copies of one bf16 head: q | k | v (or their gradients) [S, 3·hd], the
/// probabilities [S, S], and ctx or do [S, hd].
struct WidenedHead {
  sgemm_avx2::PackBuffer qkv, probs, rows, grads;
};

inline WidenedHead& widened_head() {
  thread_local WidenedHead buffers;
  return buffers;
}

/// rows × width values of x (row stride ldx) widened to y (row stride ldy), or narrowed.
inline void widen_rows(std::int64_t rows, std::int64_t width, const bf16* x, std::int64_t ldx,
                       float* y, std::int64_t ldy) {
  for (std::int64_t r = 0; r < rows; ++r) widen_bf16(width, x + r * ldx, y + r * ldy);
}
inline void narrow_rows(std::int64_t rows, std::int64_t width, const float* x, std::int64_t ldx,
                        bf16* y, std::int64_t ldy) {
  for (std::int64_t r = 0; r < rows; ++r) narrow_to_bf16(width, x + r * ldx, y + r * ldy);
}

/// A bf16 head through the float head above: its q, k and v widened into one [S, 3·hd] buffer
/// (a head of width hd whose "dim" is hd), scores, softmax and products in float, and the
/// probabilities and ctx rounded once as they are stored (ctx from the unrounded p).
inline void forward_bf16(std::int64_t S, std::int64_t hd, std::int64_t dim, float scale,
                         const bf16* q, bf16* P, bf16* ctx) {
  WidenedHead& w = widened_head();
  float* qf = w.qkv.reserve(3 * S * hd);
  float* pf = w.probs.reserve(S * S);
  float* cf = w.rows.reserve(S * hd);
  for (std::int64_t part = 0; part < 3; ++part)
    widen_rows(S, hd, q + part * dim, 3 * dim, qf + part * hd, 3 * hd);
  forward(S, hd, hd, scale, qf, pf, cf);
  narrow_to_bf16(S * S, pf, P);
  narrow_rows(S, hd, cf, hd, ctx, dim);
}

/// The backward of a bf16 head the same way: q, k, v, the stored probabilities and do widened,
/// dq, dk and dv rounded once as they are stored.
inline void backward_bf16(std::int64_t S, std::int64_t hd, std::int64_t dim, float scale,
                          const bf16* q, const bf16* P, const bf16* dout, bf16* dq) {
  WidenedHead& w = widened_head();
  float* qf = w.qkv.reserve(3 * S * hd);
  float* pf = w.probs.reserve(S * S);
  float* of = w.rows.reserve(S * hd);
  float* gf = w.grads.reserve(3 * S * hd);
  for (std::int64_t part = 0; part < 3; ++part)
    widen_rows(S, hd, q + part * dim, 3 * dim, qf + part * hd, 3 * hd);
  widen_bf16(S * S, P, pf);
  widen_rows(S, hd, dout, dim, of, hd);
  backward(S, hd, hd, scale, qf, pf, of, gf);
  for (std::int64_t part = 0; part < 3; ++part)
    narrow_rows(S, hd, gf + part * hd, 3 * hd, dq + part * dim, 3 * dim);
}

#ifdef MOCA_CPU_SGEMM_BF16_PAIRS
/// Per-thread buffers of one bf16 head on pair products: float scores or dP [S, Sp], bf16
/// probabilities or dS padded to an even row [S, Sw], a transposed operand's pair words
/// [Sw/2, Sv], and the B panel.
struct PairHead {
  sgemm_avx2::PackBuffer scores, rounded, words, panel;
};

inline PairHead& pair_head() {
  thread_local PairHead buffers;
  return buffers;
}

/// bf16 values in a PackBuffer of floats.
inline bf16* bf16_values(sgemm_avx2::PackBuffer& buffer, std::int64_t n) {
  return reinterpret_cast<bf16*>(buffer.reserve((n + 1) / 2));
}

/// The sum and the max of 16 lanes, through simd::sum and simd::max of their two halves added or
/// compared lane by lane: a fixed order. (The masked forms with every lane selected: GCC 12
/// warns that the unmasked ones' undefined merge source may be used uninitialized.)
inline float sum16(__m512 v) {
  return simd::sum(_mm256_add_ps(_mm512_maskz_extractf32x8_ps(0xFF, v, 0),
                                 _mm512_maskz_extractf32x8_ps(0xFF, v, 1)));
}
inline float max16(__m512 v) {
  return simd::max(_mm256_max_ps(_mm512_maskz_extractf32x8_ps(0xFF, v, 0),
                                 _mm512_maskz_extractf32x8_ps(0xFF, v, 1)));
}

/// Stores the lanes of `mask` of v rounded to bf16.
inline void store_rounded(bf16* p, __mmask16 mask, __m512 v) {
  _mm512_mask_cvtepi32_storeu_epi16(p, mask, bf16_bits16(v));
}

/// The softmax of a row of S float scores in 16 lanes (the lanes' partial sums added in a fixed
/// order), rounded once to bf16 into `rounded`, whose pad value past S (a row padded to Sw) is
/// zero, and into P's row. The scores row is overwritten.
inline void softmax_row_rounded(std::int64_t S, std::int64_t Sw, float* row, bf16* rounded,
                                bf16* P) {
  const __m512 lowest = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 m = lowest;
  for (std::int64_t j = 0; j < S; j += 16)
    m = _mm512_maskz_max_ps(0xFFFF, m,
                            _mm512_mask_loadu_ps(lowest, sgemm_avx2::prefix16(S - j), row + j));
  const __m512 mx = _mm512_set1_ps(max16(m));
  __m512 sum = _mm512_setzero_ps();
  for (std::int64_t j = 0; j < S; j += 16) {
    const __mmask16 mask = sgemm_avx2::prefix16(S - j);
    const __m512 e = simd::exp(_mm512_sub_ps(_mm512_mask_loadu_ps(lowest, mask, row + j), mx));
    sum = _mm512_add_ps(sum, e);  // e^-inf = 0 in the lanes past S
    _mm512_mask_storeu_ps(row + j, mask, e);
  }
  const __m512 inv = _mm512_set1_ps(1.0f / sum16(sum));
  for (std::int64_t j = 0; j < S; j += 16) {
    const __mmask16 mask = sgemm_avx2::prefix16(S - j);
    const __m512 p = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, row + j), inv);
    store_rounded(rounded + j, mask, p);
    store_rounded(P + j, mask, p);
  }
  if (Sw > S) rounded[S] = bf16(0.0f);
}

/// 16 bf16 values of the lanes in `mask` widened, zeros elsewhere.
inline __m512 widen16(const bf16* p, __mmask16 mask) {
  return _mm512_castsi512_ps(_mm512_maskz_slli_epi32(
      0xFFFF, _mm512_maskz_cvtepu16_epi32(0xFFFF, _mm256_maskz_loadu_epi16(mask, p)), 16));
}

/// dS = P ⊙ (dP − Σ_j P·dP) for one row, from P's bf16 row and dP's float row, rounded once to
/// bf16 into ds (a zero past S when the row is padded to Sw).
inline void softmax_grad_row_rounded(std::int64_t S, std::int64_t Sw, const bf16* P,
                                     const float* dp, bf16* ds) {
  __m512 dot = _mm512_setzero_ps();
  for (std::int64_t j = 0; j < S; j += 16) {
    const __mmask16 mask = sgemm_avx2::prefix16(S - j);
    dot = _mm512_fmadd_ps(widen16(P + j, mask), _mm512_maskz_loadu_ps(mask, dp + j), dot);
  }
  const __m512 d = _mm512_set1_ps(sum16(dot));
  for (std::int64_t j = 0; j < S; j += 16) {
    const __mmask16 mask = sgemm_avx2::prefix16(S - j);
    store_rounded(
        ds + j, mask,
        _mm512_mul_ps(widen16(P + j, mask), _mm512_sub_ps(_mm512_maskz_loadu_ps(mask, dp + j), d)));
  }
  if (Sw > S) ds[S] = bf16(0.0f);
}

/// A bf16 head on the AVX-512 BF16 dot product (small_gemm_pairs.hpp), rounding where PyTorch's
/// bf16 autocast rounds: q·kᵀ from the bf16 operands with float sums; the softmax in float; the
/// probabilities rounded to bf16 once, for P and for the product p·v alike; ctx rounded as the
/// product stores it. No operand is widened to float.
inline void forward_pairs(std::int64_t S, std::int64_t hd, std::int64_t dim, float scale,
                          const bf16* q, bf16* P, bf16* ctx) {
  namespace pairs = small_gemm_pairs;
  const std::int64_t ld = 3 * dim, Sp = padded(S), Sw = (S + 1) / 2 * 2;
  const bf16 *k = q + dim, *v = q + 2 * dim;
  PairHead& s = pair_head();
  float* scores = s.scores.reserve(S * Sp);
  bf16* rounded = bf16_values(s.rounded, S * Sw);
  bf16* panel = bf16_values(s.panel, pairs::panel_values(std::max(S, hd)));
  pairs::gemm(S, S, hd, scale, q, ld, 2, {pairs::Source::TransposedWords, k, ld},
              {scores, nullptr, Sp}, panel);
  for (std::int64_t i = 0; i < S; ++i)
    softmax_row_rounded(S, Sw, scores + i * Sp, rounded + i * Sw, P + i * S);
  pairs::gemm(S, hd, S, 1.0f, rounded, Sw, 2, {pairs::Source::InterleavedRows, v, ld},
              {nullptr, ctx, dim}, panel);
}

/// Its backward: dP and dV from the stored (rounded) probabilities, dS = P ⊙ (dP − Σ P·dP) in
/// float and rounded to bf16 once for both products that read it; each gradient rounded as the
/// product stores it.
inline void backward_pairs(std::int64_t S, std::int64_t hd, std::int64_t dim, float scale,
                           const bf16* q, const bf16* P, const bf16* dout, bf16* dq) {
  namespace pairs = small_gemm_pairs;
  const std::int64_t ld = 3 * dim, Sp = padded(S), Sw = (S + 1) / 2 * 2, Sv = (S + 15) / 16 * 16;
  const bf16 *k = q + dim, *v = q + 2 * dim;
  bf16 *dk = dq + dim, *dv = dq + 2 * dim;
  PairHead& s = pair_head();
  float* dp = s.scores.reserve(S * Sp);
  bf16* ds = bf16_values(s.rounded, S * Sw);
  bf16* words = bf16_values(s.words, Sw * Sv);  // Sw/2 rows of Sv words
  bf16* panel = bf16_values(s.panel, pairs::panel_values(std::max(S, hd)));
  // o = P v:  dP = do · vᵀ,  dv = Pᵀ · do
  pairs::gemm(S, S, hd, 1.0f, dout, dim, 2, {pairs::Source::TransposedWords, v, ld},
              {dp, nullptr, Sp}, panel);
  pairs::interleaved_rows(S, S, S, P, S, words, Sv);
  pairs::gemm(S, hd, S, 1.0f, words, 2, 2 * Sv, {pairs::Source::InterleavedRows, dout, dim},
              {nullptr, dv, ld}, panel);
  for (std::int64_t i = 0; i < S; ++i)
    softmax_grad_row_rounded(S, Sw, P + i * S, dp + i * Sp, ds + i * Sw);
  // S = q kᵀ · scale:  dq = dS · k · scale,  dk = dSᵀ · q · scale
  pairs::gemm(S, hd, S, scale, ds, Sw, 2, {pairs::Source::InterleavedRows, k, ld},
              {nullptr, dq, ld}, panel);
  pairs::interleaved_rows(S, S, S, ds, Sw, words, Sv);
  pairs::gemm(S, hd, S, scale, words, 2, 2 * Sv, {pairs::Source::InterleavedRows, q, ld},
              {nullptr, dk, ld}, panel);
}
#endif

}  // namespace zmm or ymm
}  // namespace small_head
#endif

template <class T>
void attention_forward(std::int64_t B, std::int64_t H, std::int64_t S, std::int64_t hd, T scale,
                       const T* qkv, T* probs, T* ctx) {
  const std::int64_t dim = H * hd, ld = 3 * dim;
  parallel_for(B * H, B * H * S * S * hd, [&](std::int64_t p0, std::int64_t p1) {
    for (std::int64_t p = p0; p < p1; ++p) {
      const std::int64_t b = p / H, h = p % H;
      const T* q = qkv + b * S * ld + h * hd;
      T* P = probs + p * S * S;
#ifdef MOCA_CPU_SGEMM_AVX2
      if constexpr (std::is_same_v<T, float> || std::is_same_v<T, bf16>) {
        if (small_head::applies(S, hd)) {
          if (p + 1 < p1) {
            const std::int64_t nb = (p + 1) / H, nh = (p + 1) % H;
            for (int part = 0; part < 3; ++part)
              small_head::prefetch_rows(S, hd, qkv + nb * S * ld + part * dim + nh * hd, ld);
            small_head::prefetch_rows(S, hd, ctx + nb * S * dim + nh * hd, dim);
          }
          T* c = ctx + b * S * dim + h * hd;
          if constexpr (std::is_same_v<T, float>) {
            small_head::forward(S, hd, dim, scale, q, P, c);
          } else {
#ifdef MOCA_CPU_SGEMM_BF16_PAIRS
            small_head::forward_pairs(S, hd, dim, scale, q, P, c);
#else
            small_head::forward_bf16(S, hd, dim, scale, q, P, c);
#endif
          }
          continue;
        }
      }
#endif
      gemm(false, true, S, S, hd, scale, q, ld, q + dim, ld, T(0), P, S);
      softmax_rows(S, S, P, P);
      gemm(false, false, S, hd, S, T(1), P, S, q + 2 * dim, ld, T(0), ctx + b * S * dim + h * hd,
           dim);
    }
  });
}

template <class T>
void attention_backward(std::int64_t B, std::int64_t H, std::int64_t S, std::int64_t hd, T scale,
                        const T* qkv, const T* probs, const T* dctx, T* dprobs, T* dqkv) {
  const std::int64_t dim = H * hd, ld = 3 * dim;
  parallel_for(B * H, 2 * B * H * S * S * hd, [&](std::int64_t p0, std::int64_t p1) {
    for (std::int64_t p = p0; p < p1; ++p) {
      const std::int64_t b = p / H, h = p % H;
      const T* q = qkv + b * S * ld + h * hd;
      const T* k = q + dim;
      const T* v = q + 2 * dim;
      T* dq = dqkv + b * S * ld + h * hd;
      T* dk = dq + dim;
      T* dv = dq + 2 * dim;
      const T* P = probs + p * S * S;
      T* dP = dprobs + p * S * S;
      const T* dout = dctx + b * S * dim + h * hd;
#ifdef MOCA_CPU_SGEMM_AVX2
      if constexpr (std::is_same_v<T, float> || std::is_same_v<T, bf16>) {
        if (small_head::applies(S, hd)) {  // dprobs is not needed: dS stays in the scratch
          if (p + 1 < p1) {
            const std::int64_t nb = (p + 1) / H, nh = (p + 1) % H;
            for (int part = 0; part < 3; ++part) {
              small_head::prefetch_rows(S, hd, qkv + nb * S * ld + part * dim + nh * hd, ld);
              small_head::prefetch_rows(S, hd, dqkv + nb * S * ld + part * dim + nh * hd, ld);
            }
            small_head::prefetch_rows(S, hd, dctx + nb * S * dim + nh * hd, dim);
            small_head::prefetch_rows(S, S, probs + (p + 1) * S * S, S);
          }
          if constexpr (std::is_same_v<T, float>) {
            small_head::backward(S, hd, dim, scale, q, P, dout, dq);
          } else {
#ifdef MOCA_CPU_SGEMM_BF16_PAIRS
            small_head::backward_pairs(S, hd, dim, scale, q, P, dout, dq);
#else
            small_head::backward_bf16(S, hd, dim, scale, q, P, dout, dq);
#endif
          }
          continue;
        }
      }
#endif
      // o = P v:  dP = do · vᵀ,  dv = Pᵀ · do
      gemm(false, true, S, S, hd, T(1), dout, dim, v, ld, T(0), dP, S);
      gemm(true, false, S, hd, S, T(1), P, S, dout, dim, T(0), dv, ld);
      softmax_rows_backward(S, S, P, dP, dP);
      // S = q kᵀ · scale:  dq = dS · k · scale,  dk = dSᵀ · q · scale
      gemm(false, false, S, hd, S, scale, dP, S, k, ld, T(0), dq, ld);
      gemm(true, false, S, hd, S, scale, dP, S, q, ld, T(0), dk, ld);
    }
  });
}

}  // namespace moca::cpu
