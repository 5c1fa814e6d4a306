// Row kernels: softmax (with the codebook's spread), log-softmax, LayerNorm, L2 normalisation over the rows of [M, N].
// Contracts as in backend/cpu/rows.hpp.
//
// One block per row. Every pass over a row has thread t touch elements t, t + blockDim.x, ...,
// and the block reductions between passes synchronise the block, so an output row may alias its
// input row (y = x, dx = dy) exactly as on the CPU. Float rows accumulate in float. LayerNorm
// rows of up to 1024 elements take one warp per row instead, the row held in registers (each
// lane reads its elements before it writes them, so the same aliasing holds).
#pragma once

#include "moca/backend/cuda/kernels/common.cuh"

namespace moca::cuda {
namespace kernels {

template <class T>
__global__ void softmax_rows_kernel(std::int64_t M, std::int64_t N, const T* x, T* y) {
  using A = acc_t<T>;
  __shared__ A shared[32];
  for (std::int64_t r = blockIdx.x; r < M; r += gridDim.x) {
    const T* xr = x + r * N;
    T* yr = y + r * N;
    A mx = neg_infinity<A>();
    for (std::int64_t j = threadIdx.x; j < N; j += blockDim.x) mx = MaxOp{}(mx, A(xr[j]));
    const A m = block_reduce(mx, MaxOp{}, shared);
    // The exponentials are summed, then computed again for the output: y (which may alias x)
    // is written once, rounded once, as the CPU's bf16 rows are.
    A sum = 0;
    for (std::int64_t j = threadIdx.x; j < N; j += blockDim.x) sum += dexp(xr[j] - m);
    const A inv = A(1) / block_reduce(sum, SumOp{}, shared);
    for (std::int64_t j = threadIdx.x; j < N; j += blockDim.x)
      yr[j] = static_cast<T>(dexp(xr[j] - m) * inv);
  }
}

template <class T>
__global__ void log_softmax_rows_kernel(std::int64_t M, std::int64_t N, const T* x, T* y) {
  using A = acc_t<T>;
  __shared__ A shared[32];
  for (std::int64_t r = blockIdx.x; r < M; r += gridDim.x) {
    const T* xr = x + r * N;
    T* yr = y + r * N;
    A mx = neg_infinity<A>();
    for (std::int64_t j = threadIdx.x; j < N; j += blockDim.x) mx = MaxOp{}(mx, A(xr[j]));
    const A m = block_reduce(mx, MaxOp{}, shared);
    A sum = 0;
    for (std::int64_t j = threadIdx.x; j < N; j += blockDim.x) sum += dexp(xr[j] - m);
    const A lse = m + dlog(block_reduce(sum, SumOp{}, shared));
    for (std::int64_t j = threadIdx.x; j < N; j += blockDim.x) yr[j] = xr[j] - lse;
  }
}

// spread = max − mean of the row, then the row ← softmax(scale · row), in place: MOCA's codebook
// codes and their temperature statistic in three reads and one write of the row.
template <class T>
__global__ void softmax_spread_rows_kernel(std::int64_t M, std::int64_t N, T scale, T* x,
                                           T* spread) {
  using A = acc_t<T>;
  __shared__ A shared[32];
  for (std::int64_t r = blockIdx.x; r < M; r += gridDim.x) {
    T* xr = x + r * N;
    A mx = neg_infinity<A>(), total = 0;
    for (std::int64_t j = threadIdx.x; j < N; j += blockDim.x) {
      const A v = xr[j];
      mx = MaxOp{}(mx, v);
      total += v;
    }
    const A m = block_reduce(mx, MaxOp{}, shared);
    const A t = block_reduce(total, SumOp{}, shared);
    if (threadIdx.x == 0) spread[r] = m - t / static_cast<A>(N);
    A sum = 0;  // as in softmax_rows_kernel: the row written once, rounded once
    for (std::int64_t j = threadIdx.x; j < N; j += blockDim.x) sum += dexp(scale * (xr[j] - m));
    const A inv = A(1) / block_reduce(sum, SumOp{}, shared);
    for (std::int64_t j = threadIdx.x; j < N; j += blockDim.x)
      xr[j] = static_cast<T>(dexp(scale * (xr[j] - m)) * inv);
  }
}

// dx = y · (dy − <dy, y>)
template <class T>
__global__ void softmax_rows_backward_kernel(std::int64_t M, std::int64_t N, const T* y,
                                             const T* dy, T* dx) {
  using A = acc_t<T>;
  __shared__ A shared[32];
  for (std::int64_t r = blockIdx.x; r < M; r += gridDim.x) {
    const T *yr = y + r * N, *gr = dy + r * N;
    T* dr = dx + r * N;
    A dot = 0;
    for (std::int64_t j = threadIdx.x; j < N; j += blockDim.x) dot += gr[j] * yr[j];
    const A d = block_reduce(dot, SumOp{}, shared);
    for (std::int64_t j = threadIdx.x; j < N; j += blockDim.x) dr[j] = yr[j] * (gr[j] - d);
  }
}

// dx = dy − exp(y) · Σ dy
template <class T>
__global__ void log_softmax_rows_backward_kernel(std::int64_t M, std::int64_t N, const T* y,
                                                 const T* dy, T* dx) {
  using A = acc_t<T>;
  __shared__ A shared[32];
  for (std::int64_t r = blockIdx.x; r < M; r += gridDim.x) {
    const T *yr = y + r * N, *gr = dy + r * N;
    T* dr = dx + r * N;
    A sum = 0;
    for (std::int64_t j = threadIdx.x; j < N; j += blockDim.x) sum += gr[j];
    const A s = block_reduce(sum, SumOp{}, shared);
    for (std::int64_t j = threadIdx.x; j < N; j += blockDim.x) dr[j] = gr[j] - dexp(yr[j]) * s;
  }
}

// Two passes for the statistics (the mean, then the squared deviations from it), as on the CPU.
// With `add`: the row is x + add, also written to `sum` (which may alias x or add: every pass
// has each thread read and write only its own elements).
template <class T>
__global__ void layer_norm_forward_kernel(std::int64_t M, std::int64_t N, const T* x,
                                          const T* gamma, const T* beta, acc_t<T> eps, T* y,
                                          acc_t<T>* mean, acc_t<T>* rstd, const T* add, T* sum) {
  using A = acc_t<T>;
  __shared__ A shared[32];
  for (std::int64_t r = blockIdx.x; r < M; r += gridDim.x) {
    const T* xr = x + r * N;
    T* yr = y + r * N;
    A s = 0;
    if (add) {
      const T* ar = add + r * N;
      T* sr = sum + r * N;
      for (std::int64_t j = threadIdx.x; j < N; j += blockDim.x) {
        const T v = static_cast<T>(xr[j] + ar[j]);
        sr[j] = v;
        s += v;
      }
      xr = sr;
    } else {
      for (std::int64_t j = threadIdx.x; j < N; j += blockDim.x) s += xr[j];
    }
    const A mu = block_reduce(s, SumOp{}, shared) / static_cast<A>(N);
    A ss = 0;
    for (std::int64_t j = threadIdx.x; j < N; j += blockDim.x) {
      const A d = xr[j] - mu;
      ss += d * d;
    }
    const A rs = A(1) / dsqrt(block_reduce(ss, SumOp{}, shared) / static_cast<A>(N) + eps);
    const A m = mu, is = rs;
    for (std::int64_t j = threadIdx.x; j < N; j += blockDim.x) {
      A v = (xr[j] - m) * is;
      if (gamma) v *= gamma[j];
      if (beta) v += beta[j];
      yr[j] = v;
    }
    if (threadIdx.x == 0) {
      mean[r] = m;
      rstd[r] = is;
    }
  }
}

// dx = rstd · (g − mean(g) − xhat · mean(g · xhat)) (+ residual), g = dy · gamma (or dy
// without gamma).
template <class T>
__global__ void layer_norm_backward_kernel(std::int64_t M, std::int64_t N, const T* x,
                                           const T* gamma, const acc_t<T>* mean,
                                           const acc_t<T>* rstd, const T* dy, T* dx,
                                           const T* residual) {
  using A = acc_t<T>;
  __shared__ A shared[32];
  for (std::int64_t r = blockIdx.x; r < M; r += gridDim.x) {
    const T *xr = x + r * N, *gr = dy + r * N;
    T* dr = dx + r * N;
    const A m = mean[r], is = rstd[r];
    A sum_g = 0, sum_gx = 0;
    for (std::int64_t j = threadIdx.x; j < N; j += blockDim.x) {
      const A g0 = gr[j];
      const A g = gamma ? g0 * gamma[j] : g0;
      sum_g += g;
      sum_gx += g * (xr[j] - m) * is;
    }
    const A mg = block_reduce(sum_g, SumOp{}, shared) / static_cast<A>(N);
    const A mgx = block_reduce(sum_gx, SumOp{}, shared) / static_cast<A>(N);
    for (std::int64_t j = threadIdx.x; j < N; j += blockDim.x) {
      const A g0 = gr[j];
      const A g = gamma ? g0 * gamma[j] : g0;
      const A xhat = (xr[j] - m) * is;
      const A v = is * (g - mg - xhat * mgx);
      dr[j] = residual ? v + residual[r * N + j] : v;
    }
  }
}

// The same two kernels for rows that fit a warp's registers (kWarpRowMax elements, N a whole
// number of 16-byte chunks, every row pointer 16-byte aligned; warp_row_elements says): one warp
// per row, each lane holding E elements of it in registers (chunks lane, lane + 32, … of the
// row), so x (and add) are read once and y (and sum) written once, in 16-byte chunks, and the
// row's sums are warp shuffles with no shared memory or block barrier. ViT rows (384, 512, 768,
// 1024 features) take these; others the kernels above. Same arithmetic: two passes for the
// statistics, intermediates in acc_t, values rounded once as they are stored.
inline constexpr std::int64_t kWarpRowMax = 1024;
/// Threads per block of the warp-per-row kernels: eight rows at a time.
inline constexpr int kWarpRowThreads = 256;

/// The first row of this thread's warp, and the distance to its next (one warp per row, blocks
/// of whole warps, more rows than warps loop).
__device__ inline std::int64_t first_warp_row() {
  return static_cast<std::int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
}
__device__ inline std::int64_t warp_row_stride() {
  return static_cast<std::int64_t>(gridDim.x) * (blockDim.x / 32);
}

template <class T, int E>
__global__ void __launch_bounds__(kWarpRowThreads)
    layer_norm_forward_warp_kernel(std::int64_t M, std::int64_t N, const T* x, const T* gamma,
                                   const T* beta, acc_t<T> eps, T* y, acc_t<T>* mean,
                                   acc_t<T>* rstd, const T* add, T* sum) {
  using A = acc_t<T>;
  constexpr int V = kChunk<T>, C = E / V;
  const int lane = static_cast<int>(threadIdx.x % 32);
  for (std::int64_t r = first_warp_row(); r < M; r += warp_row_stride()) {
    A v[C][V];
    A s = 0;
#pragma unroll
    for (int c = 0; c < C; ++c) {
      const std::int64_t j = (std::int64_t(c) * 32 + lane) * V;
      if (j < N) {
        Chunk<T> xc = load_chunk(x + r * N + j);
        if (add) {
          const Chunk<T> ac = load_chunk(add + r * N + j);
#pragma unroll
          for (int u = 0; u < V; ++u) xc.v[u] = static_cast<T>(xc.v[u] + ac.v[u]);
          store_chunk(sum + r * N + j, xc);
        }
#pragma unroll
        for (int u = 0; u < V; ++u) {
          v[c][u] = xc.v[u];
          s += v[c][u];
        }
      } else {
#pragma unroll
        for (int u = 0; u < V; ++u) v[c][u] = 0;
      }
    }
    const A mu = warp_reduce(s, SumOp{}) / static_cast<A>(N);
    A ss = 0;
#pragma unroll
    for (int c = 0; c < C; ++c)
      if ((std::int64_t(c) * 32 + lane) * V < N) {
#pragma unroll
        for (int u = 0; u < V; ++u) {
          const A d = v[c][u] - mu;
          ss += d * d;
        }
      }
    const A rs = A(1) / dsqrt(warp_reduce(ss, SumOp{}) / static_cast<A>(N) + eps);
#pragma unroll
    for (int c = 0; c < C; ++c) {
      const std::int64_t j = (std::int64_t(c) * 32 + lane) * V;
      if (j >= N) continue;
      Chunk<T> g, b, out;
      if (gamma) g = load_chunk(gamma + j);
      if (beta) b = load_chunk(beta + j);
#pragma unroll
      for (int u = 0; u < V; ++u) {
        A o = (v[c][u] - mu) * rs;
        if (gamma) o *= static_cast<A>(g.v[u]);
        if (beta) o += static_cast<A>(b.v[u]);
        out.v[u] = static_cast<T>(o);
      }
      store_chunk(y + r * N + j, out);
    }
    if (lane == 0) {
      mean[r] = mu;
      rstd[r] = rs;
    }
  }
}

template <class T, int E>
__global__ void __launch_bounds__(kWarpRowThreads)
    layer_norm_backward_warp_kernel(std::int64_t M, std::int64_t N, const T* x, const T* gamma,
                                    const acc_t<T>* mean, const acc_t<T>* rstd, const T* dy, T* dx,
                                    const T* residual) {
  using A = acc_t<T>;
  constexpr int V = kChunk<T>, C = E / V;
  const int lane = static_cast<int>(threadIdx.x % 32);
  for (std::int64_t r = first_warp_row(); r < M; r += warp_row_stride()) {
    const A m = mean[r], is = rstd[r];
    A g[C][V], xh[C][V];
    A sum_g = 0, sum_gx = 0;
#pragma unroll
    for (int c = 0; c < C; ++c) {
      const std::int64_t j = (std::int64_t(c) * 32 + lane) * V;
      if (j < N) {
        const Chunk<T> xc = load_chunk(x + r * N + j), dc = load_chunk(dy + r * N + j);
        Chunk<T> gc;
        if (gamma) gc = load_chunk(gamma + j);
#pragma unroll
        for (int u = 0; u < V; ++u) {
          g[c][u] = gamma ? A(dc.v[u]) * A(gc.v[u]) : A(dc.v[u]);
          xh[c][u] = (A(xc.v[u]) - m) * is;
          sum_g += g[c][u];
          sum_gx += g[c][u] * xh[c][u];
        }
      } else {
#pragma unroll
        for (int u = 0; u < V; ++u) g[c][u] = xh[c][u] = 0;
      }
    }
    const A mg = warp_reduce(sum_g, SumOp{}) / static_cast<A>(N);
    const A mgx = warp_reduce(sum_gx, SumOp{}) / static_cast<A>(N);
#pragma unroll
    for (int c = 0; c < C; ++c) {
      const std::int64_t j = (std::int64_t(c) * 32 + lane) * V;
      if (j >= N) continue;
      Chunk<T> res, out;
      if (residual) res = load_chunk(residual + r * N + j);
#pragma unroll
      for (int u = 0; u < V; ++u) {
        const A v = is * (g[c][u] - mg - xh[c][u] * mgx);
        out.v[u] = static_cast<T>(residual ? v + A(res.v[u]) : v);
      }
      store_chunk(dx + r * N + j, out);
    }
  }
}

/// The elements per lane (8, 16 or 32) the warp-per-row kernels need for rows of N, or 0 when
/// the rows do not suit them (too long, not whole chunks, a pointer not 16-byte aligned).
template <class T>
int warp_row_elements(std::int64_t N, std::initializer_list<const void*> rows) {
  if (N <= 0 || N > kWarpRowMax || N % kChunk<T> != 0) return 0;
  for (const void* p : rows)
    if (!aligned16(p)) return 0;
  return N <= 32 * 8 ? 8 : (N <= 32 * 16 ? 16 : 32);
}

/// Blocks of kWarpRowThreads for M rows, one warp each (more rows than warps loop).
inline unsigned warp_row_blocks(std::int64_t M) {
  const std::int64_t rows = kWarpRowThreads / 32, blocks = (M + rows - 1) / rows;
  return static_cast<unsigned>(blocks < kMaxRowBlocks ? blocks : kMaxRowBlocks);
}

/// Runs f.template operator()<E>() for the elements per lane e (8, 16 or 32).
template <class F>
void with_warp_row_elements(int e, F&& f) {
  if (e == 8)
    f.template operator()<8>();
  else if (e == 16)
    f.template operator()<16>();
  else
    f.template operator()<32>();
}

// dgamma[j] += Σ_r dy[r, j] · xhat[r, j],  dbeta[j] += Σ_r dy[r, j]: a column reduction
// (reduce_columns in common.cuh), one writer per column, so accumulating needs no atomics.
template <class T>
struct LayerNormParamLoad {
  const T* x;
  const acc_t<T>* mean;
  const acc_t<T>* rstd;
  const T* dy;
  std::int64_t N;
  __device__ void operator()(std::int64_t r, std::int64_t j, acc_t<T>* acc) const {
    const acc_t<T> g = dy[r * N + j];
    acc[0] += g * (x[r * N + j] - mean[r]) * rstd[r];
    acc[1] += g;
  }
  /// The same for V columns at once (reduce_column_chunks: rows of whole 16-byte chunks).
  template <int V>
  __device__ void operator()(std::int64_t r, std::int64_t j, acc_t<T> (&acc)[2][V]) const {
    const Chunk<T> xc = load_chunk(x + r * N + j), dc = load_chunk(dy + r * N + j);
    const acc_t<T> m = mean[r], is = rstd[r];
#pragma unroll
    for (int v = 0; v < V; ++v) {
      const acc_t<T> g = dc.v[v];
      acc[0][v] += g * (acc_t<T>(xc.v[v]) - m) * is;
      acc[1][v] += g;
    }
  }
};

template <class T>
struct LayerNormParamFinish {
  // The parameters' gradients: acc_t, float for bf16 rows.
  acc_t<T>* dgamma;
  acc_t<T>* dbeta;
  __device__ void operator()(std::int64_t j, const acc_t<T>* total) const {
    if (dgamma) dgamma[j] += total[0];
    if (dbeta) dbeta[j] += total[1];
  }
};

// y = x / max(||x||, eps); norm = ||x|| before the clamp.
template <class T>
__global__ void l2_normalize_rows_forward_kernel(std::int64_t M, std::int64_t N, const T* x,
                                                 acc_t<T> eps, T* y, acc_t<T>* norm) {
  using A = acc_t<T>;
  __shared__ A shared[32];
  for (std::int64_t r = blockIdx.x; r < M; r += gridDim.x) {
    const T* xr = x + r * N;
    T* yr = y + r * N;
    A ss = 0;
    for (std::int64_t j = threadIdx.x; j < N; j += blockDim.x) ss += xr[j] * xr[j];
    const A nrm = dsqrt(block_reduce(ss, SumOp{}, shared));
    const A e = eps;
    const A inv = A(1) / (nrm < e ? e : nrm);  // std::max(nrm, eps), NaN handling included
    for (std::int64_t j = threadIdx.x; j < N; j += blockDim.x) yr[j] = xr[j] * inv;
    if (threadIdx.x == 0) norm[r] = nrm;
  }
}

// x[r] /= max(Σ|x[r]|, eps) in place: the sum and the scaling of a row in one block, with no
// round trip to the host.
template <class T>
__global__ void l1_normalize_rows_kernel(std::int64_t M, std::int64_t N, acc_t<T> eps, T* x) {
  using A = acc_t<T>;
  __shared__ A shared[32];
  for (std::int64_t r = blockIdx.x; r < M; r += gridDim.x) {
    T* xr = x + r * N;
    A s = 0;
    for (std::int64_t j = threadIdx.x; j < N; j += blockDim.x) {
      const A v = xr[j];
      s += v < A(0) ? -v : v;
    }
    const A total = block_reduce(s, SumOp{}, shared);
    const A inv = A(1) / (total < eps ? eps : total);  // std::max(total, eps)
    for (std::int64_t j = threadIdx.x; j < N; j += blockDim.x)
      xr[j] = static_cast<T>(A(xr[j]) * inv);
  }
}

// Where ||x|| > eps: dx = (dy − y <y, dy>) / ||x||; where clamped: dx = dy / eps.
template <class T>
__global__ void l2_normalize_rows_backward_kernel(std::int64_t M, std::int64_t N, const T* y,
                                                  const acc_t<T>* norm, acc_t<T> eps, const T* dy,
                                                  T* dx) {
  using A = acc_t<T>;
  __shared__ A shared[32];
  for (std::int64_t r = blockIdx.x; r < M; r += gridDim.x) {
    const T *yr = y + r * N, *gr = dy + r * N;
    T* dr = dx + r * N;
    const A nrm = norm[r], e = eps;
    if (nrm > e) {  // the same for the whole block, so the reduction inside is safe
      A dot = 0;
      for (std::int64_t j = threadIdx.x; j < N; j += blockDim.x) dot += yr[j] * gr[j];
      const A d = block_reduce(dot, SumOp{}, shared);
      const A inv = A(1) / nrm;
      for (std::int64_t j = threadIdx.x; j < N; j += blockDim.x) dr[j] = (gr[j] - yr[j] * d) * inv;
    } else {
      for (std::int64_t j = threadIdx.x; j < N; j += blockDim.x) dr[j] = gr[j] / e;
    }
  }
}

}  // namespace kernels

template <class T>
void softmax_rows(std::int64_t M, std::int64_t N, const T* x, T* y) {
  if (M <= 0 || N <= 0) return;
  kernels::softmax_rows_kernel<<<kernels::row_blocks(M), kernels::row_threads(N), 0, stream()>>>(
      M, N, x, y);
  kernels::check_launch("softmax_rows_kernel");
}

template <class T>
void softmax_spread_rows(std::int64_t M, std::int64_t N, T scale, T* x, T* spread) {
  if (M <= 0 || N <= 0) return;
  kernels::softmax_spread_rows_kernel<<<kernels::row_blocks(M), kernels::row_threads(N), 0,
                                        stream()>>>(M, N, scale, x, spread);
  kernels::check_launch("softmax_spread_rows_kernel");
}

template <class T>
void log_softmax_rows(std::int64_t M, std::int64_t N, const T* x, T* y) {
  if (M <= 0 || N <= 0) return;
  kernels::log_softmax_rows_kernel<<<kernels::row_blocks(M), kernels::row_threads(N), 0,
                                     stream()>>>(M, N, x, y);
  kernels::check_launch("log_softmax_rows_kernel");
}

template <class T>
void softmax_rows_backward(std::int64_t M, std::int64_t N, const T* y, const T* dy, T* dx) {
  if (M <= 0 || N <= 0) return;
  kernels::softmax_rows_backward_kernel<<<kernels::row_blocks(M), kernels::row_threads(N), 0,
                                          stream()>>>(M, N, y, dy, dx);
  kernels::check_launch("softmax_rows_backward_kernel");
}

template <class T>
void log_softmax_rows_backward(std::int64_t M, std::int64_t N, const T* y, const T* dy, T* dx) {
  if (M <= 0 || N <= 0) return;
  kernels::log_softmax_rows_backward_kernel<<<kernels::row_blocks(M), kernels::row_threads(N), 0,
                                              stream()>>>(M, N, y, dy, dx);
  kernels::check_launch("log_softmax_rows_backward_kernel");
}

namespace kernels {

template <class T>
void layer_norm_forward(std::int64_t M, std::int64_t N, const T* x, const T* gamma, const T* beta,
                        double eps, T* y, acc_t<T>* mean, acc_t<T>* rstd, const T* add, T* sum) {
  if (M <= 0) return;  // N == 0 still writes mean and rstd (NaN), as on the CPU
  const acc_t<T> e = static_cast<acc_t<T>>(eps);
  if (const int per_lane = warp_row_elements<T>(N, {x, gamma, beta, y, add, sum})) {
    with_warp_row_elements(per_lane, [&]<int E>() {
      layer_norm_forward_warp_kernel<T, E><<<warp_row_blocks(M), kWarpRowThreads, 0, stream()>>>(
          M, N, x, gamma, beta, e, y, mean, rstd, add, sum);
    });
    check_launch("layer_norm_forward_warp_kernel");
    return;
  }
  layer_norm_forward_kernel<<<row_blocks(M), row_threads(N), 0, stream()>>>(
      M, N, x, gamma, beta, e, y, mean, rstd, add, sum);
  check_launch("layer_norm_forward_kernel");
}

template <class T>
void layer_norm_backward(std::int64_t M, std::int64_t N, const T* x, const T* gamma,
                         const acc_t<T>* mean, const acc_t<T>* rstd, const T* dy, T* dx,
                         acc_t<T>* dgamma, acc_t<T>* dbeta, const T* residual) {
  if (M <= 0 || N <= 0) return;
  // Parameter gradients first: dx may overwrite dy, and the stream runs the kernels in order.
  if (dgamma || dbeta) {
    const LayerNormParamLoad<T> load{x, mean, rstd, dy, N};
    const LayerNormParamFinish<T> finish{dgamma, dbeta};
    const char* name = "layer_norm parameter gradients";
    if (Context::get().column_chunks() && chunked(x, N, N) && aligned16(dy))
      reduce_column_chunks<2, acc_t<T>, kChunk<T>>(M, N, load, finish, name);
    else
      reduce_columns<2, acc_t<T>>(M, N, load, finish, name);
  }
  if (const int per_lane = warp_row_elements<T>(N, {x, gamma, dy, dx, residual})) {
    with_warp_row_elements(per_lane, [&]<int E>() {
      layer_norm_backward_warp_kernel<T, E><<<warp_row_blocks(M), kWarpRowThreads, 0, stream()>>>(
          M, N, x, gamma, mean, rstd, dy, dx, residual);
    });
    check_launch("layer_norm_backward_warp_kernel");
    return;
  }
  layer_norm_backward_kernel<<<row_blocks(M), row_threads(N), 0, stream()>>>(
      M, N, x, gamma, mean, rstd, dy, dx, residual);
  check_launch("layer_norm_backward_kernel");
}

}  // namespace kernels

template <class T>
void layer_norm_forward(std::int64_t M, std::int64_t N, const T* x, const T* gamma, const T* beta,
                        double eps, T* y, compute_t<T>* mean, compute_t<T>* rstd) {
  kernels::layer_norm_forward<T>(M, N, x, gamma, beta, eps, y, mean, rstd, nullptr, nullptr);
}

template <class T>
void add_layer_norm_forward(std::int64_t M, std::int64_t N, const T* x, const T* add,
                            const T* gamma, const T* beta, double eps, T* sum, T* y,
                            compute_t<T>* mean, compute_t<T>* rstd) {
  kernels::layer_norm_forward<T>(M, N, x, gamma, beta, eps, y, mean, rstd, add, sum);
}

template <class T>
void layer_norm_backward(std::int64_t M, std::int64_t N, const T* x, const T* gamma,
                         const compute_t<T>* mean, const compute_t<T>* rstd, const T* dy, T* dx,
                         compute_t<T>* dgamma, compute_t<T>* dbeta) {
  kernels::layer_norm_backward<T>(M, N, x, gamma, mean, rstd, dy, dx, dgamma, dbeta, nullptr);
}

template <class T>
void layer_norm_backward_add(std::int64_t M, std::int64_t N, const T* x, const T* gamma,
                             const compute_t<T>* mean, const compute_t<T>* rstd, const T* dy,
                             const T* residual, T* dx, compute_t<T>* dgamma, compute_t<T>* dbeta) {
  kernels::layer_norm_backward<T>(M, N, x, gamma, mean, rstd, dy, dx, dgamma, dbeta, residual);
}

template <class T>
void l2_normalize_rows_forward(std::int64_t M, std::int64_t N, const T* x, double eps, T* y,
                               compute_t<T>* norm) {
  if (M <= 0) return;  // N == 0 still writes norm = 0, as on the CPU
  kernels::l2_normalize_rows_forward_kernel<<<kernels::row_blocks(M), kernels::row_threads(N), 0,
                                              stream()>>>(
      M, N, x, static_cast<kernels::acc_t<T>>(eps), y, norm);
  kernels::check_launch("l2_normalize_rows_forward_kernel");
}

template <class T>
void l1_normalize_rows(std::int64_t M, std::int64_t N, double eps, T* x) {
  if (M <= 0 || N <= 0) return;
  kernels::l1_normalize_rows_kernel<<<kernels::row_blocks(M), kernels::row_threads(N), 0,
                                      stream()>>>(M, N, static_cast<kernels::acc_t<T>>(eps), x);
  kernels::check_launch("l1_normalize_rows_kernel");
}

template <class T>
void l2_normalize_rows_backward(std::int64_t M, std::int64_t N, const T* y,
                                const compute_t<T>* norm, double eps, const T* dy, T* dx) {
  if (M <= 0 || N <= 0) return;
  kernels::l2_normalize_rows_backward_kernel<<<kernels::row_blocks(M), kernels::row_threads(N), 0,
                                               stream()>>>(
      M, N, y, norm, static_cast<kernels::acc_t<T>>(eps), dy, dx);
  kernels::check_launch("l2_normalize_rows_backward_kernel");
}

}  // namespace moca::cuda
