// Float GEMM without packing, for the products of one attention head: operands of a few dozen
// rows that already sit in L1/L2, where the packed kernel of sgemm_avx2.hpp would spend as long
// copying them as multiplying, and where its 6×16 tile wastes up to half its lanes on a 17- or
// 30-token edge.
//
//   C[M, N] = α · A · B,   A(i, k) = a[i·ars + k·acs]   (any strides: A or Aᵀ stored row-major)
//                          B row-major [K, N] (ldb),    C row-major [M, N] (ldc),  N % 8 == 0
//
// The register tile is MR rows × NV vectors; each k loads NV vectors of B's row k and
// broadcasts MR values of A straight from memory. With AVX2 the vectors are ymm (4 × 3 or 6 × 2:
// 12 accumulators); where the compiler targets AVX-512 they are zmm (6 × 4, 8 × 3 or 12 × 2: 24
// of the 32 registers), and a column count that ends half way through a zmm vector is stored
// through a mask. Tiles run column block by column block; each block's K × NV-vector panel of B
// is first copied contiguous (K·N floats per product, against M·N·K multiply-adds), so that it
// stays in L1 across every row tile. A is never copied: its rows are read once per column block.
// Each element's sum runs over k in order, one FMA per k from zero, then × α, on the calling
// thread: the ymm and zmm builds give the same bits.
#pragma once

#include "moca/backend/cpu/sgemm_avx2.hpp"

#ifdef MOCA_CPU_SGEMM_AVX2

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <utility>

namespace moca::cpu::small_gemm {

// Per-target linker names, as in sgemm_avx2.hpp: the panel layout depends on the target.
#ifdef MOCA_CPU_SGEMM_AVX512
inline namespace zmm {
#else
inline namespace ymm {
#endif

template <int MR, int NV>
[[gnu::noinline]] void tile(std::int64_t K, const float* __restrict a, std::int64_t ars,
                            std::int64_t acs, const float* __restrict b, std::int64_t ldb,
                            float* __restrict c, std::int64_t ldc, float alpha) {
  __m256 acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_setzero_ps();
  for (std::int64_t k = 0; k < K; ++k, a += acs, b += ldb) {
    __m256 bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      bv[v] = _mm256_loadu_ps(b + 8 * v);
      // Keeps the row in a register: folded into each FMA as a memory operand, it would be
      // loaded MR times and the loop would wait on loads rather than FMAs.
      asm("" : "+x"(bv[v]));
    }
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m256 ak = _mm256_broadcast_ss(a + r * ars);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_fmadd_ps(ak, bv[v], acc[r][v]);
    }
  }
  const __m256 va = _mm256_set1_ps(alpha);
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) _mm256_storeu_ps(c + r * ldc + 8 * v, _mm256_mul_ps(va, acc[r][v]));
}

/// The tile height used with NV vectors: 12 accumulators (8 with one vector).
template <int NV>
inline constexpr int rows_for = NV == 3 ? 4 : NV == 2 ? 6 : 8;

/// Runs the tile of `rows` (1 … rows_for<NV>) rows and NV vectors.
template <int NV, int... R>
void tile_rows(std::integer_sequence<int, R...>, int rows, std::int64_t K, const float* a,
               std::int64_t ars, std::int64_t acs, const float* b, std::int64_t ldb, float* c,
               std::int64_t ldc, float alpha) {
  ((rows == R + 1 ? tile<R + 1, NV>(K, a, ars, acs, b, ldb, c, ldc, alpha) : void()), ...);
}

/// Copies B's K × 8·NV column block into `panel`, rows contiguous: B's rows are a head's slice
/// of a wide qkv row (a stride of 2,304 bytes at the tiny preset, 4,608 at ViT-S/16), whose
/// lines fall into a few L1 sets and evict one another before the next row tile reads them.
template <int NV>
void copy_panel(std::int64_t K, const float* b, std::int64_t ldb, float* panel) {
  for (std::int64_t k = 0; k < K; ++k, b += ldb, panel += 8 * NV)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) _mm256_store_ps(panel + 8 * v, _mm256_loadu_ps(b + 8 * v));
}

template <int NV>
void column_block(std::int64_t M, std::int64_t K, float alpha, const float* a, std::int64_t ars,
                  std::int64_t acs, const float* b, std::int64_t ldb, float* c, std::int64_t ldc,
                  float* panel) {
  constexpr int MR = rows_for<NV>;
  copy_panel<NV>(K, b, ldb, panel);
  for (std::int64_t i = 0; i < M; i += MR)
    tile_rows<NV>(std::make_integer_sequence<int, MR>{},
                  static_cast<int>(std::min<std::int64_t>(MR, M - i)), K, a + i * ars, ars, acs,
                  panel, 8 * NV, c + i * ldc, ldc, alpha);
}

#ifdef MOCA_CPU_SGEMM_AVX512
/// The 16-lane tile: MR rows × NV zmm vectors of a contiguous panel b (row stride 16·NV); the
/// last vector's columns are stored through `last`.
template <int MR, int NV>
[[gnu::noinline]] void tile16(std::int64_t K, const float* __restrict a, std::int64_t ars,
                              std::int64_t acs, const float* __restrict b, float* __restrict c,
                              std::int64_t ldc, float alpha, __mmask16 last) {
  __m512 acc[MR][NV];
#pragma GCC unroll 12
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  for (std::int64_t k = 0; k < K; ++k, a += acs, b += 16 * NV) {
    __m512 bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      bv[v] = _mm512_load_ps(b + 16 * v);
      asm("" : "+v"(bv[v]));  // as in tile: one load of the row, not MR
    }
#pragma GCC unroll 12
    for (int r = 0; r < MR; ++r) {
      const __m512 ak = _mm512_set1_ps(a[r * ars]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(ak, bv[v], acc[r][v]);
    }
  }
  const __m512 va = _mm512_set1_ps(alpha);
#pragma GCC unroll 12
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v + 1 < NV; ++v)
      _mm512_storeu_ps(c + r * ldc + 16 * v, _mm512_mul_ps(va, acc[r][v]));
    _mm512_mask_storeu_ps(c + r * ldc + 16 * (NV - 1), last, _mm512_mul_ps(va, acc[r][NV - 1]));
  }
}

/// The 16-lane tile height used with NV vectors: 24 accumulators (12 with one vector).
template <int NV>
inline constexpr int rows_for16 = NV == 4   ? 6
                                  : NV == 3 ? 8
                                            : 12;

template <int NV, int... R>
void tile16_rows(std::integer_sequence<int, R...>, int rows, std::int64_t K, const float* a,
                 std::int64_t ars, std::int64_t acs, const float* b, float* c, std::int64_t ldc,
                 float alpha, __mmask16 last) {
  ((rows == R + 1 ? tile16<R + 1, NV>(K, a, ars, acs, b, c, ldc, alpha, last) : void()), ...);
}

/// copy_panel for zmm vectors; the columns of the last vector outside `last` are zero (never
/// read from B).
template <int NV>
void copy_panel16(std::int64_t K, const float* b, std::int64_t ldb, float* panel, __mmask16 last) {
  for (std::int64_t k = 0; k < K; ++k, b += ldb, panel += 16 * NV) {
#pragma GCC unroll 4
    for (int v = 0; v + 1 < NV; ++v) _mm512_store_ps(panel + 16 * v, _mm512_loadu_ps(b + 16 * v));
    _mm512_store_ps(panel + 16 * (NV - 1), _mm512_maskz_loadu_ps(last, b + 16 * (NV - 1)));
  }
}

template <int NV>
void column_block16(std::int64_t M, std::int64_t K, float alpha, const float* a, std::int64_t ars,
                    std::int64_t acs, const float* b, std::int64_t ldb, float* c, std::int64_t ldc,
                    float* panel, __mmask16 last) {
  constexpr int MR = rows_for16<NV>;
  copy_panel16<NV>(K, b, ldb, panel, last);
  for (std::int64_t i = 0; i < M; i += MR)
    tile16_rows<NV>(std::make_integer_sequence<int, MR>{},
                    static_cast<int>(std::min<std::int64_t>(MR, M - i)), K, a + i * ars, ars, acs,
                    panel, c + i * ldc, ldc, alpha, last);
}

/// Floats of the `panel` scratch that gemm needs for an inner dimension K (64-byte aligned).
inline std::int64_t panel_floats(std::int64_t K) { return K * 64; }

/// Cuts N columns into blocks of up to 4 zmm vectors, split evenly (5 vectors run as 3 + 2), and
/// runs block.template operator()<NV>(j, last) for each: its first column j, its NV vectors, and
/// the lanes of its last vector that hold columns (N mod 16 of them in the last block).
template <class F>
void column_blocks16(std::int64_t N, F&& block) {
  const __mmask16 tail = N % 16 == 0 ? __mmask16(0xFFFF) : __mmask16((1u << (N % 16)) - 1);
  std::int64_t vectors = (N + 15) / 16;
  for (std::int64_t j = 0; vectors > 0;) {
    const std::int64_t blocks = (vectors + 3) / 4;
    const std::int64_t nv = (vectors + blocks - 1) / blocks;
    const __mmask16 last = nv == vectors ? tail : __mmask16(0xFFFF);
    if (nv == 4) {
      block.template operator()<4>(j, last);
    } else if (nv == 3) {
      block.template operator()<3>(j, last);
    } else if (nv == 2) {
      block.template operator()<2>(j, last);
    } else {
      block.template operator()<1>(j, last);
    }
    j += 16 * nv;
    vectors -= nv;
  }
}

/// C = α·A·B as the header describes; N must be a multiple of 8 and K > 0. `panel` is scratch
/// of panel_floats(K) floats, 64-byte aligned.
inline void gemm(std::int64_t M, std::int64_t N, std::int64_t K, float alpha, const float* a,
                 std::int64_t ars, std::int64_t acs, const float* b, std::int64_t ldb, float* c,
                 std::int64_t ldc, float* panel) {
  column_blocks16(N, [&]<int NV>(std::int64_t j, __mmask16 last) {
    column_block16<NV>(M, K, alpha, a, ars, acs, b + j, ldb, c + j, ldc, panel, last);
  });
}
#else
/// Floats of the `panel` scratch that gemm needs for an inner dimension K (32-byte aligned).
inline std::int64_t panel_floats(std::int64_t K) { return K * 24; }

/// C = α·A·B as the header describes; N must be a multiple of 8 and K > 0. `panel` is scratch
/// of panel_floats(K) floats, 32-byte aligned.
inline void gemm(std::int64_t M, std::int64_t N, std::int64_t K, float alpha, const float* a,
                 std::int64_t ars, std::int64_t acs, const float* b, std::int64_t ldb, float* c,
                 std::int64_t ldc, float* panel) {
  // Column blocks of 3 vectors, the ragged rest split evenly: 8 vectors run as 3 + 3 + 2,
  // 4 as 2 + 2 (not 3 + 1, whose one-vector tile loads as often as it multiplies).
  std::int64_t vectors = N / 8;
  for (std::int64_t j = 0; vectors > 0;) {
    const std::int64_t blocks = (vectors + 2) / 3;
    const std::int64_t nv = (vectors + blocks - 1) / blocks;
    if (nv == 3) {
      column_block<3>(M, K, alpha, a, ars, acs, b + j, ldb, c + j, ldc, panel);
    } else if (nv == 2) {
      column_block<2>(M, K, alpha, a, ars, acs, b + j, ldb, c + j, ldc, panel);
    } else {
      column_block<1>(M, K, alpha, a, ars, acs, b + j, ldb, c + j, ldc, panel);
    }
    j += 8 * nv;
    vectors -= nv;
  }
}

#endif

}  // namespace zmm or ymm
}  // namespace moca::cpu::small_gemm

#endif
