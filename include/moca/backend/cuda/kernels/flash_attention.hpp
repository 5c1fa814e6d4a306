// The block programs of the fused ("flash") attention: what one thread block of the CUDA kernels
// in attention.cuh does, written once for the device and for a serial host run of the same code
// (tests/flash_attention_test.cpp checks every index and mask of it on a machine without a GPU).
//
// Layout as ops/attention.hpp: qkv [B, S, 3·dim] (q | k | v, head h at features h·hd …),
// ctx [B, S, dim]. Per (image, head), with tiles of `tile` query rows and `tile` key rows:
//
//   forward_block  (one query tile): the scores of the tile against every key tile, an online
//                  softmax (running row max m and sum l, earlier output rescaled by e^(m_old −
//                  m_new)), o = Σ p·v; writes ctx and lse = m + log l [B, H, S]. The [S, S]
//                  probabilities never leave shared memory.
//   dq_block       (one query tile): δ = rowsum(do ∘ o) (written to global for dkdv_block), then
//                  for every key tile p = e^(s − lse), dS = p ∘ (do·vᵀ − δ), dq += scale · dS·k.
//   dkdv_block     (one key tile): for every query tile the same p and dS, dv += pᵀ·do,
//                  dk += scale · dSᵀ·q.
//
// The backward is split in two passes so that each output row is written by one block and every
// sum runs in a fixed order: results do not change from run to run (no atomics). It recomputes the
// scores in both passes, 7 tile products instead of the 4 a kept [S, S] matrix needs; attention
// is a small share of a ViT's FLOPs, the [B, H, S, S] buffers were most of its memory.
//
// Every program runs on `Exec` (tid(), threads(), sync(): a CUDA block, or one serial "thread")
// and multiplies shared-memory tiles through `Mma::product` (SimtMma below: plain FMAs, exact
// fp32/fp64; the tensor-core policy lives in attention.cuh). Loops over tile elements are
// `for (i = tid; i < n; i += threads)`, so the serial run covers every element a block does.
// Padding rows and columns (past S, past hd) are zero in shared memory and masked out of the
// softmax; nothing past S or hd is written. The products of a ragged tile (the last query or key
// tile of a head) stop at the 16-row boundary past its last row (up16): at ViT's 197 tokens and
// 64-row tiles that is 208 rows of work instead of 256 in each dimension of the scores. Shared
// memory past that boundary is then never written, and nothing reads it: the softmax and
// probs_and_dscores work up to the same boundaries (writing zeros between the last valid row or
// column and the boundary), and so do the next products.
//
// Storage and arithmetic are separate types: q, k, v, ctx and their gradients are G in global
// memory (float, double or bf16); shared memory, the softmax and lse and δ are flash_acc_t<G>
// (float for bf16). A bf16 tile is widened as it is loaded and rounded once as it is stored, so
// the scores, exponentials and sums of a bf16 head run in float, and the log-sum-exp the backward
// subtracts keeps float precision (in bf16 it would be off by up to 2^-9 of itself, which scales
// every recomputed probability of its row by the same error).
#pragma once

#include <math.h>

#include <cstddef>
#include <cstdint>

#include "moca/core/bf16.hpp"

// Programs run on the device (MOCA_FLASH_FN); geometry is also computed by the host launcher
// (MOCA_FLASH_HD). Without nvcc both are plain inline functions.
#if defined(__CUDACC__)
#define MOCA_FLASH_FN __device__ inline
#define MOCA_FLASH_HD __host__ __device__ inline
#else
#define MOCA_FLASH_FN inline
#define MOCA_FLASH_HD inline
#endif

namespace moca::cuda::flash {

/// What a head stored as G is computed in: shared-memory tiles, scores, lse and δ.
template <class G>
using flash_acc_t = compute_t<G>;

/// Tile sizes the programs support (multiples of 16, the tensor-core fragment height).
inline constexpr int kTiles[] = {64, 32, 16};
/// Widest head the programs support.
inline constexpr int kMaxHeadDim = 256;

/// Shared-memory geometry of one block: [tile, hdp] buffers with row stride ldh and
/// [tile, tile] buffers with row stride ldt. The strides are 4 elements past the width so that
/// consecutive rows start in different banks, and stay multiples of 4 (tensor-core loads).
struct Geometry {
  int tile = 0;  // query rows of a query tile = key rows of a key tile
  int hd = 0;    // head width
  int hdp = 0;   // head width rounded up to a multiple of 16 (zero columns past hd)
  int ldh = 0;
  int ldt = 0;
};

MOCA_FLASH_HD Geometry make_geometry(int tile, int hd) {
  Geometry g;
  g.tile = tile;
  g.hd = hd;
  g.hdp = (hd + 15) / 16 * 16;
  g.ldh = g.hdp + 4;
  g.ldt = tile + 4;
  return g;
}

/// Which program a block runs.
enum class Program { Forward, Dq, Dkdv };

/// Buffers of each program: [tile, hdp] ones, [tile, tile] ones, and per-row vectors.
struct Buffers {
  int h, t, v;
};
MOCA_FLASH_HD Buffers buffers_of(Program p) {
  switch (p) {
    case Program::Forward: return {4, 1, 3};  // q k v o · s · m l rescale
    case Program::Dq: return {5, 2, 2};       // q do k v dq · s dp · lse δ
    default: return {6, 2, 2};                // q do k v dk dv · s dp · lse δ
  }
}

/// Each buffer starts on a 128-byte boundary (tensor-core loads need 32).
inline constexpr std::size_t kAlign = 128;
MOCA_FLASH_HD std::size_t aligned(std::size_t bytes) { return (bytes + kAlign - 1) / kAlign * kAlign; }

/// Shared memory one block of program p needs, in bytes; `element` is the size of the
/// arithmetic type (flash_acc_t), not of the storage.
MOCA_FLASH_HD std::size_t shared_bytes(Program p, const Geometry& g, std::size_t element) {
  const Buffers b = buffers_of(p);
  return b.h * aligned(element * g.tile * g.ldh) + b.t * aligned(element * g.tile * g.ldt) +
         b.v * aligned(element * g.tile);
}

/// Hands out consecutive aligned buffers of a block's shared memory.
template <class T>
struct Carver {
  unsigned char* base;
  std::size_t offset = 0;
  MOCA_FLASH_FN T* take(std::size_t elements) {
    T* p = reinterpret_cast<T*>(base + offset);
    offset += aligned(sizeof(T) * elements);
    return p;
  }
};

/// One serial thread: runs a block's program on the host (tests).
struct SerialExec {
  MOCA_FLASH_FN int tid() const { return 0; }
  MOCA_FLASH_FN int threads() const { return 1; }
  MOCA_FLASH_FN void sync() const {}
};

MOCA_FLASH_FN float flash_exp(float x) { return expf(x); }
MOCA_FLASH_FN double flash_exp(double x) { return exp(x); }
MOCA_FLASH_FN float flash_log(float x) { return logf(x); }
MOCA_FLASH_FN double flash_log(double x) { return log(x); }

/// Tile products with plain FMAs in T: each thread computes 4×4 blocks of C.
struct SimtMma {
  /// C[M×N] = alpha · op(A)·op(B) (+ C when accumulate); op(A) is [M×K] (A stored [K×M] when
  /// AT), op(B) is [K×N] (B stored [N×K] when BT). M and N are multiples of 4; C does not alias
  /// A or B.
  template <bool AT, bool BT, class Exec, class T>
  static MOCA_FLASH_FN void product(const Exec& ex, int M, int N, int K, T alpha, const T* A,
                                    int lda, const T* B, int ldb, T* C, int ldc,
                                    bool accumulate) {
    const int nt = N / 4;
    for (int t = ex.tid(); t < (M / 4) * nt; t += ex.threads()) {
      const int i0 = t / nt * 4, j0 = t % nt * 4;
      T acc[4][4] = {};
      for (int k = 0; k < K; ++k) {
        T a[4], b[4];
        for (int u = 0; u < 4; ++u) a[u] = AT ? A[k * lda + i0 + u] : A[(i0 + u) * lda + k];
        for (int u = 0; u < 4; ++u) b[u] = BT ? B[(j0 + u) * ldb + k] : B[k * ldb + j0 + u];
        for (int u = 0; u < 4; ++u)
          for (int w = 0; w < 4; ++w) acc[u][w] += a[u] * b[w];
      }
      for (int u = 0; u < 4; ++u)
        for (int w = 0; w < 4; ++w) {
          T& c = C[(i0 + u) * ldc + j0 + w];
          c = accumulate ? c + alpha * acc[u][w] : alpha * acc[u][w];
        }
    }
  }
};

/// Tile products on 16×16 output fragments (the tensor cores' shape), with the fragment loads,
/// multiply-accumulate and store supplied by F (wmma on the device, kernels/attention.cuh; plain
/// arrays in the host tests). Each warp computes a 2×2 block of fragments at a time, so every
/// operand fragment it loads from shared memory feeds two products instead of one (or, when
/// there are fewer such blocks than warps, one fragment at a time, so that none idles). The
/// contract of SimtMma::product, with M and N multiples of 16 and K of F::kK. Branches depend on
/// the block only, so a warp's lanes take them together (wmma calls are warp-collective).
///
/// F provides: kK; Acc, AFrag<AT>, BFrag<BT>; zero(Acc&); load_a<AT>(AFrag<AT>&, A, lda, i0, k)
/// (op(A) rows i0 … i0 + 15, columns k … k + kK − 1); load_b<BT>(BFrag<BT>&, B, ldb, k, j0);
/// mma(Acc&, AFrag, BFrag) (acc += a · b); store(Acc&, C, ldc, alpha, accumulate).
template <class F>
struct BlockedMma {
  template <bool AT, bool BT, class Exec>
  static MOCA_FLASH_FN void product(const Exec& ex, int M, int N, int K, float alpha,
                                    const float* A, int lda, const float* B, int ldb, float* C,
                                    int ldc, bool accumulate) {
    const int warps = ex.threads() >= 32 ? ex.threads() / 32 : 1;
    const int mt = M / 16, nt = N / 16;
    // 2×2 blocks while there are enough of them for every warp; one fragment each otherwise.
    const int side = (mt + 1) / 2 * ((nt + 1) / 2) >= warps ? 2 : 1;
    const int bn = (nt + side - 1) / side, blocks = (mt + side - 1) / side * bn;
    for (int t = ex.tid() / 32; t < blocks; t += warps) {
      const int i0 = t / bn * 16 * side, j0 = t % bn * 16 * side;
      const bool two_i = side == 2 && i0 + 16 < M, two_j = side == 2 && j0 + 16 < N;
      typename F::Acc acc[2][2];
      for (int u = 0; u < 2; ++u)
        for (int w = 0; w < 2; ++w) F::zero(acc[u][w]);
      for (int k = 0; k < K; k += F::kK) {
        typename F::template AFrag<AT> a[2];
        typename F::template BFrag<BT> b[2];
        F::template load_a<AT>(a[0], A, lda, i0, k);
        if (two_i) F::template load_a<AT>(a[1], A, lda, i0 + 16, k);
        F::template load_b<BT>(b[0], B, ldb, k, j0);
        if (two_j) F::template load_b<BT>(b[1], B, ldb, k, j0 + 16);
        F::mma(acc[0][0], a[0], b[0]);
        if (two_j) F::mma(acc[0][1], a[0], b[1]);
        if (two_i) F::mma(acc[1][0], a[1], b[0]);
        if (two_i && two_j) F::mma(acc[1][1], a[1], b[1]);
      }
      F::store(acc[0][0], C + i0 * ldc + j0, ldc, alpha, accumulate);
      if (two_j) F::store(acc[0][1], C + i0 * ldc + j0 + 16, ldc, alpha, accumulate);
      if (two_i) F::store(acc[1][0], C + (i0 + 16) * ldc + j0, ldc, alpha, accumulate);
      if (two_i && two_j)
        F::store(acc[1][1], C + (i0 + 16) * ldc + j0 + 16, ldc, alpha, accumulate);
    }
  }
};

/// Where a block's head lives in global memory.
template <class T>
struct Head {
  const T* q;     // rows of q (k at + dim, v at + 2·dim), row stride ld
  std::int64_t ld;
  std::int64_t dim;
  std::int64_t S;
  std::int64_t row;  // (b·H + h)·S: this head's offset in [B, H, S] vectors
  std::int64_t ctx;  // b·S·dim + h·hd: its offset in [B, S, dim] buffers
  std::int64_t qkv;  // b·S·ld + h·hd: its offset in [B, S, 3·dim] buffers
};

template <class T>
MOCA_FLASH_FN Head<T> head_of(const T* qkv, std::int64_t H, std::int64_t S, std::int64_t hd,
                              std::int64_t b, std::int64_t h) {
  Head<T> x;
  x.dim = H * hd;
  x.ld = 3 * x.dim;
  x.S = S;
  x.row = (b * H + h) * S;
  x.ctx = b * S * x.dim + h * hd;
  x.qkv = b * S * x.ld + h * hd;
  x.q = qkv + x.qkv;
  return x;
}

/// dst[tile, hdp] = rows [0, rows) × columns [0, hd) of src (row stride ld), widened to dst's
/// type, zeros elsewhere.
template <class Exec, class G, class A>
MOCA_FLASH_FN void load_tile(const Exec& ex, const Geometry& g, const G* src, std::int64_t ld,
                             int rows, A* dst) {
  for (int i = ex.tid(); i < g.tile * g.hdp; i += ex.threads()) {
    const int r = i / g.hdp, c = i % g.hdp;
    dst[r * g.ldh + c] = (r < rows && c < g.hd) ? static_cast<A>(src[r * ld + c]) : A(0);
  }
}

template <class Exec, class T>
MOCA_FLASH_FN void zero_tile(const Exec& ex, const Geometry& g, T* dst) {
  for (int i = ex.tid(); i < g.tile * g.hdp; i += ex.threads())
    dst[i / g.hdp * g.ldh + i % g.hdp] = T(0);
}

/// Rows [0, rows) × columns [0, hd) of src, times scale[r] (or 1), to dst (row stride ld),
/// rounded once to dst's type.
template <class Exec, class A, class G>
MOCA_FLASH_FN void store_tile(const Exec& ex, const Geometry& g, const A* src, int rows, G* dst,
                              std::int64_t ld, const A* row_scale = nullptr) {
  for (int i = ex.tid(); i < rows * g.hd; i += ex.threads()) {
    const int r = i / g.hd, c = i % g.hd;
    const A v = src[r * g.ldh + c];
    dst[r * ld + c] = static_cast<G>(row_scale ? v * row_scale[r] : v);
  }
}

/// n rounded up to a multiple of 16 (the tensor cores' fragment).
MOCA_FLASH_HD int up16(int n) { return (n + 15) / 16 * 16; }

MOCA_FLASH_FN int rows_from(std::int64_t S, std::int64_t first, int tile) {
  const std::int64_t left = S - first;
  return left < tile ? static_cast<int>(left) : tile;
}

/// The forward of query tile qt of head (b, h): ctx rows and their lse.
template <class Mma, class Exec, class G>
MOCA_FLASH_FN void forward_block(const Exec& ex, const Geometry& g, unsigned char* smem,
                                 std::int64_t H, std::int64_t S, flash_acc_t<G> scale,
                                 const G* qkv, flash_acc_t<G>* lse, G* ctx, std::int64_t b,
                                 std::int64_t h, std::int64_t qt) {
  using T = flash_acc_t<G>;
  const Head<G> x = head_of(qkv, H, S, static_cast<std::int64_t>(g.hd), b, h);
  const int tile = g.tile;
  Carver<T> carve{smem};
  T* sq = carve.take(tile * g.ldh);
  T* sk = carve.take(tile * g.ldh);
  T* sv = carve.take(tile * g.ldh);
  T* so = carve.take(tile * g.ldh);
  T* ss = carve.take(tile * g.ldt);
  T* sm = carve.take(tile);
  T* sl = carve.take(tile);
  T* sr = carve.take(tile);

  const std::int64_t r0 = qt * tile;
  const int rows = rows_from(S, r0, tile);
  load_tile(ex, g, x.q + r0 * x.ld, x.ld, rows, sq);
  zero_tile(ex, g, so);
  for (int r = ex.tid(); r < tile; r += ex.threads()) {
    sm[r] = T(-INFINITY);
    sl[r] = T(0);
  }
  for (std::int64_t c0 = 0; c0 < S; c0 += tile) {
    const int cols = rows_from(S, c0, tile);
    ex.sync();  // the previous key tile is no longer read
    load_tile(ex, g, x.q + x.dim + c0 * x.ld, x.ld, cols, sk);
    load_tile(ex, g, x.q + 2 * x.dim + c0 * x.ld, x.ld, cols, sv);
    ex.sync();
    const int r16 = up16(rows), c16 = up16(cols);
    Mma::template product<false, true>(ex, r16, c16, g.hdp, scale, sq, g.ldh, sk, g.ldh, ss, g.ldt,
                                       false);
    ex.sync();
    // Online softmax in three steps: the new row maxima and the factor e^(m_old − m_new) that
    // rescales the output so far (0 on the first tile, where m_old = −∞), one thread per row;
    // p = e^(s − m_new) over the computed scores, every thread (the exponentials are most of the
    // work); the row sums, one thread per row again.
    for (int r = ex.tid(); r < r16; r += ex.threads()) {
      const T* row = ss + r * g.ldt;
      T m = sm[r];
      for (int c = 0; c < cols; ++c) m = row[c] > m ? row[c] : m;
      sr[r] = flash_exp(sm[r] - m);
      sm[r] = m;
    }
    ex.sync();
    for (int i = ex.tid(); i < r16 * c16; i += ex.threads()) {
      const int r = i / c16, c = i % c16;
      T& s_rc = ss[r * g.ldt + c];
      s_rc = c < cols ? flash_exp(s_rc - sm[r]) : T(0);
    }
    ex.sync();
    for (int r = ex.tid(); r < r16; r += ex.threads()) {
      const T* row = ss + r * g.ldt;
      T sum = T(0);
      for (int c = 0; c < cols; ++c) sum += row[c];
      sl[r] = sl[r] * sr[r] + sum;
    }
    for (int i = ex.tid(); i < r16 * g.hdp; i += ex.threads())
      so[i / g.hdp * g.ldh + i % g.hdp] *= sr[i / g.hdp];
    ex.sync();
    Mma::template product<false, false>(ex, r16, g.hdp, c16, T(1), ss, g.ldt, sv, g.ldh, so, g.ldh,
                                        true);
  }
  ex.sync();
  for (int r = ex.tid(); r < rows; r += ex.threads()) {
    lse[x.row + r0 + r] = sm[r] + flash_log(sl[r]);
    sr[r] = T(1) / sl[r];
  }
  ex.sync();
  store_tile(ex, g, so, rows, ctx + x.ctx + r0 * x.dim, x.dim, sr);
}

/// p = e^(s − lse) on valid (row, column) pairs, 0 elsewhere up to the 16-row boundaries;
/// dS = p ∘ (dp − δ) into dp. Keeps p in s when keep_p.
template <class Exec, class T>
MOCA_FLASH_FN void probs_and_dscores(const Exec& ex, int rows, int cols, const T* lse,
                                     const T* delta, T* s, T* dp, int ld, bool keep_p) {
  const int c16 = up16(cols);
  for (int i = ex.tid(); i < up16(rows) * c16; i += ex.threads()) {
    const int r = i / c16, c = i % c16;
    const T p = (r < rows && c < cols) ? flash_exp(s[r * ld + c] - lse[r]) : T(0);
    if (keep_p) s[r * ld + c] = p;
    dp[r * ld + c] = p * (dp[r * ld + c] - delta[r]);
  }
}

/// The shared memory of the backward passes: q, do, k, v and one (dq) or two (dk, dv)
/// accumulator tiles [tile, hdp]; s and dp [tile, tile]; lse and δ of the query rows.
template <class T>
struct BackwardTiles {
  T *q, *dout, *k, *v, *acc[2], *s, *dp, *lse, *delta;
};

template <class T>
MOCA_FLASH_FN BackwardTiles<T> carve_backward(unsigned char* smem, const Geometry& g,
                                              int accumulators) {
  Carver<T> carve{smem};
  BackwardTiles<T> t;
  const std::size_t h = static_cast<std::size_t>(g.tile) * g.ldh;
  t.q = carve.take(h);
  t.dout = carve.take(h);
  t.k = carve.take(h);
  t.v = carve.take(h);
  t.acc[0] = carve.take(h);
  t.acc[1] = accumulators > 1 ? carve.take(h) : nullptr;
  t.s = carve.take(static_cast<std::size_t>(g.tile) * g.ldt);
  t.dp = carve.take(static_cast<std::size_t>(g.tile) * g.ldt);
  t.lse = carve.take(g.tile);
  t.delta = carve.take(g.tile);
  return t;
}

/// For one (query tile, key tile) pair: s = scale · q·kᵀ and dp = do·vᵀ, then p and dS as
/// probs_and_dscores writes them. Starts once q, k, do, v, lse and δ are in place (after a sync);
/// ends after a sync.
template <class Mma, class Exec, class T>
MOCA_FLASH_FN void recompute_dscores(const Exec& ex, const Geometry& g, T scale, int rows,
                                     int cols, const T* sq, const T* sk, const T* sdo,
                                     const T* sv, const T* slse, const T* sdelta, T* ss, T* sdp,
                                     bool keep_p) {
  Mma::template product<false, true>(ex, up16(rows), up16(cols), g.hdp, scale, sq, g.ldh, sk,
                                     g.ldh, ss, g.ldt, false);
  Mma::template product<false, true>(ex, up16(rows), up16(cols), g.hdp, T(1), sdo, g.ldh, sv,
                                     g.ldh, sdp, g.ldt, false);
  ex.sync();
  probs_and_dscores(ex, rows, cols, slse, sdelta, ss, sdp, g.ldt, keep_p);
  ex.sync();
}

/// The dq pass for query tile qt of head (b, h); also writes δ [B, H, S] for dkdv_block.
template <class Mma, class Exec, class G>
MOCA_FLASH_FN void dq_block(const Exec& ex, const Geometry& g, unsigned char* smem,
                            std::int64_t H, std::int64_t S, flash_acc_t<G> scale, const G* qkv,
                            const flash_acc_t<G>* lse, const G* ctx, const G* dctx,
                            flash_acc_t<G>* delta, G* dqkv, std::int64_t b, std::int64_t h,
                            std::int64_t qt) {
  using T = flash_acc_t<G>;
  const Head<G> x = head_of(qkv, H, S, static_cast<std::int64_t>(g.hd), b, h);
  const int tile = g.tile;
  const BackwardTiles<T> t = carve_backward<T>(smem, g, 1);
  T *sq = t.q, *sdo = t.dout, *sk = t.k, *sv = t.v, *sdq = t.acc[0];
  T *ss = t.s, *sdp = t.dp, *slse = t.lse, *sdelta = t.delta;

  const std::int64_t r0 = qt * tile;
  const int rows = rows_from(S, r0, tile);
  load_tile(ex, g, x.q + r0 * x.ld, x.ld, rows, sq);
  load_tile(ex, g, dctx + x.ctx + r0 * x.dim, x.dim, rows, sdo);
  load_tile(ex, g, ctx + x.ctx + r0 * x.dim, x.dim, rows, sdq);  // o, for δ
  for (int r = ex.tid(); r < tile; r += ex.threads()) slse[r] = r < rows ? lse[x.row + r0 + r] : T(0);
  ex.sync();
  for (int r = ex.tid(); r < tile; r += ex.threads()) {
    T d = T(0);
    for (int c = 0; c < g.hd; ++c) d += sdo[r * g.ldh + c] * sdq[r * g.ldh + c];
    sdelta[r] = d;
    if (r < rows) delta[x.row + r0 + r] = d;
  }
  ex.sync();
  zero_tile(ex, g, sdq);
  for (std::int64_t c0 = 0; c0 < S; c0 += tile) {
    const int cols = rows_from(S, c0, tile);
    ex.sync();
    load_tile(ex, g, x.q + x.dim + c0 * x.ld, x.ld, cols, sk);
    load_tile(ex, g, x.q + 2 * x.dim + c0 * x.ld, x.ld, cols, sv);
    ex.sync();
    recompute_dscores<Mma>(ex, g, scale, rows, cols, sq, sk, sdo, sv, slse, sdelta, ss, sdp,
                           false);
    Mma::template product<false, false>(ex, up16(rows), g.hdp, up16(cols), scale, sdp, g.ldt, sk,
                                        g.ldh, sdq, g.ldh, true);
  }
  ex.sync();
  store_tile(ex, g, sdq, rows, dqkv + x.qkv + r0 * x.ld, x.ld);
}

/// The dk, dv pass for key tile kt of head (b, h); reads δ from dq_block.
template <class Mma, class Exec, class G>
MOCA_FLASH_FN void dkdv_block(const Exec& ex, const Geometry& g, unsigned char* smem,
                              std::int64_t H, std::int64_t S, flash_acc_t<G> scale, const G* qkv,
                              const flash_acc_t<G>* lse, const G* dctx,
                              const flash_acc_t<G>* delta, G* dqkv, std::int64_t b,
                              std::int64_t h, std::int64_t kt) {
  using T = flash_acc_t<G>;
  const Head<G> x = head_of(qkv, H, S, static_cast<std::int64_t>(g.hd), b, h);
  const int tile = g.tile;
  const BackwardTiles<T> t = carve_backward<T>(smem, g, 2);
  T *sq = t.q, *sdo = t.dout, *sk = t.k, *sv = t.v, *sdk = t.acc[0], *sdv = t.acc[1];
  T *ss = t.s, *sdp = t.dp, *slse = t.lse, *sdelta = t.delta;

  const std::int64_t c0 = kt * tile;
  const int cols = rows_from(S, c0, tile);
  load_tile(ex, g, x.q + x.dim + c0 * x.ld, x.ld, cols, sk);
  load_tile(ex, g, x.q + 2 * x.dim + c0 * x.ld, x.ld, cols, sv);
  zero_tile(ex, g, sdk);
  zero_tile(ex, g, sdv);
  for (std::int64_t r0 = 0; r0 < S; r0 += tile) {
    const int rows = rows_from(S, r0, tile);
    ex.sync();
    load_tile(ex, g, x.q + r0 * x.ld, x.ld, rows, sq);
    load_tile(ex, g, dctx + x.ctx + r0 * x.dim, x.dim, rows, sdo);
    for (int r = ex.tid(); r < tile; r += ex.threads()) {
      slse[r] = r < rows ? lse[x.row + r0 + r] : T(0);
      sdelta[r] = r < rows ? delta[x.row + r0 + r] : T(0);
    }
    ex.sync();
    recompute_dscores<Mma>(ex, g, scale, rows, cols, sq, sk, sdo, sv, slse, sdelta, ss, sdp, true);
    Mma::template product<true, false>(ex, up16(cols), g.hdp, up16(rows), T(1), ss, g.ldt, sdo,
                                       g.ldh, sdv, g.ldh, true);
    Mma::template product<true, false>(ex, up16(cols), g.hdp, up16(rows), scale, sdp, g.ldt, sq,
                                       g.ldh, sdk, g.ldh, true);
  }
  ex.sync();
  store_tile(ex, g, sdk, cols, dqkv + x.qkv + x.dim + c0 * x.ld, x.ld);
  store_tile(ex, g, sdv, cols, dqkv + x.qkv + 2 * x.dim + c0 * x.ld, x.ld);
}

}  // namespace moca::cuda::flash
