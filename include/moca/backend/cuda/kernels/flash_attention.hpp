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
// Every program runs on `Exec` and multiplies shared-memory tiles through `Mma::product`
// (SimtMma below: plain FMAs, exact products; BlockedMma: 16×16 tensor-core fragments, whose
// device policies live in attention.cuh). Exec is a CUDA block or one serial "thread": tid() and
// threads() for loops over a tile's elements (`for (i = tid; i < n; i += threads)`), and row
// groups (a warp on the device, the one thread serially) for the softmax-like row passes: group()
// of groups() takes rows, its lane() of lanes() takes columns, group_max / group_sum reduce
// a value over the lanes, and group_sync orders the lanes' shared-memory accesses. So the serial
// run covers every element and row a block does. Padding rows and columns (past S, past hd) are
// zero in shared memory and masked out of the softmax; nothing past S or hd is written. The
// products of a ragged tile (the last query or key tile of a head) stop at the 16-row boundary past
// its last row (up16): at ViT's 197 tokens and 64-row tiles that is 208 rows of work instead of 256
// in each dimension of the scores. Shared memory past that boundary is then never written, and
// nothing reads it: the softmax and probs_and_dscores work up to the same boundaries (writing zeros
// between the last valid row or column and the boundary), and so do the next products.
//
// Three element types: G is the storage of q, k, v, ctx and their gradients in global memory
// (float, double or bf16); O (flash_operand_t) is what the products read from shared memory; A
// (flash_acc_t) is what they accumulate in, and what the scores, the softmax, lse and δ are
// computed in. For float and double O = A = G. For bf16 heads O is bf16 and A is float, as the
// tensor cores' bf16 products have it: q, k, v and do are copied into shared memory as they are
// (no conversion), the scores and the output accumulators are float, and the probabilities p and
// dS are rounded to bf16 copies for the products that read them (p·v, dS·k, pᵀ·do, dSᵀ·q), while
// the row sums and lse use the float values. ctx and dqkv are rounded once as they are stored.
// The log-sum-exp the backward subtracts stays float (in bf16 it would be off by up to 2^-9 of
// itself, which scales every recomputed probability of its row by the same error).
#pragma once

#include <math.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "moca/backend/cuda/kernels/chunk.hpp"
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

/// What a head stored as G is computed in: accumulators, scores, lse and δ.
template <class G>
using flash_acc_t = compute_t<G>;

/// What the tile products of a head stored as G read from shared memory: bf16 for bf16 heads
/// (the tensor cores' bf16 operands), the arithmetic type otherwise.
template <class G>
using flash_operand_t = std::conditional_t<std::is_same_v<G, bf16>, bf16, flash_acc_t<G>>;

/// Tile sizes the programs support (multiples of 16, the tensor-core fragment height).
inline constexpr int kTiles[] = {64, 32, 16};
/// Widest head the programs support.
inline constexpr int kMaxHeadDim = 256;

/// Shared-memory geometry of one block. Operand tiles (q, k, v, do) are [tile, hdp] in O with row
/// stride ldo; accumulator tiles (o, dq, dk, dv) [tile, hdp] in A with stride lda; score tiles
/// (s, dp) [tile, tile] in A with stride ldt; and, when O is narrower than A, operand copies of
/// p and dS [tile, tile] in O with stride ldp (otherwise p and dS overwrite s and dp, ldp = ldt).
/// Every stride is 16 bytes past the width, so that consecutive rows start 4 banks apart and
/// every row starts on a 16-byte boundary (tensor-core loads, 16-byte copies).
struct Geometry {
  int tile = 0;  // query rows of a query tile = key rows of a key tile
  int hd = 0;    // head width
  int hdp = 0;   // head width rounded up to a multiple of 16 (zero columns past hd)
  int ldo = 0;
  int lda = 0;
  int ldt = 0;
  int ldp = 0;
  int osize = 0;  // bytes of O and of A
  int asize = 0;
  /// Whether p and dS get operand copies of their own.
  MOCA_FLASH_HD bool copies() const { return osize != asize; }
};

/// The geometry of a head of width hd stored as G, in tiles of `tile` rows.
template <class G>
MOCA_FLASH_HD Geometry make_geometry(int tile, int hd) {
  constexpr int os = static_cast<int>(sizeof(flash_operand_t<G>));
  constexpr int as = static_cast<int>(sizeof(flash_acc_t<G>));
  Geometry g;
  g.tile = tile;
  g.hd = hd;
  g.hdp = (hd + 15) / 16 * 16;
  g.osize = os;
  g.asize = as;
  g.ldo = g.hdp + 16 / os;
  g.lda = g.hdp + 16 / as;
  g.ldt = tile + 16 / as;
  g.ldp = os != as ? tile + 16 / os : g.ldt;
  return g;
}

/// Which program a block runs.
enum class Program { Forward, Dq, Dkdv };

/// Buffers of each program: operand tiles, accumulator tiles, score tiles, operand copies of
/// score tiles (when O is narrower than A), and per-row vectors.
struct Buffers {
  int operands, accumulators, scores, copies, vectors;
};
MOCA_FLASH_HD Buffers buffers_of(Program p) {
  switch (p) {
    case Program::Forward: return {3, 1, 1, 1, 3};  // q k v · o · s · p · m l rescale
    case Program::Dq: return {4, 1, 2, 1, 2};       // q do k v · dq · s dp · dS · lse δ
    default: return {4, 2, 2, 2, 2};                // q do k v · dk dv · s dp · p dS · lse δ
  }
}

/// Each buffer starts on a 128-byte boundary (tensor-core loads need 32).
inline constexpr std::size_t kAlign = 128;
MOCA_FLASH_HD std::size_t aligned(std::size_t bytes) { return (bytes + kAlign - 1) / kAlign * kAlign; }

/// Shared memory one block of program p needs, in bytes.
MOCA_FLASH_HD std::size_t shared_bytes(Program p, const Geometry& g) {
  const Buffers b = buffers_of(p);
  const std::size_t t = static_cast<std::size_t>(g.tile);
  std::size_t bytes = b.operands * aligned(g.osize * t * g.ldo) +
                      b.accumulators * aligned(g.asize * t * g.lda) +
                      b.scores * aligned(g.asize * t * g.ldt) + b.vectors * aligned(g.asize * t);
  if (g.copies()) bytes += b.copies * aligned(g.osize * t * g.ldp);
  return bytes;
}

/// Hands out consecutive aligned buffers of a block's shared memory.
struct Carver {
  unsigned char* base;
  std::size_t offset = 0;
  template <class T>
  MOCA_FLASH_FN T* take(std::size_t elements) {
    T* p = reinterpret_cast<T*>(base + offset);
    offset += aligned(sizeof(T) * elements);
    return p;
  }
  /// An operand copy of the score tile s ([tile, ldp] in O): a buffer of its own when O is
  /// narrower than A, s itself otherwise.
  template <class O, class A>
  MOCA_FLASH_FN O* copy_of(A* s, const Geometry& g) {
    if constexpr (std::is_same_v<O, A>)
      return s;
    else
      return take<O>(static_cast<std::size_t>(g.tile) * g.ldp);
  }
};

/// One serial thread: runs a block's program on the host (tests). Its one row group is itself.
struct SerialExec {
  MOCA_FLASH_FN int tid() const { return 0; }
  MOCA_FLASH_FN int threads() const { return 1; }
  MOCA_FLASH_FN int group() const { return 0; }
  MOCA_FLASH_FN int groups() const { return 1; }
  MOCA_FLASH_FN int lane() const { return 0; }
  MOCA_FLASH_FN int lanes() const { return 1; }
  template <class T>
  MOCA_FLASH_FN T group_max(T v) const { return v; }
  template <class T>
  MOCA_FLASH_FN T group_sum(T v) const { return v; }
  MOCA_FLASH_FN void group_sync() const {}
  MOCA_FLASH_FN void sync() const {}
};

MOCA_FLASH_FN float flash_exp(float x) { return expf(x); }
MOCA_FLASH_FN double flash_exp(double x) { return exp(x); }
MOCA_FLASH_FN float flash_log(float x) { return logf(x); }
MOCA_FLASH_FN double flash_log(double x) { return log(x); }

/// Tile products with plain FMAs: each thread computes 4×4 blocks of C, with operands O widened
/// to the accumulator type T (exact for bf16 operands and float T).
struct SimtMma {
  /// C[M×N] = alpha · op(A)·op(B) (+ C when accumulate); op(A) is [M×K] (A stored [K×M] when
  /// AT), op(B) is [K×N] (B stored [N×K] when BT). M and N are multiples of 4; C does not alias
  /// A or B.
  template <bool AT, bool BT, class Exec, class O, class T>
  static MOCA_FLASH_FN void product(const Exec& ex, int M, int N, int K, T alpha, const O* A,
                                    int lda, const O* B, int ldb, T* C, int ldc,
                                    bool accumulate) {
    const int nt = N / 4;
    for (int t = ex.tid(); t < (M / 4) * nt; t += ex.threads()) {
      const int i0 = t / nt * 4, j0 = t % nt * 4;
      T acc[4][4] = {};
      for (int k = 0; k < K; ++k) {
        T a[4], b[4];
        for (int u = 0; u < 4; ++u) a[u] = T(AT ? A[k * lda + i0 + u] : A[(i0 + u) * lda + k]);
        for (int u = 0; u < 4; ++u) b[u] = T(BT ? B[(j0 + u) * ldb + k] : B[k * ldb + j0 + u]);
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
/// contract of SimtMma::product, with M and N multiples of 16, K of F::kK, operands in F's
/// operand type and float accumulation. Branches depend on the block only, so a warp's lanes take
/// them together (wmma calls are warp-collective).
///
/// F provides: kK; Acc, AFrag<AT>, BFrag<BT>; zero(Acc&); load_a<AT>(AFrag<AT>&, A, lda, i0, k)
/// (op(A) rows i0 … i0 + 15, columns k … k + kK − 1); load_b<BT>(BFrag<BT>&, B, ldb, k, j0);
/// mma(Acc&, AFrag, BFrag) (acc += a · b); store(Acc&, C, ldc, alpha, accumulate).
template <class F>
struct BlockedMma {
  template <bool AT, bool BT, class Exec, class O>
  static MOCA_FLASH_FN void product(const Exec& ex, int M, int N, int K, float alpha, const O* A,
                                    int lda, const O* B, int ldb, float* C, int ldc,
                                    bool accumulate) {
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

/// dst[tile, hdp] (row stride ldd) = rows [0, rows) × columns [0, hd) of src (row stride ld),
/// converted to dst's type, zeros elsewhere. Same types on aligned rows move 16 bytes at a time
/// (every shared-memory row starts on a 16-byte boundary, and hdp is a multiple of 16).
template <class Exec, class G, class X>
MOCA_FLASH_FN void load_tile(const Exec& ex, const Geometry& g, const G* src, std::int64_t ld,
                             int rows, X* dst, int ldd) {
  if constexpr (std::is_same_v<G, X>) {
    if (chunked(src, ld, g.hd)) {
      constexpr int w = kChunk<X>;
      const int per_row = g.hdp / w;
      for (int i = ex.tid(); i < g.tile * per_row; i += ex.threads()) {
        const int r = i / per_row, c = i % per_row * w;
        Chunk<X> v{};
        if (r < rows && c < g.hd) v = load_chunk(src + r * ld + c);
        store_chunk(dst + r * ldd + c, v);
      }
      return;
    }
  }
  for (int i = ex.tid(); i < g.tile * g.hdp; i += ex.threads()) {
    const int r = i / g.hdp, c = i % g.hdp;
    dst[r * ldd + c] = (r < rows && c < g.hd) ? static_cast<X>(src[r * ld + c]) : X(0);
  }
}

/// Zeros an accumulator tile [tile, hdp].
template <class Exec, class T>
MOCA_FLASH_FN void zero_tile(const Exec& ex, const Geometry& g, T* dst) {
  for (int i = ex.tid(); i < g.tile * g.hdp; i += ex.threads())
    dst[i / g.hdp * g.lda + i % g.hdp] = T(0);
}

/// Rows [0, rows) × columns [0, hd) of the accumulator tile src, times scale[r] (or 1), to dst
/// (row stride ld), rounded once to dst's type; 16 bytes of dst at a time on aligned rows.
template <class Exec, class A, class G>
MOCA_FLASH_FN void store_tile(const Exec& ex, const Geometry& g, const A* src, int rows, G* dst,
                              std::int64_t ld, const A* row_scale = nullptr) {
  if (chunked(dst, ld, g.hd)) {
    constexpr int w = kChunk<G>;
    const int per_row = g.hd / w;
    for (int i = ex.tid(); i < rows * per_row; i += ex.threads()) {
      const int r = i / per_row, c = i % per_row * w;
      const A s = row_scale ? row_scale[r] : A(1);
      Chunk<G> v;
      for (int u = 0; u < w; ++u) v.v[u] = static_cast<G>(src[r * g.lda + c + u] * s);
      store_chunk(dst + r * ld + c, v);
    }
    return;
  }
  for (int i = ex.tid(); i < rows * g.hd; i += ex.threads()) {
    const int r = i / g.hd, c = i % g.hd;
    const A v = src[r * g.lda + c];
    dst[r * ld + c] = static_cast<G>(row_scale ? v * row_scale[r] : v);
  }
}

/// n rounded up to a multiple of 16 (the tensor cores' fragment).
MOCA_FLASH_HD int up16(int n) { return (n + 15) / 16 * 16; }

MOCA_FLASH_FN int rows_from(std::int64_t S, std::int64_t first, int tile) {
  const std::int64_t left = S - first;
  return left < tile ? static_cast<int>(left) : tile;
}

/// One key tile's step of the online softmax, a row group per query row r < r16: the new row
/// maximum m over the tile's `cols` scores, p = e^(s − m) (0 in the padding columns up to c16)
/// into the operand copy sp, the running sum l ← l · e^(m_old − m) + Σ p (of the unrounded p),
/// and the output so far rescaled by e^(m_old − m) (0 on the first tile, where m_old = −∞).
template <class Exec, class A, class O>
MOCA_FLASH_FN void online_softmax(const Exec& ex, const Geometry& g, int r16, int cols,
                                  const A* ss, O* sp, A* sm, A* sl, A* so) {
  const int c16 = up16(cols);
  for (int r = ex.group(); r < r16; r += ex.groups()) {
    const A* row = ss + r * g.ldt;
    const A m_old = sm[r];
    A m = m_old;
    for (int c = ex.lane(); c < cols; c += ex.lanes()) m = row[c] > m ? row[c] : m;
    m = ex.group_max(m);
    A sum = A(0);
    for (int c = ex.lane(); c < c16; c += ex.lanes()) {
      const A p = c < cols ? flash_exp(row[c] - m) : A(0);
      sum += p;
      sp[r * g.ldp + c] = static_cast<O>(p);
    }
    sum = ex.group_sum(sum);
    const A rescale = flash_exp(m_old - m);
    for (int c = ex.lane(); c < g.hdp; c += ex.lanes()) so[r * g.lda + c] *= rescale;
    ex.group_sync();  // every lane has read m_old before lane 0 overwrites it
    if (ex.lane() == 0) {
      sl[r] = sl[r] * rescale + sum;
      sm[r] = m;
    }
  }
}

/// The forward of query tile qt of head (b, h): ctx rows and their lse.
template <class Mma, class Exec, class G>
MOCA_FLASH_FN void forward_block(const Exec& ex, const Geometry& g, unsigned char* smem,
                                 std::int64_t H, std::int64_t S, flash_acc_t<G> scale,
                                 const G* qkv, flash_acc_t<G>* lse, G* ctx, std::int64_t b,
                                 std::int64_t h, std::int64_t qt) {
  using A = flash_acc_t<G>;
  using O = flash_operand_t<G>;
  const Head<G> x = head_of(qkv, H, S, static_cast<std::int64_t>(g.hd), b, h);
  const int tile = g.tile;
  Carver carve{smem};
  O* sq = carve.take<O>(tile * g.ldo);
  O* sk = carve.take<O>(tile * g.ldo);
  O* sv = carve.take<O>(tile * g.ldo);
  A* so = carve.take<A>(tile * g.lda);
  A* ss = carve.take<A>(tile * g.ldt);
  O* sp = carve.copy_of<O>(ss, g);
  A* sm = carve.take<A>(tile);
  A* sl = carve.take<A>(tile);
  A* sr = carve.take<A>(tile);

  const std::int64_t r0 = qt * tile;
  const int rows = rows_from(S, r0, tile);
  const int r16 = up16(rows);
  load_tile(ex, g, x.q + r0 * x.ld, x.ld, rows, sq, g.ldo);
  zero_tile(ex, g, so);
  for (int r = ex.tid(); r < tile; r += ex.threads()) {
    sm[r] = A(-INFINITY);
    sl[r] = A(0);
  }
  for (std::int64_t c0 = 0; c0 < S; c0 += tile) {
    const int cols = rows_from(S, c0, tile);
    ex.sync();  // the previous key tile is no longer read
    load_tile(ex, g, x.q + x.dim + c0 * x.ld, x.ld, cols, sk, g.ldo);
    load_tile(ex, g, x.q + 2 * x.dim + c0 * x.ld, x.ld, cols, sv, g.ldo);
    ex.sync();
    const int c16 = up16(cols);
    Mma::template product<false, true>(ex, r16, c16, g.hdp, scale, sq, g.ldo, sk, g.ldo, ss, g.ldt,
                                       false);
    ex.sync();
    online_softmax(ex, g, r16, cols, ss, sp, sm, sl, so);
    ex.sync();
    Mma::template product<false, false>(ex, r16, g.hdp, c16, A(1), sp, g.ldp, sv, g.ldo, so, g.lda,
                                        true);
  }
  ex.sync();
  for (int r = ex.tid(); r < rows; r += ex.threads()) {
    lse[x.row + r0 + r] = sm[r] + flash_log(sl[r]);
    sr[r] = A(1) / sl[r];
  }
  ex.sync();
  store_tile(ex, g, so, rows, ctx + x.ctx + r0 * x.dim, x.dim, sr);
}

/// A row group per row r < up16(rows): p = e^(s − lse) on valid (row, column) pairs, 0 elsewhere
/// up to the 16-row boundaries; dS = p ∘ (dp − δ) into the operand copy sds, and p into sp when
/// keep_p. The copies may be s and dp themselves (same type and stride, element for element).
template <class Exec, class A, class O>
MOCA_FLASH_FN void probs_and_dscores(const Exec& ex, const Geometry& g, int rows, int cols,
                                     const A* lse, const A* delta, const A* s, const A* dp, O* sp,
                                     O* sds, bool keep_p) {
  const int c16 = up16(cols);
  for (int r = ex.group(); r < up16(rows); r += ex.groups()) {
    const A l = lse[r], d = delta[r];
    for (int c = ex.lane(); c < c16; c += ex.lanes()) {
      const A p = (r < rows && c < cols) ? flash_exp(s[r * g.ldt + c] - l) : A(0);
      const A ds = p * (dp[r * g.ldt + c] - d);
      if (keep_p) sp[r * g.ldp + c] = static_cast<O>(p);
      sds[r * g.ldp + c] = static_cast<O>(ds);
    }
  }
}

/// The shared memory of the backward passes: q, do, k, v; one (dq) or two (dk, dv) accumulator
/// tiles; s and dp; the operand copies of p (dk/dv pass only) and dS; lse and δ of the query
/// rows.
template <class O, class A>
struct BackwardTiles {
  O *q, *dout, *k, *v;
  A *acc[2], *s, *dp;
  O *p, *ds;
  A *lse, *delta;
};

template <class O, class A>
MOCA_FLASH_FN BackwardTiles<O, A> carve_backward(unsigned char* smem, const Geometry& g,
                                                 int accumulators) {
  Carver carve{smem};
  BackwardTiles<O, A> t;
  const std::size_t tile = static_cast<std::size_t>(g.tile);
  t.q = carve.take<O>(tile * g.ldo);
  t.dout = carve.take<O>(tile * g.ldo);
  t.k = carve.take<O>(tile * g.ldo);
  t.v = carve.take<O>(tile * g.ldo);
  t.acc[0] = carve.take<A>(tile * g.lda);
  t.acc[1] = accumulators > 1 ? carve.take<A>(tile * g.lda) : nullptr;
  t.s = carve.take<A>(tile * g.ldt);
  t.dp = carve.take<A>(tile * g.ldt);
  t.p = accumulators > 1 ? carve.copy_of<O>(t.s, g) : nullptr;
  t.ds = carve.copy_of<O>(t.dp, g);
  t.lse = carve.take<A>(tile);
  t.delta = carve.take<A>(tile);
  return t;
}

/// For one (query tile, key tile) pair: s = scale · q·kᵀ and dp = do·vᵀ, then p and dS as
/// probs_and_dscores writes them. Starts once q, k, do, v, lse and δ are in place (after a sync);
/// ends after a sync.
template <class Mma, class Exec, class O, class A>
MOCA_FLASH_FN void recompute_dscores(const Exec& ex, const Geometry& g, A scale, int rows,
                                     int cols, const BackwardTiles<O, A>& t, bool keep_p) {
  Mma::template product<false, true>(ex, up16(rows), up16(cols), g.hdp, scale, t.q, g.ldo, t.k,
                                     g.ldo, t.s, g.ldt, false);
  Mma::template product<false, true>(ex, up16(rows), up16(cols), g.hdp, A(1), t.dout, g.ldo, t.v,
                                     g.ldo, t.dp, g.ldt, false);
  ex.sync();
  probs_and_dscores(ex, g, rows, cols, t.lse, t.delta, t.s, t.dp, t.p, t.ds, keep_p);
  ex.sync();
}

/// The dq pass for query tile qt of head (b, h); also writes δ [B, H, S] for dkdv_block.
template <class Mma, class Exec, class G>
MOCA_FLASH_FN void dq_block(const Exec& ex, const Geometry& g, unsigned char* smem,
                            std::int64_t H, std::int64_t S, flash_acc_t<G> scale, const G* qkv,
                            const flash_acc_t<G>* lse, const G* ctx, const G* dctx,
                            flash_acc_t<G>* delta, G* dqkv, std::int64_t b, std::int64_t h,
                            std::int64_t qt) {
  using A = flash_acc_t<G>;
  using O = flash_operand_t<G>;
  const Head<G> x = head_of(qkv, H, S, static_cast<std::int64_t>(g.hd), b, h);
  const int tile = g.tile;
  const BackwardTiles<O, A> t = carve_backward<O, A>(smem, g, 1);
  A* sdq = t.acc[0];

  const std::int64_t r0 = qt * tile;
  const int rows = rows_from(S, r0, tile);
  load_tile(ex, g, x.q + r0 * x.ld, x.ld, rows, t.q, g.ldo);
  load_tile(ex, g, dctx + x.ctx + r0 * x.dim, x.dim, rows, t.dout, g.ldo);
  load_tile(ex, g, ctx + x.ctx + r0 * x.dim, x.dim, rows, sdq, g.lda);  // o, for δ
  for (int r = ex.tid(); r < tile; r += ex.threads())
    t.lse[r] = r < rows ? lse[x.row + r0 + r] : A(0);
  ex.sync();
  for (int r = ex.group(); r < tile; r += ex.groups()) {
    A d = A(0);
    for (int c = ex.lane(); c < g.hd; c += ex.lanes())
      d += A(t.dout[r * g.ldo + c]) * sdq[r * g.lda + c];
    d = ex.group_sum(d);
    if (ex.lane() == 0) {
      t.delta[r] = d;
      if (r < rows) delta[x.row + r0 + r] = d;
    }
  }
  ex.sync();
  zero_tile(ex, g, sdq);
  for (std::int64_t c0 = 0; c0 < S; c0 += tile) {
    const int cols = rows_from(S, c0, tile);
    ex.sync();
    load_tile(ex, g, x.q + x.dim + c0 * x.ld, x.ld, cols, t.k, g.ldo);
    load_tile(ex, g, x.q + 2 * x.dim + c0 * x.ld, x.ld, cols, t.v, g.ldo);
    ex.sync();
    recompute_dscores<Mma>(ex, g, scale, rows, cols, t, false);
    Mma::template product<false, false>(ex, up16(rows), g.hdp, up16(cols), scale, t.ds, g.ldp,
                                        t.k, g.ldo, sdq, g.lda, true);
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
  using A = flash_acc_t<G>;
  using O = flash_operand_t<G>;
  const Head<G> x = head_of(qkv, H, S, static_cast<std::int64_t>(g.hd), b, h);
  const int tile = g.tile;
  const BackwardTiles<O, A> t = carve_backward<O, A>(smem, g, 2);
  A *sdk = t.acc[0], *sdv = t.acc[1];

  const std::int64_t c0 = kt * tile;
  const int cols = rows_from(S, c0, tile);
  load_tile(ex, g, x.q + x.dim + c0 * x.ld, x.ld, cols, t.k, g.ldo);
  load_tile(ex, g, x.q + 2 * x.dim + c0 * x.ld, x.ld, cols, t.v, g.ldo);
  zero_tile(ex, g, sdk);
  zero_tile(ex, g, sdv);
  for (std::int64_t r0 = 0; r0 < S; r0 += tile) {
    const int rows = rows_from(S, r0, tile);
    ex.sync();
    load_tile(ex, g, x.q + r0 * x.ld, x.ld, rows, t.q, g.ldo);
    load_tile(ex, g, dctx + x.ctx + r0 * x.dim, x.dim, rows, t.dout, g.ldo);
    for (int r = ex.tid(); r < tile; r += ex.threads()) {
      t.lse[r] = r < rows ? lse[x.row + r0 + r] : A(0);
      t.delta[r] = r < rows ? delta[x.row + r0 + r] : A(0);
    }
    ex.sync();
    recompute_dscores<Mma>(ex, g, scale, rows, cols, t, true);
    Mma::template product<true, false>(ex, up16(cols), g.hdp, up16(rows), A(1), t.p, g.ldp,
                                       t.dout, g.ldo, sdv, g.lda, true);
    Mma::template product<true, false>(ex, up16(cols), g.hdp, up16(rows), scale, t.ds, g.ldp, t.q,
                                       g.ldo, sdk, g.lda, true);
  }
  ex.sync();
  store_tile(ex, g, sdk, cols, dqkv + x.qkv + x.dim + c0 * x.ld, x.ld);
  store_tile(ex, g, sdv, cols, dqkv + x.qkv + 2 * x.dim + c0 * x.ld, x.ld);
}

}  // namespace moca::cuda::flash
