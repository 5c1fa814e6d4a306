// Reductions: the middle axis of [outer, n, inner], and the sum of squares returned to the host.
// Contracts as in backend/cpu/reduce.hpp and backend/cpu/elementwise.hpp (sum_squares).
#pragma once

#include <array>
#include <mutex>

#include "moca/backend/cuda/kernels/common.cuh"

namespace moca::cuda {
namespace kernels {

// inner == 1: y[o] = alpha · Σ_j x[o, j] + beta · y[o], one block per o. y is of x's type T, or
// float for bf16 x (a parameter's float gradient), in these kernels and the ones below.
template <class T, class Y>
__global__ void sum_rows_kernel(std::int64_t outer, std::int64_t n, Y alpha, const T* x, Y beta,
                                Y* y) {
  using A = acc_t<T>;
  __shared__ A shared[32];
  for (std::int64_t o = blockIdx.x; o < outer; o += gridDim.x) {
    const T* xo = x + o * n;
    A s = 0;
    for (std::int64_t j = threadIdx.x; j < n; j += blockDim.x) s += xo[j];
    const A total = block_reduce(s, SumOp{}, shared);
    if (threadIdx.x == 0) {
      const A prev = beta == Y(0) ? A(0) : A(beta) * A(y[o]);
      y[o] = static_cast<Y>(A(alpha) * total + prev);
    }
  }
}

// inner == 1 with few, long rows (a whole tensor's sum): block (c, o) sums chunk c of row o into
// partial[o · chunks + c]; sum_row_chunks_finish adds a row's chunks in order.
template <class T>
__global__ void sum_row_chunks_kernel(std::int64_t n, std::int64_t chunk, std::int64_t chunks,
                                      const T* x, acc_t<T>* partial) {
  using A = acc_t<T>;
  __shared__ A shared[32];
  const std::int64_t o = blockIdx.y, c = blockIdx.x;
  const std::int64_t j0 = c * chunk, j1 = j0 + chunk < n ? j0 + chunk : n;
  const T* xo = x + o * n;
  A s = 0;
  for (std::int64_t j = j0 + threadIdx.x; j < j1; j += blockDim.x) s += xo[j];
  s = block_reduce(s, SumOp{}, shared);
  if (threadIdx.x == 0) partial[o * chunks + c] = s;
}

template <class A, class Y>
__global__ void sum_row_chunks_finish(std::int64_t outer, std::int64_t chunks, const A* partial,
                                      Y alpha, Y beta, Y* y) {
  const std::int64_t o = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (o >= outer) return;
  A s = 0;
  for (std::int64_t c = 0; c < chunks; ++c) s += partial[o * chunks + c];
  const A prev = beta == Y(0) ? A(0) : A(beta) * A(y[o]);
  y[o] = static_cast<Y>(A(alpha) * s + prev);
}

/// Rows at least this long, when there are fewer than kManyRows of them, are summed in chunks.
inline constexpr std::int64_t kLongRow = 1 << 16;
inline constexpr std::int64_t kManyRows = 1024;
inline constexpr std::int64_t kRowChunk = 1 << 13;

// inner > 1: y[o, c] = alpha · Σ_j x[o, j, c] + beta · y[o, c]. A block owns kColumns adjacent
// columns c of one o; its kColumnRows thread rows sum j ≡ threadIdx.y and combine in order.
template <class T, class Y>
__global__ void sum_columns_kernel(std::int64_t outer, std::int64_t n, std::int64_t inner, Y alpha,
                                   const T* x, Y beta, Y* y) {
  using A = acc_t<T>;
  __shared__ A part[kColumnRows][kColumns + 1];
  const std::int64_t c = static_cast<std::int64_t>(blockIdx.x) * kColumns + threadIdx.x;
  for (std::int64_t o = blockIdx.y; o < outer; o += gridDim.y) {
    A acc = 0;
    if (c < inner) {
      const T* xo = x + o * n * inner + c;
      for (std::int64_t j = threadIdx.y; j < n; j += kColumnRows) acc += xo[j * inner];
    }
    const A total = column_reduce(acc, part);
    if (threadIdx.y == 0 && c < inner) {
      Y& out = y[o * inner + c];
      const A prev = beta == Y(0) ? A(0) : A(beta) * A(out);
      out = static_cast<Y>(A(alpha) * total + prev);
    }
  }
}

// outer == 1: y[c] = alpha · Σ_j x[j, c] + beta · y[c] as a column reduction (the bias
// gradients: many rows, few columns).
template <class T>
struct SumColumnLoad {
  const T* x;
  std::int64_t inner;
  __device__ void operator()(std::int64_t j, std::int64_t c, acc_t<T>* acc) const {
    acc[0] += x[j * inner + c];
  }
  /// The same for V columns at once (reduce_column_chunks: rows of whole 16-byte chunks).
  template <int V>
  __device__ void operator()(std::int64_t j, std::int64_t c, acc_t<T> (&acc)[1][V]) const {
    const Chunk<T> chunk = load_chunk(x + j * inner + c);
#pragma unroll
    for (int v = 0; v < V; ++v) acc[0][v] += static_cast<acc_t<T>>(chunk.v[v]);
  }
};

template <class A, class Y>
struct SumColumnFinish {
  Y alpha, beta;
  Y* y;
  __device__ void operator()(std::int64_t c, const A* total) const {
    const A prev = beta == Y(0) ? A(0) : A(beta) * A(y[c]);
    y[c] = static_cast<Y>(A(alpha) * total[0] + prev);
  }
};

/// Blocks of a sum returned to the host (at most), so their partial sums fit a small host array.
inline constexpr std::int64_t kHostSumBlocks = 1024;

// partial[b] = Σ term(i) over the grid-stride share of block b, in double.
template <class Term>
__global__ void sum_terms_kernel(std::int64_t n, Term term, double* partial) {
  __shared__ double shared[32];
  const std::int64_t stride = static_cast<std::int64_t>(blockDim.x) * gridDim.x;
  double s = 0.0;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride)
    s += term(i);
  s = block_reduce(s, SumOp{}, shared);
  if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

/// Number of partial sums (blocks) a sum of n terms is split into: it depends on n only, so the
/// total does not change from run to run or from one GPU to another.
inline std::int64_t sum_blocks(std::int64_t n) {
  const std::int64_t wanted = (n + kThreads - 1) / kThreads;
  return wanted < 1 ? 1 : wanted < kHostSumBlocks ? wanted : kHostSumBlocks;
}

/// Queues the partial sums of Σ term(i), i < n, into partial[0 .. sum_blocks(n)) (device memory),
/// without waiting; the host adds them in block order.
template <class Term>
void sum_terms_partials(std::int64_t n, const Term& term, double* partial, const char* kernel) {
  sum_terms_kernel<<<static_cast<unsigned>(sum_blocks(n)), kThreads, 0, stream()>>>(n, term,
                                                                                    partial);
  check_launch(kernel);
}

/// Σ term(i) for i < n, in double, returned to the host (so it waits for the stream): the
/// partial sums of sum_terms_partials, added on the host in block order.
template <class Term>
double sum_terms_to_host(std::int64_t n, const Term& term, const char* kernel) {
  if (n <= 0) return 0.0;
  const std::int64_t blocks = sum_blocks(n);
  std::array<double, kHostSumBlocks> partial{};
  Context& ctx = Context::get();
  {
    // The scratch buffer is shared; hold it until the partial sums have reached the host.
    std::lock_guard<std::mutex> lock(ctx.scratch_mutex());
    auto* device_partial = static_cast<double*>(ctx.scratch(sizeof(double) * blocks));
    sum_terms_partials(n, term, device_partial, kernel);
    const cudaStream_t s = ctx.stream();
    MOCA_CUDA_CHECK(cudaMemcpyAsync(partial.data(), device_partial, sizeof(double) * blocks,
                                    cudaMemcpyDeviceToHost, s));
    ctx.wait_for_stream();
  }
  double total = 0.0;
  for (std::int64_t b = 0; b < blocks; ++b) total += partial[b];
  return total;
}

template <class T>
struct SquareTerm {
  const T* x;
  __device__ double operator()(std::int64_t i) const {
    const double v = static_cast<double>(x[i]);
    return v * v;
  }
};

}  // namespace kernels

template <class T, class Y>
void sum_middle(std::int64_t outer, std::int64_t n, std::int64_t inner, Y alpha, const T* x, Y beta,
                Y* y) {
  if (outer <= 0 || inner <= 0) return;
  const cudaStream_t s = stream();
  if (inner == 1 && n >= kernels::kLongRow && outer < kernels::kManyRows) {
    using A = kernels::acc_t<T>;
    const std::int64_t chunks = (n + kernels::kRowChunk - 1) / kernels::kRowChunk;
    auto* partial = static_cast<A*>(
        Context::get().workspace(sizeof(A) * static_cast<std::size_t>(outer * chunks)));
    kernels::sum_row_chunks_kernel<<<dim3(static_cast<unsigned>(chunks),
                                          static_cast<unsigned>(outer)),
                                     kernels::kThreads, 0, s>>>(n, kernels::kRowChunk, chunks, x,
                                                                partial);
    kernels::check_launch("sum_row_chunks_kernel");
    kernels::sum_row_chunks_finish<<<static_cast<unsigned>((outer + kernels::kThreads - 1) /
                                                           kernels::kThreads),
                                     kernels::kThreads, 0, s>>>(outer, chunks, partial, alpha,
                                                                beta, y);
    kernels::check_launch("sum_row_chunks_finish");
    return;
  }
  if (inner == 1) {
    kernels::sum_rows_kernel<<<kernels::row_blocks(outer), kernels::row_threads(n), 0, s>>>(
        outer, n, alpha, x, beta, y);
    kernels::check_launch("sum_rows_kernel");
    return;
  }
  if (outer == 1) {
    using A = kernels::acc_t<T>;
    const kernels::SumColumnLoad<T> load{x, inner};
    const kernels::SumColumnFinish<A, Y> finish{alpha, beta, y};
    if (Context::get().column_chunks() && chunked(x, inner, inner))
      kernels::reduce_column_chunks<1, A, kChunk<T>>(n, inner, load, finish, "sum over rows");
    else
      kernels::reduce_columns<1, A>(n, inner, load, finish, "sum over rows");
    return;
  }
  const dim3 block(kernels::kColumns, kernels::kColumnRows);
  const dim3 grid(static_cast<unsigned>((inner + kernels::kColumns - 1) / kernels::kColumns),
                  kernels::row_blocks(outer));
  kernels::sum_columns_kernel<<<grid, block, 0, s>>>(outer, n, inner, alpha, x, beta, y);
  kernels::check_launch("sum_columns_kernel");
}

template <class T>
double sum_squares(std::int64_t n, const T* x) {
  return kernels::sum_terms_to_host(n, kernels::SquareTerm<T>{x}, "sum_terms_kernel (sum_squares)");
}

template <class T>
void sum_squares_partials(std::int64_t n, const T* x, double* partial) {
  kernels::sum_terms_partials(n, kernels::SquareTerm<T>{x}, partial,
                              "sum_terms_kernel (sum_squares)");
}

}  // namespace moca::cuda
