// Single-precision GEMM for x86-64 with AVX2 and FMA: packed panels and a 6×16 register-blocked
// micro-kernel (6×32 on zmm registers where the compiler targets AVX-512), in the loop structure
// of Goto and van de Geijn ("Anatomy of high-performance matrix multiplication", 2008) as BLIS
// organises it.
//
//   for each NC-column block of C        (packed B block, KC × NC, stays in L3)
//     for each KC slice of the inner dim  (packed once per slice)
//       for each MC-row block of C        (packed A block, MC × KC, stays in L2)
//         for each 16-column panel        (B micro-panel, KC × 16, stays in L1)
//           for each 6-row panel          -> micro-kernel: 12 ymm accumulators, 2 loads of B and
//                                            6 broadcasts of A per k, 12 FMAs
//
// With AVX-512 the column panels are 32 wide and the 12 accumulators zmm registers: twice the
// multiply-adds per instruction, which a core with full-width 512-bit FMA units runs at twice the
// rate. Every element of C is still the same chain of FMAs over k in the same order (the inner
// slices do not depend on the panel width), so both kernels give the same result to the bit.
//
// Packing reads op(A) and op(B) through their strides, so every transpose combination runs the
// same kernel at the same speed, and zero-pads ragged edges so the kernel always computes a full
// tile. Threads split C into disjoint rectangles (rows or columns, whichever packs less twice);
// each thread runs the serial algorithm on its own rectangle with its own buffers, so there is no
// barrier, and since an element's sum runs in the same order whatever its rectangle, the result
// is identical for every thread count.
//
// The operands A and B may also be bf16 (both): packing widens them to float as it copies them
// (exact), so a bf16 product is the float product of the same values with no conversion pass
// over the operands; C stays float.
//
// Only compiled where the compiler targets AVX2 and FMA (-march=native on such a CPU); gemm.hpp
// falls back to Eigen elsewhere and for double.
#pragma once

#if defined(__AVX2__) && defined(__FMA__) && !defined(__CUDACC__)
#define MOCA_CPU_SGEMM_AVX2 1

#include <immintrin.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <new>
#include <type_traits>

#include "moca/backend/cpu/parallel.hpp"
#include "moca/core/bf16.hpp"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace moca::cpu::sgemm_avx2 {

// The panel width, and with it the packed layout, depends on the instruction set the compiler
// targets. The inline namespace gives each build of these functions its own linker names, so
// that a program whose files are compiled for different targets links each file's GEMM whole
// (one file's packing can never feed another file's micro-kernel).
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(__AVX512BF16__)
#define MOCA_CPU_SGEMM_AVX512 1
#define MOCA_CPU_SGEMM_BF16_PAIRS 1
inline namespace zmm_bf16 {
#elif defined(__AVX512F__)
#define MOCA_CPU_SGEMM_AVX512 1
inline namespace zmm {
#else
inline namespace ymm {
#endif

inline constexpr std::int64_t kMR = 6;  // rows of the micro-tile
#ifdef MOCA_CPU_SGEMM_AVX512
inline constexpr std::int64_t kNR = 32;    // columns of the micro-tile: two zmm registers
inline constexpr std::int64_t kNC = 4096;  // columns of a packed B block
#else
inline constexpr std::int64_t kNR = 16;    // columns of the micro-tile: two ymm registers
inline constexpr std::int64_t kNC = 4080;  // columns of a packed B block
#endif
inline constexpr std::int64_t kKC = 256;  // inner-dimension slice: B micro-panels of 16/32 KiB
inline constexpr std::int64_t kMC = 168;  // rows of a packed A block: 168 KiB of a 512 KiB L2

/// A 64-byte aligned float buffer that only grows, one per thread: after the first GEMM of each
/// shape class a training step packs into memory it already owns.
class PackBuffer {
 public:
  PackBuffer() = default;
  PackBuffer(const PackBuffer&) = delete;
  PackBuffer& operator=(const PackBuffer&) = delete;
  ~PackBuffer() { std::free(data_); }

  float* reserve(std::int64_t floats) {
    if (floats > capacity_) {
      std::free(data_);
      const std::size_t bytes = (static_cast<std::size_t>(floats) * sizeof(float) + 63) / 64 * 64;
      data_ = static_cast<float*>(std::aligned_alloc(64, bytes));
      if (data_ == nullptr) {
        capacity_ = 0;
        throw std::bad_alloc();
      }
      capacity_ = floats;
    }
    return data_;
  }

 private:
  float* data_ = nullptr;
  std::int64_t capacity_ = 0;
};

struct ThreadBuffers {
  PackBuffer a, b;
};

inline ThreadBuffers& thread_buffers() {
  thread_local ThreadBuffers buffers;
  return buffers;
}

/// Transposes the 8×8 block held in r[0..7] (row i in r[i]) in place.
inline void transpose8(__m256 r[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(u0, u4, 0x20);
  r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
  r[2] = _mm256_permute2f128_ps(u2, u6, 0x20);
  r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
  r[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
  r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
  r[6] = _mm256_permute2f128_ps(u2, u6, 0x31);
  r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

/// 8 values from p as floats (bf16 widened: its 16 bits above 16 zero bits, exact).
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const bf16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/// The lanes of `mask` (a prefix of n lanes) from p, zeros in the others; nothing past them is
/// read.
inline __m256 load_prefix(const float* p, __m256i mask, std::int64_t) {
  return _mm256_maskload_ps(p, mask);
}
inline __m256 load_prefix(const bf16* p, __m256i, std::int64_t n) {
  alignas(32) float v[8] = {};
  for (std::int64_t i = 0; i < n; ++i) v[i] = p[i];
  return _mm256_load_ps(v);
}

/// How many rows ahead the transposed packing of A prefetches the stored rows it reads next.
inline constexpr std::int64_t kPrefetchRows = 4;

/// Floats between the end of one packed panel and the start of the next. Panels kc long would
/// otherwise start a multiple of 4 KiB apart or nearly (6·256 floats for A, 32·kc for B): the
/// transposed packing of A stores into every panel of the block at each k, and with that
/// stride all the lines it writes fall into two of L1's 64 sets and evict one another; `perf`
/// put a third of a weight-gradient product in that packing. One line of padding spreads them
/// over every set. It also takes the 2 lanes by which pack_a's 8-wide stores overrun a panel.
inline constexpr std::int64_t kPanelPad = 16;

/// Floats from one packed A panel (`rows` rows, kc long) to the next, and from one B panel (kNR
/// columns) to the next: multiples of 16, so B's panels stay 64-byte aligned.
inline std::int64_t a_panel_stride(std::int64_t kc, std::int64_t rows = kMR) {
  return rows * kc + kPanelPad;
}
inline std::int64_t b_panel_stride(std::int64_t kc) { return kNR * kc + kPanelPad; }

/// Packs rows [i0, i0+mc) × inner [k0, k0+kc) of op(A) into 6-row panels a_panel_stride(kc)
/// apart: panel p holds, for each k, the 6 values op(A)(i0+6p+r, k0+k) contiguously; rows past
/// mc are zero.
template <class S>
void pack_a(const S* A, std::int64_t lda, bool trans, std::int64_t i0, std::int64_t mc,
            std::int64_t k0, std::int64_t kc, float* out) {
  if (trans) {  // A is stored [K, M]: the 6 values of one k are contiguous
    // Row by row of the stored A, so that each row's mc values are read once and in order
    // (panel by panel, every k would be a new cache line, and a panel's lines would be evicted
    // before the next panel reads them again). Each panel gets one 8-wide store per k whose 2
    // extra lanes land in the panel's next k, stored afterwards, or, at the last k, in the
    // padding after the panel.
    const std::int64_t panels = (mc + kMR - 1) / kMR, stride = a_panel_stride(kc);
    const __m256i six = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(kMR)),
                                           _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    const __m256i ragged = _mm256_cmpgt_epi32(
        _mm256_set1_epi32(static_cast<int>(mc - (panels - 1) * kMR)),
        _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    // Panels whose 8-wide load stays inside the block's mc values read without a mask.
    const std::int64_t plain = mc >= 8 ? (mc - 8) / kMR + 1 : 0;
    const std::int64_t ragged_rows = mc - (panels - 1) * kMR;
    for (std::int64_t k = 0; k < kc; ++k) {
      const S* src = A + (k0 + k) * lda + i0;
      float* dst = out + k * kMR;
      if (k + kPrefetchRows < kc) {
        const char* ahead = reinterpret_cast<const char*>(src + kPrefetchRows * lda);
        for (std::int64_t b = 0; b < mc * std::int64_t(sizeof(S)); b += 64)
          _mm_prefetch(ahead + b, _MM_HINT_T0);
      }
      for (std::int64_t p = 0; p < panels; ++p) {
        const bool last = p + 1 == panels;
        const __m256 v = p < plain ? load8(src + p * kMR)
                                   : load_prefix(src + p * kMR, last ? ragged : six,
                                                 last ? ragged_rows : kMR);
        _mm256_storeu_ps(dst + p * stride, v);
      }
    }
    return;
  }
  for (std::int64_t p = 0; p < mc; p += kMR) {
    const std::int64_t rows = std::min(kMR, mc - p);
    float* dst = out + p / kMR * a_panel_stride(kc);
    // A is stored [M, K]: the 6 rows are read side by side, 8 values of k at a time, and
    // transposed in registers (two zero rows pad the 8×8 block). Each k's 8-wide store spills 2
    // values into the next k's slot, which the next store overwrites; the last spills into the
    // padding past the panel.
    const S* src[kMR];
    for (std::int64_t r = 0; r < kMR; ++r) src[r] = A + (i0 + p + std::min(r, rows - 1)) * lda + k0;
    // The next panel's rows are asked for while this one is transposed, a line of each per 64
    // bytes read here: rows only kc long are too short a stream for the hardware prefetcher.
    const std::int64_t next_rows = std::min(kMR, mc - p - kMR);
    const S* next = A + (i0 + p + kMR) * lda + k0;
    constexpr std::int64_t kLine = 64 / sizeof(S);
    std::int64_t k = 0;
    for (; k + 8 <= kc; k += 8) {
      if (k % kLine == 0)
        for (std::int64_t r = 0; r < next_rows; ++r)
          _mm_prefetch(reinterpret_cast<const char*>(next + r * lda + k), _MM_HINT_T0);
      __m256 v[8];
      for (std::int64_t r = 0; r < kMR; ++r)
        v[r] = r < rows ? load8(src[r] + k) : _mm256_setzero_ps();
      v[6] = v[7] = _mm256_setzero_ps();
      transpose8(v);
      for (std::int64_t j = 0; j < 8; ++j) _mm256_storeu_ps(dst + (k + j) * kMR, v[j]);
    }
    for (; k < kc; ++k)
      for (std::int64_t r = 0; r < kMR; ++r) dst[k * kMR + r] = r < rows ? float(src[r][k]) : 0.0f;
  }
}

/// Packs inner [k0, k0+kc) × columns [j0, j0+nc) of op(B) into kNR-column panels
/// b_panel_stride(kc) apart: panel q holds, for each k, the kNR values op(B)(k0+k, j0+kNR·q+c)
/// contiguously; columns past nc are zero.
template <class S>
void pack_b(const S* B, std::int64_t ldb, bool trans, std::int64_t k0, std::int64_t kc,
            std::int64_t j0, std::int64_t nc, float* out) {
  if (!trans) {  // B is stored [K, N]: the kNR values of one k are contiguous
    // Row by row of the stored B, each row's nc values read once and in order (as pack_a).
    const std::int64_t full = nc / kNR, cols = nc - full * kNR, stride = b_panel_stride(kc);
    for (std::int64_t k = 0; k < kc; ++k) {
      const S* src = B + (k0 + k) * ldb + j0;
      float* dst = out + k * kNR;
      for (std::int64_t q = 0; q < full; ++q)
        for (std::int64_t c = 0; c < kNR; c += 8)
          _mm256_store_ps(dst + q * stride + c, load8(src + q * kNR + c));
      if (cols > 0) {
        float* d = dst + full * stride;
        std::int64_t c = 0;
        for (; c < cols; ++c) d[c] = src[full * kNR + c];
        for (; c < kNR; ++c) d[c] = 0.0f;
      }
    }
    return;
  }
  for (std::int64_t q = 0; q < nc; q += kNR) {
    const std::int64_t cols = std::min(kNR, nc - q);
    float* dst = out + q / kNR * b_panel_stride(kc);
    // B is stored [N, K]: each column of op(B) is contiguous along k. Groups of 8 columns, read
    // 8 values of k at a time and transposed in registers.
    for (std::int64_t c0 = 0; c0 < kNR; c0 += 8) {
      const S* src[8];
      for (std::int64_t c = 0; c < 8; ++c)
        src[c] = B + (j0 + q + std::min(c0 + c, cols - 1)) * ldb + k0;
      std::int64_t k = 0;
      for (; k + 8 <= kc; k += 8) {
        __m256 v[8];
        for (std::int64_t c = 0; c < 8; ++c)
          v[c] = c0 + c < cols ? load8(src[c] + k) : _mm256_setzero_ps();
        transpose8(v);
        for (std::int64_t j = 0; j < 8; ++j) _mm256_store_ps(dst + (k + j) * kNR + c0, v[j]);
      }
      for (; k < kc; ++k)
        for (std::int64_t c = 0; c < 8; ++c)
          dst[k * kNR + c0 + c] = c0 + c < cols ? float(src[c][k]) : 0.0f;
    }
  }
}

/// How the kernel combines its product P with C.
enum class Update { Overwrite, Accumulate, Scale };  // C = αP, C += αP, C = αP + βC

#ifdef MOCA_CPU_SGEMM_AVX512
/// C[0:m, 0:n] (row stride ldc) ← α·P combined per `update`, where P's row r is acc[r][0..1]
/// (m ≤ MR), plus bias[0:n] on every row when `bias` is not null. Masked loads and stores keep a
/// ragged tile inside [0, m) × [0, n) with the same arithmetic as a full one. With `out`, the
/// result goes there instead, rounded to bf16 (row stride ldo), and C is only read.
template <std::int64_t MR>
[[gnu::noinline]] void store_tile(const __m512 (&acc)[MR][2], float* c, std::int64_t ldc,
                                  std::int64_t m, std::int64_t n, float alpha, float beta,
                                  Update update, const float* bias, bf16* out, std::int64_t ldo) {
  const __m512 va = _mm512_set1_ps(alpha), vb = _mm512_set1_ps(beta);
  const auto prefix = [](std::int64_t k) -> __mmask16 {
    return k >= 16 ? __mmask16(0xFFFF) : k <= 0 ? __mmask16(0) : __mmask16((1u << k) - 1);
  };
  const __mmask16 lo_mask = prefix(n), hi_mask = prefix(n - 16);
  const __m512 bias_lo = bias ? _mm512_maskz_loadu_ps(lo_mask, bias) : _mm512_setzero_ps();
  const __m512 bias_hi = bias ? _mm512_maskz_loadu_ps(hi_mask, bias + 16) : _mm512_setzero_ps();
  for (std::int64_t r = 0; r < m; ++r) {
    float* row = c + r * ldc;
    __m512 lo = _mm512_fmadd_ps(acc[r][0], va, bias_lo);
    __m512 hi = _mm512_fmadd_ps(acc[r][1], va, bias_hi);
    if (update == Update::Accumulate) {
      lo = _mm512_add_ps(lo, _mm512_maskz_loadu_ps(lo_mask, row));
      hi = _mm512_add_ps(hi, _mm512_maskz_loadu_ps(hi_mask, row + 16));
    } else if (update == Update::Scale) {
      lo = _mm512_fmadd_ps(vb, _mm512_maskz_loadu_ps(lo_mask, row), lo);
      hi = _mm512_fmadd_ps(vb, _mm512_maskz_loadu_ps(hi_mask, row + 16), hi);
    }
    if (out != nullptr) {
      bf16* o = out + r * ldo;
      _mm512_mask_cvtepi32_storeu_epi16(o, lo_mask, bf16_bits16(lo));
      _mm512_mask_cvtepi32_storeu_epi16(o + 16, hi_mask, bf16_bits16(hi));
      continue;
    }
    _mm512_mask_storeu_ps(row, lo_mask, lo);
    _mm512_mask_storeu_ps(row + 16, hi_mask, hi);
  }
}

/// Starts fetching the m rows of a 32-column tile of C, which a kernel reads (or writes) after
/// its loop.
inline void prefetch_tile(const float* c, std::int64_t ldc, std::int64_t m) {
  for (std::int64_t r = 0; r < m; ++r) {
    _mm_prefetch(reinterpret_cast<const char*>(c + r * ldc), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(c + r * ldc + 16), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(c + r * ldc + kNR - 1), _MM_HINT_T0);
  }
}

/// How many rows of C's tile a kernel fetches: none where the tile is only written, rounded,
/// into `out` (fetching out's rows instead made no difference). (A row count, not an early
/// return in prefetch_tile: with that `return`, GCC 12 dropped the kernels' prefetches of C
/// altogether.)
inline std::int64_t rows_read(std::int64_t m, Update update, const bf16* out) {
  return out != nullptr && update == Update::Overwrite ? 0 : m;
}

/// C[0:m, 0:n] (row stride ldc) ← α · Ap·Bp combined per `update` (+ bias[0:n] when not null),
/// where Ap is one packed 6-row panel and Bp one packed 32-column panel, both kc long: 12 zmm
/// accumulators, 2 rows of B and a broadcast of A per multiply-add pair.
[[gnu::noinline]] inline void micro_kernel(std::int64_t kc, const float* __restrict a,
                                           const float* __restrict b, float* c, std::int64_t ldc,
                                           std::int64_t m, std::int64_t n, float alpha, float beta,
                                           Update update, const float* bias, bf16* out,
                                           std::int64_t ldo) {
  __m512 acc[kMR][2];
#pragma GCC unroll 6
  for (std::int64_t r = 0; r < kMR; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  prefetch_tile(c, ldc, rows_read(m, update, out));
#pragma GCC unroll 4
  for (std::int64_t k = 0; k < kc; ++k, a += kMR, b += kNR) {
    const __m512 b0 = _mm512_load_ps(b), b1 = _mm512_load_ps(b + 16);
#pragma GCC unroll 6
    for (std::int64_t r = 0; r < kMR; ++r) {
      const __m512 ak = _mm512_set1_ps(a[r]);
      acc[r][0] = _mm512_fmadd_ps(ak, b0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(ak, b1, acc[r][1]);
    }
  }
  store_tile(acc, c, ldc, m, n, alpha, beta, update, bias, out, ldo);
}
#else
/// C[0:m, 0:n] (row stride ldc) ← α·P combined per `update`, where P's row r is acc[r][0..1],
/// plus bias[0:n] on every row when `bias` is not null; with `out`, each row of the result is
/// also rounded into out (row stride ldo) as it is stored (C may then be null if not read).
[[gnu::noinline]] inline void store_tile(const __m256 (&acc)[kMR][2], float* c, std::int64_t ldc,
                                         std::int64_t m, std::int64_t n, float alpha, float beta,
                                         Update update, const float* bias, bf16* out,
                                         std::int64_t ldo) {
  const __m256 va = _mm256_set1_ps(alpha), vb = _mm256_set1_ps(beta);
  alignas(32) float scratch[kNR] = {};  // the row on its way to `out` when C is null
  if (m == kMR && n == kNR) {
    const __m256 bias_lo = bias ? _mm256_loadu_ps(bias) : _mm256_setzero_ps();
    const __m256 bias_hi = bias ? _mm256_loadu_ps(bias + 8) : _mm256_setzero_ps();
    for (std::int64_t r = 0; r < kMR; ++r) {
      float* row = c != nullptr ? c + r * ldc : scratch;
      __m256 lo = _mm256_fmadd_ps(acc[r][0], va, bias_lo);
      __m256 hi = _mm256_fmadd_ps(acc[r][1], va, bias_hi);
      if (update == Update::Accumulate) {
        lo = _mm256_add_ps(lo, _mm256_loadu_ps(row));
        hi = _mm256_add_ps(hi, _mm256_loadu_ps(row + 8));
      } else if (update == Update::Scale) {
        lo = _mm256_fmadd_ps(vb, _mm256_loadu_ps(row), lo);
        hi = _mm256_fmadd_ps(vb, _mm256_loadu_ps(row + 8), hi);
      }
      _mm256_storeu_ps(row, lo);
      _mm256_storeu_ps(row + 8, hi);
      if (out != nullptr) narrow_to_bf16(kNR, row, out + r * ldo);
    }
    return;
  }
  // A ragged tile: the same operations on masked lanes, so that its elements round exactly as a
  // full tile's (and as the zmm kernel's); C is never touched outside [0, m) × [0, n).
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i lo_mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), lanes);
  const __m256i hi_mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n - 8)), lanes);
  const __m256 bias_lo = bias ? _mm256_maskload_ps(bias, lo_mask) : _mm256_setzero_ps();
  const __m256 bias_hi = bias ? _mm256_maskload_ps(bias + 8, hi_mask) : _mm256_setzero_ps();
  for (std::int64_t r = 0; r < m; ++r) {
    float* row = c != nullptr ? c + r * ldc : scratch;
    __m256 lo = _mm256_fmadd_ps(acc[r][0], va, bias_lo);
    __m256 hi = _mm256_fmadd_ps(acc[r][1], va, bias_hi);
    if (update == Update::Accumulate) {
      lo = _mm256_add_ps(lo, _mm256_maskload_ps(row, lo_mask));
      hi = _mm256_add_ps(hi, _mm256_maskload_ps(row + 8, hi_mask));
    } else if (update == Update::Scale) {
      lo = _mm256_fmadd_ps(vb, _mm256_maskload_ps(row, lo_mask), lo);
      hi = _mm256_fmadd_ps(vb, _mm256_maskload_ps(row + 8, hi_mask), hi);
    }
    _mm256_maskstore_ps(row, lo_mask, lo);
    _mm256_maskstore_ps(row + 8, hi_mask, hi);
    if (out != nullptr) narrow_to_bf16(n, row, out + r * ldo);
  }
}

/// C[0:m, 0:n] (row stride ldc) ← α · Ap·Bp combined per `update` (+ bias[0:n] when not null),
/// where Ap is one packed 6-row panel and Bp one packed 16-column panel, both kc long. Kept out of line so that its loop
/// gets all 16 ymm registers: 12 accumulators, 2 rows of B, 1 broadcast of A.
[[gnu::noinline]] inline void micro_kernel(std::int64_t kc, const float* __restrict a,
                                           const float* __restrict b, float* c, std::int64_t ldc,
                                           std::int64_t m, std::int64_t n, float alpha, float beta,
                                           Update update, const float* bias, bf16* out,
                                           std::int64_t ldo) {
  __m256 c00 = _mm256_setzero_ps(), c01 = _mm256_setzero_ps();
  __m256 c10 = _mm256_setzero_ps(), c11 = _mm256_setzero_ps();
  __m256 c20 = _mm256_setzero_ps(), c21 = _mm256_setzero_ps();
  __m256 c30 = _mm256_setzero_ps(), c31 = _mm256_setzero_ps();
  __m256 c40 = _mm256_setzero_ps(), c41 = _mm256_setzero_ps();
  __m256 c50 = _mm256_setzero_ps(), c51 = _mm256_setzero_ps();
  // C's tile is read (or written) after the loop: start fetching its rows now.
  for (std::int64_t r = 0; r < m; ++r) {
    _mm_prefetch(reinterpret_cast<const char*>(c + r * ldc), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(c + r * ldc + kNR - 1), _MM_HINT_T0);
  }
#pragma GCC unroll 4
  for (std::int64_t k = 0; k < kc; ++k, a += kMR, b += kNR) {
    const __m256 b0 = _mm256_load_ps(b), b1 = _mm256_load_ps(b + 8);
    __m256 ak = _mm256_broadcast_ss(a + 0);
    c00 = _mm256_fmadd_ps(ak, b0, c00);
    c01 = _mm256_fmadd_ps(ak, b1, c01);
    ak = _mm256_broadcast_ss(a + 1);
    c10 = _mm256_fmadd_ps(ak, b0, c10);
    c11 = _mm256_fmadd_ps(ak, b1, c11);
    ak = _mm256_broadcast_ss(a + 2);
    c20 = _mm256_fmadd_ps(ak, b0, c20);
    c21 = _mm256_fmadd_ps(ak, b1, c21);
    ak = _mm256_broadcast_ss(a + 3);
    c30 = _mm256_fmadd_ps(ak, b0, c30);
    c31 = _mm256_fmadd_ps(ak, b1, c31);
    ak = _mm256_broadcast_ss(a + 4);
    c40 = _mm256_fmadd_ps(ak, b0, c40);
    c41 = _mm256_fmadd_ps(ak, b1, c41);
    ak = _mm256_broadcast_ss(a + 5);
    c50 = _mm256_fmadd_ps(ak, b0, c50);
    c51 = _mm256_fmadd_ps(ak, b1, c51);
  }
  const __m256 acc[kMR][2] = {{c00, c01}, {c10, c11}, {c20, c21},
                              {c30, c31}, {c40, c41}, {c50, c51}};
  store_tile(acc, c, ldc, m, n, alpha, beta, update, bias, out, ldo);
}
#endif

/// Splits `n` into the number of blocks nearest n / `target` (at least one), of equal size
/// rounded up to a multiple of `unit`: a 192-row C is one block of 192 rather than 168 + 24,
/// whose second block would reuse each packed B panel for only 4 rows of tiles.
inline std::int64_t balanced_block(std::int64_t n, std::int64_t target, std::int64_t unit) {
  const std::int64_t blocks = std::max<std::int64_t>(1, (n + target / 2) / target);
  const std::int64_t size = (n + blocks - 1) / blocks;
  return (size + unit - 1) / unit * unit;
}

/// Whether an inner dimension of K is packed as one slice (so a product with a rounded `out`
/// and β = 0 never touches its float C).
inline bool one_inner_slice(std::int64_t K) { return balanced_block(K, kKC, 8) >= K; }

#ifdef MOCA_CPU_SGEMM_BF16_PAIRS
// bf16 operands on the AVX-512 BF16 dot product. vdpbf16ps adds to each float lane the
// products of two pairs of bf16, the odd (high) element's product first, each step rounded as an
// FMA rounds (the product of two bf16 is exact in float). So with op(A)(i, k) and op(B)(k, j) in
// the high halves of a pair and their k + 1 values in the low halves, one instruction is steps k
// and k + 1 of the widening kernel's FMA chain, in that order: the same bits, at twice the
// multiply-adds per instruction. (It flushes subnormal inputs and results to zero, which the FMA
// chain keeps: sums below 2^-126 in magnitude can differ.) Packed pairs are 32-bit words: A's
// panel holds for each pair j the 6 words (op(A)(i, 2j), op(A)(i, 2j+1)), B's the 32 words
// (op(B)(2j, c), op(B)(2j+1, c)); an odd kc pairs its last k with zero. Panels are kp = ⌈kc/2⌉
// words long and a_panel_stride(kp, kMRPairs) / b_panel_stride(kp) apart. The tile has 8 rows,
// not 6: 16 accumulators hide the instruction's latency where 12 do not (one core, operands in
// L1: 537 against 466–477 GFLOP/s, of a 543 peak), and a panel's 8 words fill one ymm store.

/// Rows of the bf16 pair kernel's tile and of its packed A panels.
inline constexpr std::int64_t kMRPairs = 8;

/// Each 32-bit word with its two bf16 halves swapped: from memory order (k, k+1) to pair order.
inline __m256i swap_halves(__m256i v) { return _mm256_ror_epi32(v, 16); }

/// Pair words from n ≤ 8 values of x (high halves) and of y (low halves; zero if y is null);
/// words past n are zero, and nothing past n is read.
inline __m256i pair_words8(const bf16* x, const bf16* y, __mmask8 n_mask) {
  const __m256i hi = _mm256_cvtepu16_epi32(_mm_maskz_loadu_epi16(n_mask, x));
  const __m256i lo = y != nullptr ? _mm256_cvtepu16_epi32(_mm_maskz_loadu_epi16(n_mask, y))
                                  : _mm256_setzero_si256();
  return _mm256_or_si256(_mm256_slli_epi32(hi, 16), lo);
}
inline __m512i pair_words16(const bf16* x, const bf16* y, __mmask16 n_mask) {
  // Zero-masked forms with every lane selected: see bf16_bits16.
  const __m512i hi = _mm512_maskz_cvtepu16_epi32(0xFFFF, _mm256_maskz_loadu_epi16(n_mask, x));
  const __m512i lo = y != nullptr
                         ? _mm512_maskz_cvtepu16_epi32(0xFFFF, _mm256_maskz_loadu_epi16(n_mask, y))
                         : _mm512_setzero_si512();
  return _mm512_or_si512(_mm512_maskz_slli_epi32(0xFFFF, hi, 16), lo);
}

/// The first n lanes of a 16- or 8-lane mask.
inline __mmask16 prefix16(std::int64_t n) {
  return n >= 16 ? __mmask16(0xFFFF) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1);
}

/// Eight vectors, one per stored line (row of A or column of B, contiguous along k; null for
/// a zero line), each 8 pairs from k: up to 16 values of k, zeros past kc; transposed so that
/// v[j] holds pair k/2 + j of the 8 lines.
inline void load_pairs_transposed(const bf16* const (&line)[8], std::int64_t k, std::int64_t kc,
                                  __m256 (&v)[8]) {
  const __mmask16 mask = prefix16(kc - k);
  for (int r = 0; r < 8; ++r)
    v[r] = line[r] != nullptr
               ? _mm256_castsi256_ps(swap_halves(_mm256_maskz_loadu_epi16(mask, line[r] + k)))
               : _mm256_setzero_ps();
  transpose8(v);
}

/// pack_a for bf16 pairs: rows [i0, i0+mc) × inner [k0, k0+kc) of op(A).
inline void pack_a_pairs(const bf16* A, std::int64_t lda, bool trans, std::int64_t i0,
                         std::int64_t mc, std::int64_t k0, std::int64_t kc, std::uint32_t* out) {
  constexpr std::int64_t kR = kMRPairs;
  const std::int64_t kp = (kc + 1) / 2, stride = a_panel_stride(kp, kR);
  const std::int64_t panels = (mc + kR - 1) / kR;
  if (trans) {  // A is stored [K, M]: two stored rows give one pair per i
    // As pack_a: row pair by row pair, one 8-word store per panel.
    for (std::int64_t j = 0; j < kp; ++j) {
      const bf16* x = A + (k0 + 2 * j) * lda + i0;
      const bf16* y = 2 * j + 1 < kc ? x + lda : nullptr;
      if (2 * j + 2 * kPrefetchRows < kc) {
        const char* ahead = reinterpret_cast<const char*>(x + 2 * kPrefetchRows * lda);
        for (std::int64_t b = 0; b < mc * std::int64_t(sizeof(bf16)); b += 64) {
          _mm_prefetch(ahead + b, _MM_HINT_T0);
          _mm_prefetch(ahead + lda * std::int64_t(sizeof(bf16)) + b, _MM_HINT_T0);
        }
      }
      std::uint32_t* dst = out + j * kR;
      for (std::int64_t p = 0; p < panels; ++p) {
        const __mmask8 n = static_cast<__mmask8>(prefix16(std::min(kR, mc - p * kR)));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + p * stride),
                            pair_words8(x + p * kR, y ? y + p * kR : nullptr, n));
      }
    }
    return;
  }
  // A is stored [M, K]: the 8 rows side by side, 16 values of k at a time, transposed in
  // registers (null rows past mc give zeros).
  for (std::int64_t p = 0; p < panels; ++p) {
    const std::int64_t rows = std::min(kR, mc - p * kR);
    std::uint32_t* dst = out + p * stride;
    const bf16* line[8] = {};
    for (std::int64_t r = 0; r < rows; ++r) line[r] = A + (i0 + p * kR + r) * lda + k0;
    // As pack_a: the next panel's rows are asked for, a line of each per 64 bytes read here.
    const std::int64_t next_rows = std::min(kR, mc - (p + 1) * kR);
    const bf16* next = A + (i0 + (p + 1) * kR) * lda + k0;
    for (std::int64_t k = 0; k < kc; k += 16) {
      if (k % 32 == 0)
        for (std::int64_t r = 0; r < next_rows; ++r)
          _mm_prefetch(reinterpret_cast<const char*>(next + r * lda + k), _MM_HINT_T0);
      __m256 v[8];
      load_pairs_transposed(line, k, kc, v);
      const std::int64_t pairs = std::min<std::int64_t>(8, (kc - k + 1) / 2);
      for (std::int64_t j = 0; j < pairs; ++j)
        _mm256_storeu_ps(reinterpret_cast<float*>(dst + (k / 2 + j) * kR), v[j]);
    }
  }
}

/// pack_b for bf16 pairs: inner [k0, k0+kc) × columns [j0, j0+nc) of op(B).
inline void pack_b_pairs(const bf16* B, std::int64_t ldb, bool trans, std::int64_t k0,
                         std::int64_t kc, std::int64_t j0, std::int64_t nc, std::uint32_t* out) {
  const std::int64_t kp = (kc + 1) / 2, stride = b_panel_stride(kp);
  if (!trans) {  // B is stored [K, N]: two stored rows give one pair per column
    for (std::int64_t j = 0; j < kp; ++j) {
      const bf16* x = B + (k0 + 2 * j) * ldb + j0;
      const bf16* y = 2 * j + 1 < kc ? x + ldb : nullptr;
      // A weight gradient's B is the activations, kc rows read once: asked for kPrefetchRows
      // row pairs ahead, as the transposed packing of A does.
      if (2 * j + 2 * kPrefetchRows + 1 < kc) {
        const char* ahead = reinterpret_cast<const char*>(x + 2 * kPrefetchRows * ldb);
        for (std::int64_t b = 0; b < nc * std::int64_t(sizeof(bf16)); b += 64) {
          _mm_prefetch(ahead + b, _MM_HINT_T0);
          _mm_prefetch(ahead + ldb * std::int64_t(sizeof(bf16)) + b, _MM_HINT_T0);
        }
      }
      for (std::int64_t c = 0; c < nc; c += 16) {
        std::uint32_t* d = out + c / kNR * stride + j * kNR + c % kNR;
        _mm512_store_si512(d, pair_words16(x + c, y ? y + c : nullptr, prefix16(nc - c)));
      }
      if (nc % kNR != 0 && nc % kNR <= 16)  // the last panel's second half: zeros
        _mm512_store_si512(out + nc / kNR * stride + j * kNR + 16, _mm512_setzero_si512());
    }
    return;
  }
  // B is stored [N, K]: each column of op(B) contiguous along k; groups of 8 columns, 16 values
  // of k at a time, transposed in registers.
  for (std::int64_t q = 0; q < nc; q += kNR) {
    const std::int64_t cols = std::min(kNR, nc - q);
    std::uint32_t* dst = out + q / kNR * stride;
    for (std::int64_t c0 = 0; c0 < kNR; c0 += 8) {
      const bf16* line[8] = {};
      for (std::int64_t c = 0; c < 8 && c0 + c < cols; ++c)
        line[c] = B + (j0 + q + c0 + c) * ldb + k0;
      for (std::int64_t k = 0; k < kc; k += 16) {
        __m256 v[8];
        load_pairs_transposed(line, k, kc, v);
        const std::int64_t pairs = std::min<std::int64_t>(8, (kc - k + 1) / 2);
        for (std::int64_t j = 0; j < pairs; ++j)
          _mm256_store_ps(reinterpret_cast<float*>(dst + (k / 2 + j) * kNR + c0), v[j]);
      }
    }
  }
}

/// micro_kernel over kp packed pairs and an 8-row panel of A: 16 zmm accumulators, 2 rows of B
/// pairs and a broadcast pair of A per two dot-product instructions.
[[gnu::noinline]] inline void micro_kernel_pairs(std::int64_t kp, const std::uint32_t* __restrict a,
                                                 const std::uint32_t* __restrict b, float* c,
                                                 std::int64_t ldc, std::int64_t m, std::int64_t n,
                                                 float alpha, float beta, Update update,
                                                 const float* bias, bf16* out, std::int64_t ldo) {
  __m512 acc[kMRPairs][2];
#pragma GCC unroll 8
  for (std::int64_t r = 0; r < kMRPairs; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  prefetch_tile(c, ldc, rows_read(m, update, out));
#pragma GCC unroll 4
  for (std::int64_t j = 0; j < kp; ++j, a += kMRPairs, b += kNR) {
    const __m512bh b0 = (__m512bh)_mm512_load_si512(b), b1 = (__m512bh)_mm512_load_si512(b + 16);
#pragma GCC unroll 8
    for (std::int64_t r = 0; r < kMRPairs; ++r) {
      const __m512bh ak = (__m512bh)_mm512_set1_epi32(static_cast<int>(a[r]));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], ak, b0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], ak, b1);
    }
  }
  store_tile(acc, c, ldc, m, n, alpha, beta, update, bias, out, ldo);
}
#endif

/// pack_a, or pack_a_pairs for bf16 where the pair kernel runs.
template <class S>
void pack_a_for_kernel(const S* A, std::int64_t lda, bool trans, std::int64_t i0, std::int64_t mc,
                       std::int64_t k0, std::int64_t kc, float* out) {
#ifdef MOCA_CPU_SGEMM_BF16_PAIRS
  if constexpr (std::is_same_v<S, bf16>)
    return pack_a_pairs(A, lda, trans, i0, mc, k0, kc, reinterpret_cast<std::uint32_t*>(out));
#endif
  pack_a(A, lda, trans, i0, mc, k0, kc, out);
}

/// pack_b, or pack_b_pairs for bf16 where the pair kernel runs.
template <class S>
void pack_b_for_kernel(const S* B, std::int64_t ldb, bool trans, std::int64_t k0, std::int64_t kc,
                       std::int64_t j0, std::int64_t nc, float* out) {
#ifdef MOCA_CPU_SGEMM_BF16_PAIRS
  if constexpr (std::is_same_v<S, bf16>)
    return pack_b_pairs(B, ldb, trans, k0, kc, j0, nc, reinterpret_cast<std::uint32_t*>(out));
#endif
  pack_b(B, ldb, trans, k0, kc, j0, nc, out);
}

/// The serial algorithm on the rectangle [m0, m1) × [n0, n1) of C; `bias` (indexed by column
/// of C, or null) is added with the first inner slice.
template <class S>
void gemm_block(bool trans_a, bool trans_b, std::int64_t m0, std::int64_t m1, std::int64_t n0,
                std::int64_t n1, std::int64_t K, float alpha, const S* A, std::int64_t lda,
                const S* B, std::int64_t ldb, float beta, float* C, std::int64_t ldc,
                const float* bias, bf16* out, std::int64_t ldo) {
  if (m0 >= m1 || n0 >= n1) return;
  if (C == nullptr) ldc = 0;  // only rounded into `out`: tiles get a null C
  const std::int64_t kc_block = balanced_block(K, kKC, 8);
  const std::int64_t nc_block = balanced_block(n1 - n0, kNC, kNR);
#ifdef MOCA_CPU_SGEMM_BF16_PAIRS
  constexpr bool pairs = std::is_same_v<S, bf16>;  // packed as pairs, half as long
  constexpr std::int64_t mr = pairs ? kMRPairs : kMR;
#else
  constexpr bool pairs = false;
  constexpr std::int64_t mr = kMR;
#endif
  const std::int64_t mc_block = balanced_block(m1 - m0, kMC, mr);
  ThreadBuffers& buffers = thread_buffers();
  float* bp = buffers.b.reserve(nc_block / kNR * b_panel_stride(kc_block));
  float* ap = buffers.a.reserve((mc_block + mr - 1) / mr * a_panel_stride(kc_block, mr));
  const Update first = beta == 0.0f ? Update::Overwrite
                       : beta == 1.0f ? Update::Accumulate
                                      : Update::Scale;
  for (std::int64_t jc = n0; jc < n1; jc += nc_block) {
    const std::int64_t nc = std::min(nc_block, n1 - jc);
    for (std::int64_t pc = 0; pc < K; pc += kc_block) {
      const std::int64_t kc = std::min(kc_block, K - pc);
      const std::int64_t kl = pairs ? (kc + 1) / 2 : kc;  // packed length of a panel
      pack_b_for_kernel(B, ldb, trans_b, pc, kc, jc, nc, bp);
      const Update update = pc == 0 ? first : Update::Accumulate;
      const bool last = pc + kc >= K;  // where a bf16 result is rounded into `out`
      for (std::int64_t ic = m0; ic < m1; ic += mc_block) {
        const std::int64_t mc = std::min(mc_block, m1 - ic);
        pack_a_for_kernel(A, lda, trans_a, ic, mc, pc, kc, ap);
        for (std::int64_t jr = 0; jr < nc; jr += kNR) {
          const std::int64_t n = std::min(kNR, nc - jr);
          for (std::int64_t ir = 0; ir < mc; ir += mr) {
            const float* a = ap + ir / mr * a_panel_stride(kl, mr);
            const float* b = bp + jr / kNR * b_panel_stride(kl);
            float* c = C != nullptr ? C + (ic + ir) * ldc + jc + jr : nullptr;
            const std::int64_t m = std::min(mr, mc - ir);
            const float* panel_bias = bias && pc == 0 ? bias + jc + jr : nullptr;
            bf16* tile_out = out != nullptr && last ? out + (ic + ir) * ldo + jc + jr : nullptr;
#ifdef MOCA_CPU_SGEMM_BF16_PAIRS
            if constexpr (pairs) {
              micro_kernel_pairs(kl, reinterpret_cast<const std::uint32_t*>(a),
                                 reinterpret_cast<const std::uint32_t*>(b), c, ldc, m, n, alpha,
                                 beta, update, panel_bias, tile_out, ldo);
              continue;
            }
#endif
            micro_kernel(kc, a, b, c, ldc, m, n, alpha, beta, update, panel_bias, tile_out, ldo);
          }
        }
      }
    }
  }
}

/// How C is cut among threads: `row_parts` × `col_parts` rectangles, on tile boundaries.
struct Split {
  std::int64_t row_parts = 1, col_parts = 1;
};

/// Picks the cut of C into `threads` rectangles that packs the least: every column part packs
/// its rows of A again and every row part its columns of B. Parts must have a tile each.
inline Split choose_split(std::int64_t M, std::int64_t N, int threads) {
  const std::int64_t row_tiles = (M + kMR - 1) / kMR, col_tiles = (N + kNR - 1) / kNR;
  Split best;
  double best_cost = -1;
  for (std::int64_t rp = 1; rp <= threads; ++rp) {
    if (threads % rp != 0) continue;
    const std::int64_t cp = threads / rp;
    if (rp > row_tiles || cp > col_tiles) continue;
    const double cost = double(cp) * double(M) + double(rp) * double(N);
    if (best_cost < 0 || cost < best_cost) {
      best_cost = cost;
      best = {rp, cp};
    }
  }
  return best;
}

/// Below this many multiply-adds a GEMM runs on the calling thread.
inline constexpr std::int64_t kParallelMacs = 1 << 18;

/// C[M,N] = α·op(A)·op(B) + β·C (+ bias[N] on every row when `bias` is not null), row-major, as
/// cpu::gemm documents; K > 0 and α != 0. A and B are float, or both bf16 (widened as packed).
/// With `out` (M × N, row stride ldo), the result is rounded to bf16 there as the last inner
/// slice is stored, and C (still read for β) only holds the earlier slices' partial sums: no
/// float result is written where K is one slice (C may then be null if β = 0), and no second
/// pass rounds it.
template <class S>
void gemm(bool trans_a, bool trans_b, std::int64_t M, std::int64_t N, std::int64_t K, float alpha,
          const S* A, std::int64_t lda, const S* B, std::int64_t ldb, float beta, float* C,
          std::int64_t ldc, const float* bias = nullptr, bf16* out = nullptr,
          std::int64_t ldo = 0) {
  static_assert(std::is_same_v<S, float> || std::is_same_v<S, bf16>);
  int threads = 1;
  if (!in_parallel() && M * N * K >= kParallelMacs) threads = max_threads();
  Split split = choose_split(M, N, threads);
  // A thread count with no tile-aligned cut (a prime count for a thin C) runs on fewer threads.
  while (threads > 1 && split.row_parts * split.col_parts != threads) {
    --threads;
    split = choose_split(M, N, threads);
  }
  if (threads == 1) {
    gemm_block(trans_a, trans_b, 0, M, 0, N, K, alpha, A, lda, B, ldb, beta, C, ldc, bias, out,
               ldo);
    return;
  }
  const std::int64_t row_tiles = (M + kMR - 1) / kMR, col_tiles = (N + kNR - 1) / kNR;
  const std::int64_t parts = split.row_parts * split.col_parts;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(threads)
#endif
  for (std::int64_t part = 0; part < parts; ++part) {
    const std::int64_t rp = part / split.col_parts, cp = part % split.col_parts;
    const std::int64_t m0 = std::min(M, row_tiles * rp / split.row_parts * kMR);
    const std::int64_t m1 = std::min(M, row_tiles * (rp + 1) / split.row_parts * kMR);
    const std::int64_t n0 = std::min(N, col_tiles * cp / split.col_parts * kNR);
    const std::int64_t n1 = std::min(N, col_tiles * (cp + 1) / split.col_parts * kNR);
    gemm_block(trans_a, trans_b, m0, m1, n0, n1, K, alpha, A, lda, B, ldb, beta, C, ldc, bias, out,
               ldo);
  }
}

}  // namespace zmm or ymm
}  // namespace moca::cpu::sgemm_avx2

#endif
