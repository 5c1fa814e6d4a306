// Shared pieces of the CUDA kernels: launch shapes, the grid-stride loop, warp and block
// reductions, and math functions overloaded on float and double.
//
// Kernels are written for clarity first: elementwise ops run a grid-stride loop, row ops give a
// block to each row (every pass over a row has each thread touch the same elements, which is
// what makes in-place use safe), and column reductions give a block to 32 columns. Reductions
// combine partial sums in an order fixed by the launch shape, so a result does not change from
// run to run (scatter_add_rows is the one exception, see index.cuh).
#pragma once

#if !defined(__CUDACC__)
#error "moca/backend/cuda/kernels/*.cuh hold CUDA kernels and compile only with nvcc; C++ files include <moca/cuda.hpp> and link moca::cuda instead"
#endif

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "moca/backend/cuda/backend.hpp"
#include "moca/backend/cuda/check.hpp"
#include "moca/backend/cuda/context.hpp"
#include "moca/backend/cuda/kernels/chunk.hpp"
#include "moca/backend/cuda/kernels/column_sums.cuh"

namespace moca::cuda::kernels {

/// Accumulator type: float and bf16 rows accumulate in float (as the CPU backend and PyTorch
/// do); also the type of saved row statistics (LayerNorm's mean and rstd, ...).
template <class T>
using acc_t = compute_t<T>;

/// Threads per block of elementwise and column kernels.
inline constexpr int kThreads = 256;
/// Upper bound on the blocks of a grid-stride loop: enough to fill any current GPU; larger
/// inputs loop.
inline constexpr std::int64_t kMaxBlocks = 8192;
/// Upper bound on the blocks of a row or column kernel (gridDim.y allows at most 65535).
inline constexpr std::int64_t kMaxRowBlocks = 65535;

/// Shape of the block of a column reduction: kColumns adjacent columns (one warp, coalesced
/// reads), each summed by kColumnRows threads that then combine their parts in a fixed order.
inline constexpr int kColumns = 32;
inline constexpr int kColumnRows = 8;

/// Blocks of kThreads for a grid-stride loop over n > 0 elements.
inline unsigned grid_for(std::int64_t n) {
  const std::int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < kMaxBlocks ? blocks : kMaxBlocks);
}

/// Threads of a block that owns one row of N elements: whole warps, 32 to 256.
inline unsigned row_threads(std::int64_t N) {
  const std::int64_t t = (N + 31) / 32 * 32;
  return static_cast<unsigned>(t < 32 ? 32 : (t > 256 ? 256 : t));
}

/// Blocks for M > 0 rows, one row per block (more rows than blocks loop).
inline unsigned row_blocks(std::int64_t M) {
  return static_cast<unsigned>(M < kMaxRowBlocks ? M : kMaxRowBlocks);
}

/// Throws if the launch just made failed (bad configuration, missing kernel image). Errors
/// inside a running kernel surface at the next synchronising call.
inline void check_launch(const char* kernel) {
  const cudaError_t err = cudaGetLastError();  // also resets the error
  if (err != cudaSuccess) [[unlikely]]
    ::moca::detail::throw_check_failure(__FILE__, __LINE__, kernel, "launching CUDA kernel ",
                                        kernel, " failed: ", cudaGetErrorName(err), " (",
                                        cudaGetErrorString(err), ")");
}

/// Runs f(i) for every i in [0, n) on the backend's stream.
template <class F>
__global__ void elementwise_kernel(std::int64_t n, F f) {
  const std::int64_t stride = static_cast<std::int64_t>(blockDim.x) * gridDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride)
    f(i);
}

template <class F>
void launch_elementwise(std::int64_t n, const F& f) {
  if (n <= 0) return;
  elementwise_kernel<<<grid_for(n), kThreads, 0, stream()>>>(n, f);
  check_launch("elementwise_kernel");
}

/// y[i] = f(x[i]...) for every i in [0, n), one or two inputs x of y's type: 16-byte chunks of
/// every operand per thread (8 bf16, 4 floats), the n % chunk elements past the last whole chunk
/// one per thread of the first block. f takes and returns T, or values T converts from and to.
/// y may alias any x (each chunk is read whole before it is written).
template <class T, class F, class... X>
__global__ void map_chunks_kernel(std::int64_t n, F f, T* y, const X*... x) {
  static_assert(sizeof...(X) == 1 || sizeof...(X) == 2);
  constexpr int V = kChunk<T>;
  const std::int64_t chunks = n / V;
  const std::int64_t stride = static_cast<std::int64_t>(blockDim.x) * gridDim.x;
  for (std::int64_t c = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
       c < chunks; c += stride) {
    const Chunk<T> in[] = {load_chunk(x + c * V)...};
    Chunk<T> out;
#pragma unroll
    for (int u = 0; u < V; ++u) {
      if constexpr (sizeof...(X) == 1)
        out.v[u] = f(in[0].v[u]);
      else
        out.v[u] = f(in[0].v[u], in[1].v[u]);
    }
    store_chunk(y + c * V, out);
  }
  if (blockIdx.x == 0 && threadIdx.x < n - chunks * V) {
    const std::int64_t i = chunks * V + threadIdx.x;
    y[i] = f(x[i]...);
  }
}

/// y[i] = f(a[i]) and y[i] = f(a[i], b[i]) element by element: map_chunks_kernel's fallback.
template <class T, class F>
struct MapAt1 {
  F f;
  T* y;
  const T* a;
  __device__ void operator()(std::int64_t i) const { y[i] = f(a[i]); }
};
template <class T, class F>
struct MapAt2 {
  F f;
  T* y;
  const T *a, *b;
  __device__ void operator()(std::int64_t i) const { y[i] = f(a[i], b[i]); }
};

/// Runs y[i] = f(x[i]...) on the backend's stream: in 16-byte chunks where every operand is
/// aligned to 16 bytes, element by element (elementwise_kernel) otherwise.
template <class T, class F, class... X>
void launch_map(std::int64_t n, const F& f, T* y, const X*... x) {
  if (n <= 0) return;
  if ((aligned16(y) && ... && aligned16(x))) {
    const std::int64_t chunks = n / kChunk<T>;
    map_chunks_kernel<<<grid_for(chunks > 0 ? chunks : 1), kThreads, 0, stream()>>>(n, f, y, x...);
    check_launch("map_chunks_kernel");
  } else if constexpr (sizeof...(X) == 1) {
    launch_elementwise(n, MapAt1<T, F>{f, y, x...});
  } else {
    launch_elementwise(n, MapAt2<T, F>{f, y, x...});
  }
}

// ---- math on float and double (explicit names, so float never silently widens to double) ----

__device__ inline float dexp(float x) { return ::expf(x); }
__device__ inline double dexp(double x) { return ::exp(x); }
__device__ inline float dlog(float x) { return ::logf(x); }
__device__ inline double dlog(double x) { return ::log(x); }
__device__ inline float dsqrt(float x) { return ::sqrtf(x); }
__device__ inline double dsqrt(double x) { return ::sqrt(x); }
__device__ inline float derf(float x) { return ::erff(x); }
__device__ inline double derf(double x) { return ::erf(x); }

template <class T>
__device__ inline T neg_infinity() {
  return static_cast<T>(-INFINITY);
}

// ---- atomics ----

/// *p += v atomically, for float and double (the hardware's atomicAdd).
template <class T>
__device__ inline void atomic_add(T* p, T v) {
  atomicAdd(p, v);
}

/// bf16: the sum in float, rounded once as moca::bf16's += rounds it on the CPU, swapped into the
/// aligned 32-bit word that holds *p (compare-and-swap of add_to_bf16_half: the neighbouring
/// half is kept as read).
template <>
__device__ inline void atomic_add<bf16>(bf16* p, bf16 v) {
  const auto address = reinterpret_cast<std::uintptr_t>(p);
  auto* word = reinterpret_cast<unsigned int*>(address & ~std::uintptr_t(3));
  const unsigned shift = (address & 2u) ? 16u : 0u;
  unsigned int old = *word, assumed;
  do {
    assumed = old;
    old = atomicCAS(word, assumed, add_to_bf16_half(assumed, shift, v));
  } while (old != assumed);
}

// ---- reductions ----

struct SumOp {
  template <class T>
  __device__ T operator()(T a, T b) const {
    return a + b;
  }
};

/// Maximum that, like std::max(a, b) on the CPU, keeps a when b is not greater.
struct MaxOp {
  template <class T>
  __device__ T operator()(T a, T b) const {
    return b > a ? b : a;
  }
};

/// Reduces v over the 32 lanes of a warp; every lane gets the result.
template <class T, class Op>
__device__ T warp_reduce(T v, Op op) {
  for (int offset = 16; offset > 0; offset >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

/// Reduces v over the block (blockDim.x a multiple of 32, blockDim.y == 1); every thread gets
/// the result. `shared` holds 32 values; consecutive calls may reuse it.
template <class T, class Op>
__device__ T block_reduce(T v, Op op, T* shared) {
  const unsigned lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
  const unsigned warps = blockDim.x >> 5;
  v = warp_reduce(v, op);
  __syncthreads();  // the previous reduction may still be reading `shared`
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  T r = shared[0];
  for (unsigned w = 1; w < warps; ++w) r = op(r, shared[w]);
  return r;
}

/// Sums v over the kColumnRows thread rows of a column block (blockDim = kColumns ×
/// kColumnRows); every thread of the column gets the same sum, added in the same order.
template <class T>
__device__ T column_reduce(T v, T (*part)[kColumns + 1]) {
  part[threadIdx.y][threadIdx.x] = v;
  __syncthreads();
  T total = 0;
  for (int k = 0; k < kColumnRows; ++k) total += part[k][threadIdx.x];
  __syncthreads();  // `part` may be written again right after
  return total;
}

// ---- column reductions over many rows ----
//
// A block of kColumns × kColumnRows threads that walks all M rows of its 32 columns leaves most
// of the GPU idle when the matrix is tall and narrow (the parameter gradients of a LayerNorm or a
// bias: 25,000 rows of 768 columns make 24 blocks). Instead the rows are cut into chunks of
// kChunkRows (at most kMaxChunks chunks): one kernel sums each (chunk, column) into a workspace,
// a second adds the chunks in order and applies the epilogue (column_sums.cuh). The chunking
// depends on M only, so results do not change from run to run. Rows that split into 16-byte
// chunks take reduce_column_chunks instead, whose threads load 16 bytes of every operand per row.

inline constexpr std::int64_t kChunkRows = 128;
inline constexpr std::int64_t kMaxChunks = 256;

inline std::int64_t column_chunks(std::int64_t M) {
  const std::int64_t c = (M + kChunkRows - 1) / kChunkRows;
  return c < 1 ? 1 : (c > kMaxChunks ? kMaxChunks : c);
}

// partial[(c · P + p) · N + j] = Σ over rows r of chunk c of load(r, j)[p].
template <int P, class A, class Load>
__global__ void column_partials_kernel(std::int64_t M, std::int64_t N, std::int64_t chunk_rows,
                                       Load load, A* partial) {
  __shared__ A part[kColumnRows][kColumns + 1];
  const std::int64_t j = static_cast<std::int64_t>(blockIdx.x) * kColumns + threadIdx.x;
  const std::int64_t c = blockIdx.y;
  const std::int64_t r0 = c * chunk_rows;
  const std::int64_t r1 = r0 + chunk_rows < M ? r0 + chunk_rows : M;
  A acc[P];
  for (int p = 0; p < P; ++p) acc[p] = A(0);
  if (j < N)
    for (std::int64_t r = r0 + threadIdx.y; r < r1; r += kColumnRows) load(r, j, acc);
  for (int p = 0; p < P; ++p) {
    const A total = column_reduce(acc[p], part);
    if (threadIdx.y == 0 && j < N) partial[(c * P + p) * N + j] = total;
  }
}

/// finish(j, totals) with totals[p] = Σ_c partial[(c · P + p) · N + j] (column_sums.cuh).
template <int P, class A, class Finish>
void column_totals(std::int64_t N, std::int64_t chunks, const A* partial, const Finish& finish,
                   const char* kernel) {
  column_sums::column_totals_kernel<P, A>
      <<<static_cast<unsigned>((N + 31) / 32), column_sums::kThreads,
         column_sums::kTotalsBytes<P, A>, stream()>>>(N, chunks, partial, finish);
  check_launch(kernel);
}

/// For every column j < N of an M-row matrix: totals[p] = Σ_r load(r, j)[p] (load adds its P
/// terms into acc), then finish(j, totals). Queued on stream(); uses Context::workspace().
template <int P, class A, class Load, class Finish>
void reduce_columns(std::int64_t M, std::int64_t N, const Load& load, const Finish& finish,
                    const char* kernel) {
  if (N <= 0) return;
  const std::int64_t chunks = column_chunks(M);
  const std::int64_t chunk_rows = (M + chunks - 1) / chunks;
  Context& ctx = Context::get();
  A* partial = static_cast<A*>(ctx.workspace(sizeof(A) * static_cast<std::size_t>(chunks * P * N)));
  const cudaStream_t s = ctx.stream();
  const dim3 block(kColumns, kColumnRows);
  const dim3 grid(static_cast<unsigned>((N + kColumns - 1) / kColumns),
                  static_cast<unsigned>(chunks));
  column_partials_kernel<P, A><<<grid, block, 0, s>>>(M, N, chunk_rows, load, partial);
  check_launch(kernel);
  column_totals<P, A>(N, chunks, partial, finish, kernel);
}

/// reduce_columns over rows that split into 16-byte chunks of V = kChunk<T> elements (N a
/// multiple of V, the operands 16-byte aligned): load(r, j, acc) adds row r's terms of columns
/// j … j + V − 1 into acc[P][V] (column_sums.cuh). Queued on stream(); uses Context::workspace().
template <int P, class A, int V, class ChunkLoad, class Finish>
void reduce_column_chunks(std::int64_t M, std::int64_t N, const ChunkLoad& load,
                          const Finish& finish, const char* kernel) {
  if (N <= 0) return;
  const std::int64_t chunks = column_sums::chunks_for(M);
  Context& ctx = Context::get();
  A* partial = static_cast<A*>(ctx.workspace(sizeof(A) * static_cast<std::size_t>(chunks * P * N)));
  const dim3 grid(static_cast<unsigned>((N + 32 * V - 1) / (32 * V)),
                  static_cast<unsigned>(chunks));
  column_sums::chunk_partials_kernel<P, A, V>
      <<<grid, column_sums::kThreads, column_sums::kPartialsBytes<P, A, V>, ctx.stream()>>>(
          M, N, column_sums::chunk_rows_for(M), load, partial);
  check_launch(kernel);
  column_totals<P, A>(N, chunks, partial, finish, kernel);
}

}  // namespace moca::cuda::kernels
