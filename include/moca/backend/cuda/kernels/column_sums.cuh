// Column sums of tall matrices in two kernels, the same result on every run: the parameter
// gradients of a LayerNorm (Σ_r dy·x̂ and Σ_r dy over 10,000 to 25,000 rows of 768 columns) and
// the bias gradients of every Linear (Σ_r dy, up to 3,072 columns).
//
//   chunk_partials_kernel   rows cut into chunks of kChunkRowsWide; a block of 128 threads sums
//                           one chunk over 32·V columns, each thread V adjacent columns (one
//                           16-byte chunk of every operand per row: a warp reads 512 contiguous
//                           bytes), its warp's rows four at a time so that four loads per operand
//                           are in flight; the four warps' sums are added in warp order;
//   column_totals_kernel    the chunks' partial sums added in chunk order, 32 columns by 4
//                           groups of chunks per block, the groups added in order; then the
//                           caller's epilogue (accumulate into a gradient, scale, ...).
//
// The chunking and every order of addition depend on the matrix's shape only. A Load functor
// adds row r's terms for columns j … j + V − 1 into acc[p][v] (P terms per element: the
// LayerNorm's two gradients at once); a Finish functor receives column j's P totals.
//
// tests/column_sums_host_test.cpp compiles this header with a host compiler
// (MOCA_KERNELS_ON_HOST, tests/host_warps.hpp), so its indexing is checked on any machine.
#pragma once

#include <cstdint>

namespace moca::cuda::kernels::column_sums {

/// Threads of a block of either kernel: four warps.
inline constexpr int kThreads = 128;
inline constexpr int kWarps = kThreads / 32;
/// Rows of one chunk, and the most chunks a matrix is cut into (taller ones get longer chunks).
inline constexpr std::int64_t kChunkRowsWide = 64;
inline constexpr std::int64_t kMaxChunksWide = 256;

/// Chunks of an M-row matrix, and rows per chunk (the last may be shorter).
inline std::int64_t chunks_for(std::int64_t M) {
  const std::int64_t c = (M + kChunkRowsWide - 1) / kChunkRowsWide;
  return c < 1 ? 1 : (c > kMaxChunksWide ? kMaxChunksWide : c);
}
inline std::int64_t chunk_rows_for(std::int64_t M) {
  const std::int64_t c = chunks_for(M);
  return (M + c - 1) / c;
}

/// Shared memory of chunk_partials_kernel<P, A, V>, in bytes.
template <int P, class A, int V>
inline constexpr int kPartialsBytes = static_cast<int>(sizeof(A)) * kWarps* P * 32 * V;
/// Shared memory of column_totals_kernel<P, A>, in bytes.
template <int P, class A>
inline constexpr int kTotalsBytes = static_cast<int>(sizeof(A)) * kWarps* P * 32;

#if defined(MOCA_KERNELS_ON_HOST)
#define MOCA_COLUMN_SUMS_SHARED(name) unsigned char* name = host_shared_memory()
#else
#define MOCA_COLUMN_SUMS_SHARED(name) extern __shared__ __align__(16) unsigned char name[]
#endif

/// partial[(c · P + p) · N + j] = Σ over the rows of chunk c (blockIdx.y) of the terms p of
/// column j, for the 32·V columns of block blockIdx.x. N is a multiple of V.
template <int P, class A, int V, class Load>
__global__ void __launch_bounds__(kThreads)
    chunk_partials_kernel(std::int64_t M, std::int64_t N, std::int64_t chunk_rows, Load load,
                          A* partial) {
  MOCA_COLUMN_SUMS_SHARED(smem);
  A* part = reinterpret_cast<A*>(smem);  // [kWarps][P][32·V]
  const int lane = static_cast<int>(threadIdx.x) % 32, warp = static_cast<int>(threadIdx.x) / 32;
  const std::int64_t j = (static_cast<std::int64_t>(blockIdx.x) * 32 + lane) * V;
  const std::int64_t c = blockIdx.y, r0 = c * chunk_rows;
  const std::int64_t r1 = r0 + chunk_rows < M ? r0 + chunk_rows : M;
  A acc[P][V];
#pragma unroll
  for (int p = 0; p < P; ++p)
#pragma unroll
    for (int v = 0; v < V; ++v) acc[p][v] = A(0);
  if (j < N) {
    // Rows r0 + warp, + kWarps, ...: four of them per step, their loads issued together.
    std::int64_t r = r0 + warp;
    for (; r + 3 * kWarps < r1; r += 4 * kWarps) {
#pragma unroll
      for (int u = 0; u < 4; ++u) load(r + u * kWarps, j, acc);
    }
    for (; r < r1; r += kWarps) load(r, j, acc);
  }
#pragma unroll
  for (int p = 0; p < P; ++p)
#pragma unroll
    for (int v = 0; v < V; ++v) part[(warp * P + p) * 32 * V + lane * V + v] = acc[p][v];
  __syncthreads();
  // Thread t adds the warps' sums of the block's columns t, t + 128, ... in warp order.
  for (int e = static_cast<int>(threadIdx.x); e < P * 32 * V; e += kThreads) {
    const int p = e / (32 * V), k = e % (32 * V);
    const std::int64_t col = static_cast<std::int64_t>(blockIdx.x) * 32 * V + k;
    if (col >= N) continue;
    A total = part[p * 32 * V + k];
    for (int w = 1; w < kWarps; ++w) total += part[(w * P + p) * 32 * V + k];
    partial[(c * P + p) * N + col] = total;
  }
}

/// finish(j, totals) with totals[p] = Σ_c partial[(c · P + p) · N + j], over the 32 columns of
/// block blockIdx.x: warp w adds chunks w, w + 4, ... in order, then the four warps' sums are
/// added in warp order.
template <int P, class A, class Finish>
__global__ void __launch_bounds__(kThreads)
    column_totals_kernel(std::int64_t N, std::int64_t chunks, const A* partial, Finish finish) {
  MOCA_COLUMN_SUMS_SHARED(smem);
  A* part = reinterpret_cast<A*>(smem);  // [kWarps][P][32]
  const int lane = static_cast<int>(threadIdx.x) % 32, warp = static_cast<int>(threadIdx.x) / 32;
  const std::int64_t j = static_cast<std::int64_t>(blockIdx.x) * 32 + lane;
  A acc[P];
#pragma unroll
  for (int p = 0; p < P; ++p) acc[p] = A(0);
  if (j < N) {
    // Four of the warp's chunks per step: their loads in flight together, added in order.
    std::int64_t c = warp;
    for (; c + 3 * kWarps < chunks; c += 4 * kWarps) {
      A v[4][P];
#pragma unroll
      for (int u = 0; u < 4; ++u)
#pragma unroll
        for (int p = 0; p < P; ++p) v[u][p] = partial[((c + u * kWarps) * P + p) * N + j];
#pragma unroll
      for (int u = 0; u < 4; ++u)
#pragma unroll
        for (int p = 0; p < P; ++p) acc[p] += v[u][p];
    }
    for (; c < chunks; c += kWarps)
#pragma unroll
      for (int p = 0; p < P; ++p) acc[p] += partial[(c * P + p) * N + j];
  }
#pragma unroll
  for (int p = 0; p < P; ++p) part[(warp * P + p) * 32 + lane] = acc[p];
  __syncthreads();
  if (warp != 0 || j >= N) return;
  A totals[P];
#pragma unroll
  for (int p = 0; p < P; ++p) {
    A t = part[p * 32 + lane];
    for (int w = 1; w < kWarps; ++w) t += part[(w * P + p) * 32 + lane];
    totals[p] = t;
  }
  finish(j, totals);
}

}  // namespace moca::cuda::kernels::column_sums
