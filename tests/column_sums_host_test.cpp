// The column-sum kernels of the CUDA backend (kernels/column_sums.cuh: the LayerNorm's and the
// Linears' parameter gradients) run on the host: the kernels' own code, compiled with
// tests/host_warps.hpp, each block's 128 threads as host threads over NaN-filled shared memory.
// The totals are held to an exact replica of the order of addition the header documents (rows
// of a warp in order, warps in order, chunks by warp group in order), so every index and the
// run-to-run determinism the backend promises are checked without a GPU, and to a sum in double.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "host_warps.hpp"
#define MOCA_KERNELS_ON_HOST
#include <moca/backend/cuda/kernels/chunk.hpp>
#include <moca/backend/cuda/kernels/column_sums.cuh>
#include <moca/core/bf16.hpp>
#include <moca/core/rng.hpp>

namespace {

using namespace moca;
namespace cs = moca::cuda::kernels::column_sums;

// The terms of element (r, j): x itself (P = 1: a bias gradient's Σ dy), or x·y and y (P = 2:
// a LayerNorm's Σ dy·x̂ and Σ dy, with y in the role of dy).
template <class T, int P>
struct TestLoad {
  const T* x;
  const T* y;
  std::int64_t N;
  template <int V>
  void operator()(std::int64_t r, std::int64_t j, float (&acc)[P][V]) const {
    const auto xc = cuda::load_chunk(x + r * N + j);
    const auto yc = cuda::load_chunk(y + r * N + j);
    for (int v = 0; v < V; ++v) {
      if constexpr (P == 1) {
        acc[0][v] += float(xc.v[v]);
      } else {
        acc[0][v] += float(xc.v[v]) * float(yc.v[v]);
        acc[1][v] += float(yc.v[v]);
      }
    }
  }
  float term(std::int64_t r, std::int64_t j, int p) const {
    if constexpr (P == 1) return float(x[r * N + j]);
    return p == 0 ? float(x[r * N + j]) * float(y[r * N + j]) : float(y[r * N + j]);
  }
};

template <int P>
struct TestFinish {
  float* out;  // [P][N]
  std::int64_t N;
  void operator()(std::int64_t j, const float* totals) const {
    for (int p = 0; p < P; ++p) out[p * N + j] = totals[p];
  }
};

template <class T, int P>
void check_columns(std::int64_t M, std::int64_t N) {
  CAPTURE(M);
  CAPTURE(N);
  CAPTURE(P);
  constexpr int V = cuda::kChunk<T>;
  std::vector<T> x(static_cast<std::size_t>(M * N)), y(x.size());
  Philox rng(11);
  // Values with bf16's 8 significant bits in either type: their products are exact in float, so
  // the replica's order is the only thing compared (a contracted multiply-add rounds alike).
  for (std::size_t i = 0; i < x.size(); ++i) {
    x[i] = T(float(bf16(rng.uniform(0, 2 * i) * 2 - 1)));
    y[i] = T(float(bf16(rng.uniform(0, 2 * i + 1) * 2 - 1)));
  }
  const TestLoad<T, P> load{x.data(), y.data(), N};
  const std::int64_t chunks = cs::chunks_for(M), rows = cs::chunk_rows_for(M);
  // NaN past the partial sums too: a read beyond the last chunk shows in the totals.
  std::vector<float> partial(static_cast<std::size_t>((chunks + 4 * cs::kWarps) * P * N),
                             std::numeric_limits<float>::quiet_NaN());
  std::vector<float> out(static_cast<std::size_t>(P * N), std::numeric_limits<float>::quiet_NaN());
  host_warps::launch(cs::chunk_partials_kernel<P, float, V, TestLoad<T, P>>,
                     HostDim3{static_cast<unsigned>((N + 32 * V - 1) / (32 * V)),
                              static_cast<unsigned>(chunks), 1},
                     cs::kPartialsBytes<P, float, V>, M, N, rows, load, partial.data());
  host_warps::launch(cs::column_totals_kernel<P, float, TestFinish<P>>,
                     HostDim3{static_cast<unsigned>((N + 31) / 32), 1, 1},
                     cs::kTotalsBytes<P, float>, N, chunks,
                     static_cast<const float*>(partial.data()), TestFinish<P>{out.data(), N});

  // The documented order, replayed serially.
  int mismatches = 0;
  double worst = 0;
  for (int p = 0; p < P; ++p)
    for (std::int64_t j = 0; j < N; ++j) {
      std::vector<float> chunk_sum(static_cast<std::size_t>(chunks));
      for (std::int64_t c = 0; c < chunks; ++c) {
        const std::int64_t r0 = c * rows, r1 = std::min(M, r0 + rows);
        float by_warp[cs::kWarps];
        for (int w = 0; w < cs::kWarps; ++w) {
          by_warp[w] = 0;
          for (std::int64_t r = r0 + w; r < r1; r += cs::kWarps) by_warp[w] += load.term(r, j, p);
        }
        float t = by_warp[0];
        for (int w = 1; w < cs::kWarps; ++w) t += by_warp[w];
        chunk_sum[static_cast<std::size_t>(c)] = t;
      }
      float by_group[cs::kWarps];
      for (int w = 0; w < cs::kWarps; ++w) {
        by_group[w] = 0;
        for (std::int64_t c = w; c < chunks; c += cs::kWarps)
          by_group[w] += chunk_sum[static_cast<std::size_t>(c)];
      }
      float expected = by_group[0];
      for (int w = 1; w < cs::kWarps; ++w) expected += by_group[w];
      const float got = out[static_cast<std::size_t>(p * N + j)];
      if (!(got == expected)) ++mismatches;  // NaN counts
      double exact = 0, size = 0;
      for (std::int64_t r = 0; r < M; ++r) {
        exact += load.term(r, j, p);
        size += std::abs(load.term(r, j, p));
      }
      const double err = std::abs(double(got) - exact) / std::max(size, 1e-30);
      if (!(err <= worst)) worst = err;  // NaN stays
    }
  INFO("mismatches ", mismatches, ", worst error against double ", worst);
  CHECK(mismatches == 0);
  CHECK(worst < 1e-6);
}

}  // namespace

TEST_CASE("column sums on the host: every column, ragged chunks and column blocks, exact order") {
  // bf16 rows (8 columns per thread) and float rows (4): one row, rows that end a chunk or a
  // warp's step early, more rows than 256 chunks of 64 (longer chunks), widths of a partial
  // column block, the LayerNorm's 768, and chunk counts on either side of the totals' steps.
  check_columns<bf16, 1>(1, 8);
  check_columns<bf16, 2>(3, 24);
  check_columns<bf16, 1>(65, 264);
  check_columns<bf16, 2>(300, 768);
  check_columns<float, 2>(131, 36);
  check_columns<float, 1>(17000, 8);
  check_columns<bf16, 2>(97, 2056);
  check_columns<bf16, 2>(1723, 40);  // 27 chunks: the totals' steps of four and their tail
}
