// The fused attention of bf16 heads of up to 64 features on register fragments: the same three
// passes as the block programs of flash_attention.hpp (forward; dq, which also writes δ; dk/dv),
// with the same precision (bf16 operands, float scores, softmax, lse, δ and accumulators; p and
// dS rounded to bf16 for the products that read them; ctx and dqkv rounded once), but the scores
// and the output accumulators never leave registers, and the exponentials are base 2 (one fma
// and one ex2 per score, the log2(e) folded into the scale; lse stays in natural units):
//
//   - products are the tensor cores' m16n8k16 bf16 instruction (mma.sync), whose fragment layout
//     is fixed by the PTX ISA, so a thread knows which score it holds: the softmax runs on the
//     accumulators in place, and the scores' accumulators, rounded in pairs, are the next
//     product's A operand as they are (no round trip through shared memory);
//   - operand tiles reach shared memory by cp.async (16 bytes per copy, rows past S and features
//     past hd filled with zeros) into two buffers, so the next key (or query) tile loads while
//     this one is multiplied, and reach registers by ldmatrix (.trans where the product reads
//     the tile's transpose);
//   - a block is four warps of 16 rows each over 64 rows (query rows in the forward and dq
//     passes, key rows in the dk/dv pass, whose warps compute the transposed scores kqᵀ so that
//     pᵀ and dSᵀ are A operands too); a warp whose rows all lie past S skips the products.
//
// Shared memory rows are 16 bytes longer than the head (hdp + 8 bf16), so the eight rows an
// ldmatrix reads fall in eight different 16-byte bank groups. Needs sm_80 or later; the launcher
// (attention.cuh) checks the kernel was built for it, the head width (a multiple of 8 up to 64,
// so a 16-byte copy is all feature or all padding) and the buffers' alignment, and runs the block
// programs otherwise.
//
// tests/flash_mma_host_test.cpp also compiles this header with a host compiler
// (MOCA_KERNELS_ON_HOST): tests/host_warps.hpp then supplies the CUDA names, runs a block's 128
// threads as host threads with barriers, and emulates the warp-wide instructions (ldmatrix,
// mma.sync, shuffles) with the layouts below, so the kernels' indexing is checked on any machine.
#pragma once

#if !defined(MOCA_KERNELS_ON_HOST)
#include <cuda_bf16.h>
#endif
#include <math.h>

#include <cstdint>

#include "moca/core/bf16.hpp"

namespace moca::cuda::kernels::flash_mma {

/// Rows of a block (64: four warps of 16) and key or query rows per step of its loop.
inline constexpr int kRows = 64;
inline constexpr int kThreads = 128;
/// Widest head the kernels take.
inline constexpr int kMaxHeadDim = 64;
/// Blocks of the dq and dk/dv passes one multiprocessor holds on sm_90, whose 228 KB of shared
/// memory take four and three of them: their launch bounds cap their registers to fit as many
/// (cards with less shared memory hold fewer whatever the registers).
inline constexpr int kDqBlocksPerSM = 4;
inline constexpr int kDkdvBlocksPerSM = 3;

/// log2(e): the kernels' exponentials are ex2 of scores scaled by scale · log2(e).
inline constexpr float kLog2e = 1.4426950408889634f;

/// Row stride of a shared-memory tile of a head padded to 16·NK features, in bf16 elements.
template <int NK>
inline constexpr int kStride = NK * 16 + 8;
/// bf16 elements of one [kRows, kStride] tile.
template <int NK>
inline constexpr int kTile = int{kRows} * kStride<NK>;

/// Dynamic shared memory of each kernel, in bytes.
template <int NK>
inline constexpr int kForwardBytes = 5 * kTile<NK> * 2;  // q, k ×2, v ×2
template <int NK>
inline constexpr int kDqBytes = 6 * kTile<NK> * 2 + kRows * 4;  // q, do, k ×2, v ×2; δ
template <int NK>
inline constexpr int kDkdvBytes =
    6 * kTile<NK> * 2 + 4 * kRows * 4;  // k, v, q ×2, do ×2; lse, δ ×2

// Whether the kernels have bodies: on sm_80 and later, and in the host emulation.
#if (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800) || defined(MOCA_KERNELS_ON_HOST)
#define MOCA_FLASH_MMA_BODY 1
#else
#define MOCA_FLASH_MMA_BODY 0
#endif

// A kernel's dynamic shared memory.
#if defined(MOCA_KERNELS_ON_HOST)
#define MOCA_FLASH_MMA_SHARED(name) unsigned char* name = host_shared_memory()
#else
#define MOCA_FLASH_MMA_SHARED(name) extern __shared__ __align__(128) unsigned char name[]
#endif

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800 && !defined(MOCA_KERNELS_ON_HOST)

__device__ inline std::uint32_t shared_address(const void* p) {
  return static_cast<std::uint32_t>(__cvta_generic_to_shared(p));
}

/// 16 bytes from global memory to shared memory without passing through registers; zeros
/// instead when !valid (src is then not read).
__device__ inline void copy16_async(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(dst)),
               "l"(src), "r"(valid ? 16 : 0)
               : "memory");
}
__device__ inline void commit_copies() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
/// Waits until at most N groups of copies are still in flight.
template <int N>
__device__ inline void wait_copies() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

/// Four 8×8 bf16 matrices from shared memory, lane l giving the address of row l % 8 of
/// matrix l / 8; register i holds matrix i (row lane / 4, columns 2·(lane % 4) and + 1), or with
/// Trans its transpose.
template <bool Trans>
__device__ inline void load_matrices(std::uint32_t r[4], const bf16* p) {
  if constexpr (Trans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(shared_address(p))
                 : "memory");
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(shared_address(p))
                 : "memory");
}

/// c[16×8] += a[16×16] · b[16×8]: bf16 operands, float accumulation. Lane l (g = l / 4,
/// t = l % 4) holds c at rows g, g + 8 and columns 2t, 2t + 1 (c[0], c[1] on row g; c[2], c[3]
/// on row g + 8); a as four pairs (row g, columns 2t…; row g + 8; row g, columns 2t + 8…;
/// row g + 8, columns 2t + 8…); b as two pairs (rows 2t…, column g; rows 2t + 8…).
__device__ inline void mma(float c[4], const std::uint32_t a[4], std::uint32_t b0,
                           std::uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

/// Two floats rounded to a pair of bf16 (lo in the low half, as fragments hold them).
__device__ inline std::uint32_t pack(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const std::uint32_t*>(&v);
}

/// The two bf16 at p (4-byte aligned), widened.
__device__ inline float2 load_pair(const bf16* p) {
  return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(p));
}

#endif  // the device's instructions; the host emulation supplies its own

#if MOCA_FLASH_MMA_BODY

/// The A operand of the 16 columns 16·kk … of the accumulators c[n-block][4] (two n-blocks of 8
/// columns), rounded to bf16: the accumulator layout of two n-blocks is the A layout.
__device__ inline void accumulators_as_a(std::uint32_t a[4], const float c0[4], const float c1[4]) {
  a[0] = pack(c0[0], c0[1]);
  a[1] = pack(c0[2], c0[3]);
  a[2] = pack(c1[0], c1[1]);
  a[3] = pack(c1[2], c1[3]);
}

/// Rows [0, rows) × features [0, hd) of a head (row stride ld, in elements) into a shared tile
/// [kRows, kStride<NK>], zeros elsewhere, as asynchronous copies (the caller commits them).
template <int NK>
__device__ inline void load_tile(bf16* dst, const bf16* src, std::int64_t ld, int rows, int hd) {
  constexpr int per_row = 2 * NK;  // 16-byte chunks of a padded row
  for (int i = static_cast<int>(threadIdx.x); i < kRows * per_row; i += kThreads) {
    const int r = i / per_row, c = i % per_row * 8;
    const bool valid = r < rows && c < hd;
    copy16_async(dst + r * kStride<NK> + c, valid ? src + r * ld + c : src, valid);
  }
}

/// A operands (16 rows from row0, every 16-feature step) of a tile, for the whole loop.
template <int NK>
__device__ inline void load_rows_as_a(std::uint32_t a[NK][4], const bf16* tile, int row0) {
  const int lane = static_cast<int>(threadIdx.x) % 32;
#pragma unroll
  for (int kk = 0; kk < NK; ++kk)
    load_matrices<false>(a[kk], tile + (row0 + lane % 16) * kStride<NK> + kk * 16 + lane / 16 * 8);
}

/// c[NB][4] = a · tileᵀ for the tile's first 16·pairs rows (the B operand is the tile's rows:
/// n = row, k = feature; NB n-blocks of 8 rows, 8 for a whole 64-row tile); accumulators
/// of rows past that are zeroed.
template <int NK, int NB>
__device__ inline void times_rows_transposed(float c[NB][4], const std::uint32_t a[NK][4],
                                             const bf16* tile, int pairs) {
  const int lane = static_cast<int>(threadIdx.x) % 32, m = lane / 8;
#pragma unroll
  for (int nb = 0; nb < NB; ++nb)
#pragma unroll
    for (int e = 0; e < 4; ++e) c[nb][e] = 0.0f;
#pragma unroll
  for (int p = 0; p < NB / 2; ++p) {
    if (p >= pairs) break;
#pragma unroll
    for (int kk = 0; kk < NK; ++kk) {
      std::uint32_t b[4];
      load_matrices<false>(
          b, tile + (16 * p + lane % 8 + m / 2 * 8) * kStride<NK> + kk * 16 + m % 2 * 8);
      mma(c[2 * p], a[kk], b[0], b[1]);
      mma(c[2 * p + 1], a[kk], b[2], b[3]);
    }
  }
}

/// times_rows_transposed with the A operand read from shared memory here (the warp's 16 rows of
/// `rows` from row0) and not kept: fewer registers live through a loop than a copy held across it.
template <int NK, int NB>
__device__ inline void shared_rows_times_rows_transposed(float c[NB][4], const bf16* rows, int row0,
                                                         const bf16* tile, int pairs) {
  std::uint32_t a[NK][4];
  load_rows_as_a<NK>(a, rows, row0);
  times_rows_transposed<NK, NB>(c, a, tile, pairs);
}

/// acc[2·NK][4] += p · tile, p being the accumulators c[NB][4] rounded to bf16 (16 rows × 8·NB
/// columns, of which the first 16·pairs are read) and the tile [8·NB rows, 16·NK features].
template <int NK, int NB>
__device__ inline void accumulate_times_tile(float acc[2 * NK][4], const float c[NB][4],
                                             const bf16* tile, int pairs) {
  const int lane = static_cast<int>(threadIdx.x) % 32, m = lane / 8;
#pragma unroll
  for (int kk = 0; kk < NB / 2; ++kk) {
    if (kk >= pairs) break;
    std::uint32_t a[4];
    accumulators_as_a(a, c[2 * kk], c[2 * kk + 1]);
#pragma unroll
    for (int p = 0; p < NK; ++p) {
      std::uint32_t b[4];
      load_matrices<true>(
          b, tile + (16 * kk + lane % 8 + m % 2 * 8) * kStride<NK> + 16 * p + m / 2 * 8);
      mma(acc[2 * p], a, b[0], b[1]);
      mma(acc[2 * p + 1], a, b[2], b[3]);
    }
  }
}

/// Sets the scores of columns at or past `cols` (the keys past S in a last, partial key tile) of
/// the accumulators c[NB][4] to −∞, whose exponential is 0.
template <int NB>
__device__ inline void mask_columns(float c[NB][4], int cols) {
  const int t = static_cast<int>(threadIdx.x) % 4;
#pragma unroll
  for (int nb = 0; nb < NB; ++nb)
#pragma unroll
    for (int e = 0; e < 4; ++e)
      if (nb * 8 + 2 * t + (e & 1) >= cols) c[nb][e] = -INFINITY;
}

/// Rows row0 + g and row0 + g + 8 (lane's g = lane / 4) of the accumulators acc[2·NK][4],
/// times scale, to rows of dst (row stride ld) below `rows`, features below hd, as bf16 pairs.
template <int NK>
__device__ inline void store_rows(const float acc[2 * NK][4], float scale0, float scale1, bf16* dst,
                                  std::int64_t ld, int row0, int rows, int hd) {
  const int lane = static_cast<int>(threadIdx.x) % 32, g = lane / 4, t = lane % 4;
#pragma unroll
  for (int nb = 0; nb < 2 * NK; ++nb) {
    const int c = nb * 8 + 2 * t;
    if (c >= hd) break;
    if (row0 + g < rows)
      *reinterpret_cast<std::uint32_t*>(dst + (row0 + g) * ld + c) =
          pack(acc[nb][0] * scale0, acc[nb][1] * scale0);
    if (row0 + g + 8 < rows)
      *reinterpret_cast<std::uint32_t*>(dst + (row0 + g + 8) * ld + c) =
          pack(acc[nb][2] * scale1, acc[nb][3] * scale1);
  }
}

/// The start of step j of a loop over key tiles (forward, dq): the copies of key tile j + 1
/// (k and v, when there is one) into the buffers step j does not read, then the wait for step j's
/// own and a barrier, after which every warp may read them.
template <int NK>
__device__ inline void next_key_tile(bf16* sk, bf16* sv, const bf16* k, const bf16* v,
                                     std::int64_t ld, int S, int hd, int j, int steps) {
  if (j + 1 < steps) {
    const int buf = (j + 1) & 1, c1 = (j + 1) * kRows;
    load_tile<NK>(sk + buf * kTile<NK>, k + c1 * ld, ld, min(kRows, S - c1), hd);
    load_tile<NK>(sv + buf * kTile<NK>, v + c1 * ld, ld, min(kRows, S - c1), hd);
    commit_copies();
    wait_copies<1>();
  } else {
    wait_copies<0>();
  }
  __syncthreads();
}

#endif  // MOCA_FLASH_MMA_BODY

/// The forward of 64 query rows of head (blockIdx.z, blockIdx.y): ctx and lse = m + log l.
template <int NK>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(int S, int H, int hd, float scale, const bf16* qkv, float* lse, bf16* ctx) {
#if MOCA_FLASH_MMA_BODY
  MOCA_FLASH_MMA_SHARED(smem);
  bf16* sq = reinterpret_cast<bf16*>(smem);
  bf16* sk = sq + kTile<NK>;      // two buffers
  bf16* sv = sk + 2 * kTile<NK>;  // two buffers
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const int t = lane % 4;
  const std::int64_t dim = static_cast<std::int64_t>(H) * hd, ld = 3 * dim;
  const std::int64_t row = (static_cast<std::int64_t>(blockIdx.z) * H + blockIdx.y) * S;
  const bf16* q = qkv + static_cast<std::int64_t>(blockIdx.z) * S * ld + blockIdx.y * hd;
  const bf16 *k = q + dim, *v = q + 2 * dim;
  const int r0 = static_cast<int>(blockIdx.x) * kRows, rows = min(kRows, S - r0);
  const int steps = (S + kRows - 1) / kRows;
  const bool active = warp * 16 < rows;

  load_tile<NK>(sq, q + r0 * ld, ld, rows, hd);
  load_tile<NK>(sk, k, ld, min(kRows, S), hd);
  load_tile<NK>(sv, v, ld, min(kRows, S), hd);
  commit_copies();

  std::uint32_t qa[NK][4];
  float o[2 * NK][4] = {};
  // m: the rows' running maxima of the raw scores q·k (g and g + 8); the softmax runs in base 2,
  // e^(scale·(s − m)) = 2^(s·scale2 − m·scale2), one fma and one ex2 per score.
  const float scale2 = scale * kLog2e;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
  for (int j = 0; j < steps; ++j) {
    const int buf = j & 1, c0 = j * kRows;
    next_key_tile<NK>(sk, sv, k, v, ld, S, hd, j, steps);
    if (active) {
      if (j == 0) load_rows_as_a<NK>(qa, sq, warp * 16);
      const int cols = min(kRows, S - c0), pairs = (cols + 15) / 16;
      float s[8][4];
      times_rows_transposed<NK, 8>(s, qa, sk + buf * kTile<NK>, pairs);
      if (cols < kRows) mask_columns<8>(s, cols);
      // The online softmax of rows g (e < 2) and g + 8 (e ≥ 2), over the lane's columns and then
      // the four lanes of its row.
      float mx[2] = {m[0], m[1]};
#pragma unroll
      for (int nb = 0; nb < 8; ++nb)
#pragma unroll
        for (int e = 0; e < 4; ++e) mx[e >> 1] = fmaxf(mx[e >> 1], s[nb][e]);
      float rescale[2], shift[2], sum[2] = {0.0f, 0.0f};
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
        mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
        rescale[i] = exp2f((m[i] - mx[i]) * scale2);  // 0 on the first step (m = −∞)
        m[i] = mx[i];
        shift[i] = -mx[i] * scale2;
      }
#pragma unroll
      for (int nb = 0; nb < 8; ++nb)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          s[nb][e] = exp2f(fmaf(s[nb][e], scale2, shift[e >> 1]));  // masked: 2^−∞ = 0
          sum[e >> 1] += s[nb][e];
        }
      for (int i = 0; i < 2; ++i) l[i] = l[i] * rescale[i] + sum[i];
#pragma unroll
      for (int nb = 0; nb < 2 * NK; ++nb)
#pragma unroll
        for (int e = 0; e < 4; ++e) o[nb][e] *= rescale[e >> 1];
      accumulate_times_tile<NK, 8>(o, s, sv + buf * kTile<NK>, pairs);
    }
    __syncthreads();  // every warp is done with this buffer before the next step refills it
  }
  if (!active) return;
  for (int i = 0; i < 2; ++i) {  // the lanes' partial sums of a row
    l[i] += __shfl_xor_sync(0xffffffffu, l[i], 1);
    l[i] += __shfl_xor_sync(0xffffffffu, l[i], 2);
  }
  const int g = lane / 4, own = warp * 16 + g;
  store_rows<NK>(o, 1.0f / l[0], 1.0f / l[1],
                 ctx + static_cast<std::int64_t>(blockIdx.z) * S * dim + blockIdx.y * hd + r0 * dim,
                 dim, warp * 16, rows, hd);
  if (t == 0) {  // lse in natural units, as the block programs and the CPU keep it
    if (own < rows) lse[row + r0 + own] = m[0] * scale + logf(l[0]);
    if (own + 8 < rows) lse[row + r0 + own + 8] = m[1] * scale + logf(l[1]);
  }
#else
  __trap();  // the launcher runs the block programs instead (built_for_sm80)
#endif
}

/// The dq pass of 64 query rows of head (blockIdx.z, blockIdx.y): δ = rowsum(do ∘ o) (also
/// written to global memory for the dk/dv pass), then over every key tile p = e^(s − lse),
/// dS = p ∘ (do·vᵀ − δ), dq += scale · dS·k.
template <int NK>
__global__ void __launch_bounds__(kThreads, kDqBlocksPerSM)
    dq_kernel(int S, int H, int hd, float scale, const bf16* qkv, const float* lse, const bf16* ctx,
              const bf16* dctx, float* delta, bf16* dqkv) {
#if MOCA_FLASH_MMA_BODY
  MOCA_FLASH_MMA_SHARED(smem);
  bf16* sq = reinterpret_cast<bf16*>(smem);
  bf16* sdo = sq + kTile<NK>;
  bf16* sk = sdo + kTile<NK>;     // two buffers
  bf16* sv = sk + 2 * kTile<NK>;  // two buffers
  float* sdelta = reinterpret_cast<float*>(sv + 2 * kTile<NK>);
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const int g = lane / 4;
  const std::int64_t dim = static_cast<std::int64_t>(H) * hd, ld = 3 * dim;
  const std::int64_t row = (static_cast<std::int64_t>(blockIdx.z) * H + blockIdx.y) * S;
  const std::int64_t head = static_cast<std::int64_t>(blockIdx.z) * S * ld + blockIdx.y * hd;
  const std::int64_t out = static_cast<std::int64_t>(blockIdx.z) * S * dim + blockIdx.y * hd;
  const bf16* q = qkv + head;
  const bf16 *k = q + dim, *v = q + 2 * dim;
  const int r0 = static_cast<int>(blockIdx.x) * kRows, rows = min(kRows, S - r0);
  const int steps = (S + kRows - 1) / kRows;
  const bool active = warp * 16 < rows;

  load_tile<NK>(sq, q + r0 * ld, ld, rows, hd);
  load_tile<NK>(sdo, dctx + out + r0 * dim, dim, rows, hd);
  load_tile<NK>(sk, k, ld, min(kRows, S), hd);
  load_tile<NK>(sv, v, ld, min(kRows, S), hd);
  commit_copies();

  // δ of the warp's 16 rows, a row at a time over its lanes (two features each per step),
  // unrolled so that the loads of all 16 rows are in flight together.
#pragma unroll
  for (int i = 0; i < 16; ++i) {
    const int r = warp * 16 + i;
    float d = 0.0f;
    if (r < rows)
      for (int c = 2 * lane; c < hd; c += 64) {
        const float2 x = load_pair(dctx + out + (r0 + r) * dim + c);
        const float2 y = load_pair(ctx + out + (r0 + r) * dim + c);
        d += x.x * y.x + x.y * y.y;
      }
    for (int w = 16; w >= 1; w /= 2) d += __shfl_xor_sync(0xffffffffu, d, w);
    if (lane == 0) {
      sdelta[r] = d;
      if (r < rows) delta[row + r0 + r] = d;
    }
  }
  __syncwarp();
  const float delta_row[2] = {sdelta[warp * 16 + g], sdelta[warp * 16 + g + 8]};
  // −lse in base 2: p = e^(s·scale − lse) = 2^(s·scale2 − lse·log2 e).
  const float scale2 = scale * kLog2e;
  const float shift[2] = {
      warp * 16 + g < rows ? -lse[row + r0 + warp * 16 + g] * kLog2e : 0.0f,
      warp * 16 + g + 8 < rows ? -lse[row + r0 + warp * 16 + g + 8] * kLog2e : 0.0f};

  float dq[2 * NK][4] = {};
  for (int j = 0; j < steps; ++j) {
    const int buf = j & 1, c0 = j * kRows;
    next_key_tile<NK>(sk, sv, k, v, ld, S, hd, j, steps);
    if (active) {
      const int cols = min(kRows, S - c0), pairs = (cols + 15) / 16;
      // The tile's keys in two halves of 32, and the warp's q and do fragments read from shared
      // memory where they are used, as in the dk/dv pass (fewer registers, more blocks).
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int half_pairs = min(2, pairs - 2 * half);
        if (half_pairs <= 0) break;
        const bf16* tk = sk + buf * kTile<NK> + 32 * half * kStride<NK>;
        const bf16* tv = sv + buf * kTile<NK> + 32 * half * kStride<NK>;
        float s[4][4], dp[4][4];
        shared_rows_times_rows_transposed<NK, 4>(s, sq, warp * 16, tk, half_pairs);
        shared_rows_times_rows_transposed<NK, 4>(dp, sdo, warp * 16, tv, half_pairs);
        if (cols < 32 * (half + 1)) mask_columns<4>(s, cols - 32 * half);
#pragma unroll
        for (int nb = 0; nb < 4; ++nb)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const float p = exp2f(fmaf(s[nb][e], scale2, shift[e >> 1]));  // masked: 0
            s[nb][e] = p * (dp[nb][e] - delta_row[e >> 1]);                // dS
          }
        accumulate_times_tile<NK, 4>(dq, s, tk, half_pairs);
      }
    }
    __syncthreads();
  }
  if (active) store_rows<NK>(dq, scale, scale, dqkv + head + r0 * ld, ld, warp * 16, rows, hd);
#else
  __trap();
#endif
}

/// The dk/dv pass of 64 key rows of head (blockIdx.z, blockIdx.y): over every query tile, the
/// transposed scores sᵀ = k·qᵀ and dpᵀ = v·doᵀ, pᵀ = e^(sᵀ − lse) and dSᵀ = pᵀ ∘ (dpᵀ − δ) per
/// query column, dv += pᵀ·do and dk += scale · dSᵀ·q.
template <int NK>
__global__ void __launch_bounds__(kThreads, kDkdvBlocksPerSM)
    dkdv_kernel(int S, int H, int hd, float scale, const bf16* qkv, const float* lse,
                const bf16* dctx, const float* delta, bf16* dqkv) {
#if MOCA_FLASH_MMA_BODY
  MOCA_FLASH_MMA_SHARED(smem);
  bf16* sk = reinterpret_cast<bf16*>(smem);
  bf16* sv = sk + kTile<NK>;
  bf16* sq = sv + kTile<NK>;                                    // two buffers
  bf16* sdo = sq + 2 * kTile<NK>;                               // two buffers
  float* slse = reinterpret_cast<float*>(sdo + 2 * kTile<NK>);  // two buffers
  float* sdelta = slse + 2 * kRows;                             // two buffers
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const int t = lane % 4;
  const std::int64_t dim = static_cast<std::int64_t>(H) * hd, ld = 3 * dim;
  const std::int64_t row = (static_cast<std::int64_t>(blockIdx.z) * H + blockIdx.y) * S;
  const std::int64_t head = static_cast<std::int64_t>(blockIdx.z) * S * ld + blockIdx.y * hd;
  const std::int64_t out = static_cast<std::int64_t>(blockIdx.z) * S * dim + blockIdx.y * hd;
  const bf16* q = qkv + head;
  const bf16* dout = dctx + out;
  const int c0 = static_cast<int>(blockIdx.x) * kRows, cols = min(kRows, S - c0);
  const int steps = (S + kRows - 1) / kRows;
  const bool active = warp * 16 < cols;

  // lse in base 2 (pᵀ = 2^(sᵀ·scale2 − lse·log2 e)); query rows past S get +∞, so that their
  // probabilities are 0, and δ = 0.
  const float scale2 = scale * kLog2e;
  auto load_query_tile = [&](int j, int buf) {
    const int r0 = j * kRows, rows = min(kRows, S - r0);
    load_tile<NK>(sq + buf * kTile<NK>, q + r0 * ld, ld, rows, hd);
    load_tile<NK>(sdo + buf * kTile<NK>, dout + r0 * dim, dim, rows, hd);
    for (int r = static_cast<int>(threadIdx.x); r < kRows; r += kThreads) {
      slse[buf * kRows + r] = r < rows ? lse[row + r0 + r] * kLog2e : INFINITY;
      sdelta[buf * kRows + r] = r < rows ? delta[row + r0 + r] : 0.0f;
    }
  };
  load_tile<NK>(sk, q + dim + c0 * ld, ld, cols, hd);
  load_tile<NK>(sv, q + 2 * dim + c0 * ld, ld, cols, hd);
  load_query_tile(0, 0);
  commit_copies();

  float dk[2 * NK][4] = {}, dv[2 * NK][4] = {};
  for (int j = 0; j < steps; ++j) {
    const int buf = j & 1;
    if (j + 1 < steps) {
      load_query_tile(j + 1, buf ^ 1);
      commit_copies();
      wait_copies<1>();
    } else {
      wait_copies<0>();
    }
    __syncthreads();
    if (active) {
      const int rows = min(kRows, S - j * kRows), pairs = (rows + 15) / 16;
      // The tile's query columns in two halves of 32, so that the transposed scores and their
      // gradients take 32 registers each, not 64 (more blocks fit a multiprocessor).
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int half_pairs = min(2, pairs - 2 * half);
        if (half_pairs <= 0) break;
        const bf16 *tq = sq + buf * kTile<NK> + 32 * half * kStride<NK>,
                   *tdo = sdo + buf * kTile<NK> + 32 * half * kStride<NK>;
        const float *tl = slse + buf * kRows + 32 * half, *td = sdelta + buf * kRows + 32 * half;
        // The warp's key and value rows as A operands, read from shared memory where they are
        // used rather than held in registers through the loop.
        float s[4][4], dp[4][4];
        shared_rows_times_rows_transposed<NK, 4>(s, sk, warp * 16, tq, half_pairs);
        shared_rows_times_rows_transposed<NK, 4>(dp, sv, warp * 16, tdo, half_pairs);
#pragma unroll
        for (int nb = 0; nb < 4; ++nb)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int c = nb * 8 + 2 * t + (e & 1);            // the query row in this half
            s[nb][e] = exp2f(fmaf(s[nb][e], scale2, -tl[c]));  // pᵀ
            dp[nb][e] = s[nb][e] * (dp[nb][e] - td[c]);        // dSᵀ
          }
        accumulate_times_tile<NK, 4>(dv, s, tdo, half_pairs);
        accumulate_times_tile<NK, 4>(dk, dp, tq, half_pairs);
      }
    }
    __syncthreads();
  }
  if (!active) return;
  bf16* dk_out = dqkv + head + dim + c0 * ld;
  store_rows<NK>(dk, scale, scale, dk_out, ld, warp * 16, cols, hd);
  store_rows<NK>(dv, 1.0f, 1.0f, dk_out + dim, ld, warp * 16, cols, hd);
#else
  __trap();
#endif
}

}  // namespace moca::cuda::kernels::flash_mma
