// The fused attention's block programs (backend/cuda/kernels/flash_attention.hpp), run serially on
// the host: the same code the CUDA kernels run per thread block, checked here on every machine
// against the composed attention in double. Shared memory starts as NaN bytes for every block (a
// GPU's is garbage), so a read of a value no step wrote shows up as NaN; outputs carry guards.
#include <moca/backend/cuda/kernels/flash_attention.hpp>

#include <array>
#include <bit>
#include <cmath>
#include <cstring>
#include <vector>

#include "attention_reference.hpp"
#include "reference.hpp"

namespace moca::test {
namespace {

using cuda::flash::Geometry;
using cuda::flash::Program;

/// The tensor cores' TF32 operands, on the host: products of operands rounded to 10 mantissa
/// bits (to nearest, ties away, as cvt.rna.tf32.f32), accumulated in float.
struct Tf32RoundedMma {
  static float tf32(float x) {
    std::uint32_t u = std::bit_cast<std::uint32_t>(x);
    if ((u & 0x7f800000u) != 0x7f800000u) u = (u + 0x1000u) & 0xffffe000u;
    return std::bit_cast<float>(u);
  }
  template <bool AT, bool BT, class Exec>
  static void product(const Exec&, int M, int N, int K, float alpha, const float* A, int lda,
                      const float* B, int ldb, float* C, int ldc, bool accumulate) {
    for (int i = 0; i < M; ++i)
      for (int j = 0; j < N; ++j) {
        float acc = 0;
        for (int k = 0; k < K; ++k)
          acc += tf32(AT ? A[k * lda + i] : A[i * lda + k]) * tf32(BT ? B[j * ldb + k] : B[k * ldb + j]);
        float& c = C[i * ldc + j];
        c = accumulate ? c + alpha * acc : alpha * acc;
      }
  }
};

/// The fragments of cuda::flash::BlockedMma on the host, with the tensor cores' arithmetic (TF32
/// operands, float accumulation in k order): the blocking the CUDA kernels run on wmma, its
/// ragged edges included, checked here on every machine.
struct HostTf32 {
  static constexpr int kK = 8;
  struct Acc {
    float v[16][16];
  };
  template <bool AT>
  struct AFrag {
    float v[16][8];  // op(A) rows i0 …, columns k …
  };
  template <bool BT>
  struct BFrag {
    float v[8][16];  // op(B) rows k …, columns j0 …
  };
  static void zero(Acc& c) { std::memset(c.v, 0, sizeof c.v); }
  template <bool AT>
  static void load_a(AFrag<AT>& a, const float* A, int lda, int i0, int k) {
    for (int i = 0; i < 16; ++i)
      for (int q = 0; q < 8; ++q)
        a.v[i][q] = Tf32RoundedMma::tf32(AT ? A[(k + q) * lda + i0 + i] : A[(i0 + i) * lda + k + q]);
  }
  template <bool BT>
  static void load_b(BFrag<BT>& b, const float* B, int ldb, int k, int j0) {
    for (int q = 0; q < 8; ++q)
      for (int j = 0; j < 16; ++j)
        b.v[q][j] = Tf32RoundedMma::tf32(BT ? B[(j0 + j) * ldb + k + q] : B[(k + q) * ldb + j0 + j]);
  }
  template <class FA, class FB>
  static void mma(Acc& c, const FA& a, const FB& b) {
    for (int i = 0; i < 16; ++i)
      for (int j = 0; j < 16; ++j)
        for (int q = 0; q < 8; ++q) c.v[i][j] += a.v[i][q] * b.v[q][j];
  }
  static void store(Acc& acc, float* c, int ldc, float alpha, bool accumulate) {
    for (int i = 0; i < 16; ++i)
      for (int j = 0; j < 16; ++j) {
        float& out = c[i * ldc + j];
        out = accumulate ? out + alpha * acc.v[i][j] : alpha * acc.v[i][j];
      }
  }
};

/// The tensor cores' bf16 fragments on the host (m16n16k16, float accumulation in k order): the
/// operands are bf16 already, so their products are exact in float.
struct HostBf16 {
  static constexpr int kK = 16;
  using Acc = HostTf32::Acc;
  template <bool AT>
  struct AFrag {
    float v[16][16];
  };
  template <bool BT>
  struct BFrag {
    float v[16][16];
  };
  static void zero(Acc& c) { HostTf32::zero(c); }
  template <bool AT>
  static void load_a(AFrag<AT>& a, const bf16* A, int lda, int i0, int k) {
    for (int i = 0; i < 16; ++i)
      for (int q = 0; q < 16; ++q)
        a.v[i][q] = AT ? A[(k + q) * lda + i0 + i] : A[(i0 + i) * lda + k + q];
  }
  template <bool BT>
  static void load_b(BFrag<BT>& b, const bf16* B, int ldb, int k, int j0) {
    for (int q = 0; q < 16; ++q)
      for (int j = 0; j < 16; ++j)
        b.v[q][j] = BT ? B[(j0 + j) * ldb + k + q] : B[(k + q) * ldb + j0 + j];
  }
  template <class FA, class FB>
  static void mma(Acc& c, const FA& a, const FB& b) {
    for (int i = 0; i < 16; ++i)
      for (int j = 0; j < 16; ++j)
        for (int q = 0; q < 16; ++q) c.v[i][j] += a.v[i][q] * b.v[q][j];
  }
  static void store(Acc& acc, float* c, int ldc, float alpha, bool accumulate) {
    HostTf32::store(acc, c, ldc, alpha, accumulate);
  }
};

/// Outputs of one fused run, each with guards on both sides.
template <class T>
struct Guarded {
  static constexpr i64 kGuard = 37;
  static constexpr T kSentinel = T(-4321.25);
  std::vector<T> all;
  i64 n;
  explicit Guarded(i64 n_) : all(n_ + 2 * kGuard, kSentinel), n(n_) {
    std::fill(data(), data() + n, std::numeric_limits<T>::quiet_NaN());  // every element must be written
  }
  T* data() { return all.data() + kGuard; }
  TensorView<T> view(Shape s) { return TensorView<T>(data(), s); }
  bool intact() const {
    for (i64 i = 0; i < kGuard; ++i)
      if (all[i] != kSentinel || all[all.size() - 1 - i] != kSentinel) return false;
    return true;
  }
};

/// The three passes as the CUDA kernels launch them (grid: tiles × heads × images), one block
/// after another, each starting from NaN shared memory. T is the storage, A the arithmetic.
template <class Mma, class T, class A = cuda::flash::flash_acc_t<T>>
void run_fused(const Geometry& g, i64 B, i64 H, i64 S, A scale, const T* qkv, const T* dctx,
               A* lse, T* ctx, A* delta, T* dqkv) {
  const std::size_t bytes = std::max({cuda::flash::shared_bytes(Program::Forward, g),
                                      cuda::flash::shared_bytes(Program::Dq, g),
                                      cuda::flash::shared_bytes(Program::Dkdv, g)});
  std::vector<double> storage(bytes / sizeof(double) + 1);  // aligned for A
  auto* smem = reinterpret_cast<unsigned char*>(storage.data());
  const cuda::flash::SerialExec ex;
  const i64 tiles = (S + g.tile - 1) / g.tile;
  auto each_block = [&](auto&& run) {
    for (i64 b = 0; b < B; ++b)
      for (i64 h = 0; h < H; ++h)
        for (i64 t = 0; t < tiles; ++t) {
          std::memset(smem, 0xff, bytes);  // NaN in every float and double
          run(b, h, t);
        }
  };
  each_block([&](i64 b, i64 h, i64 t) {
    cuda::flash::forward_block<Mma>(ex, g, smem, H, S, scale, qkv, lse, ctx, b, h, t);
  });
  each_block([&](i64 b, i64 h, i64 t) {
    cuda::flash::dq_block<Mma>(ex, g, smem, H, S, scale, qkv, lse, ctx, dctx, delta, dqkv, b, h, t);
  });
  each_block([&](i64 b, i64 h, i64 t) {
    cuda::flash::dkdv_block<Mma>(ex, g, smem, H, S, scale, qkv, lse, dctx, delta, dqkv, b, h, t);
  });
}

/// Runs the fused passes for one shape and tile and compares ctx, lse, δ and dqkv with the
/// composed attention in double.
template <class Mma, class T>
void check_shape(const std::string& label, i64 B, i64 S, i64 H, i64 hd, int tile, double rel,
                 std::uint64_t stream) {
  using A = cuda::flash::flash_acc_t<T>;
  const i64 dim = H * hd;
  const auto qkv = uniform<T>({B, S, 3 * dim}, stream, -2, 2);
  const auto dctx = uniform<T>({B, S, dim}, stream + 1);
  const double scale = 1.0 / std::sqrt(double(hd));

  // Reference: the composed form in double, from the same (widened) inputs.
  Tensor<double> qkv_d({B, S, 3 * dim}), dctx_d({B, S, dim});
  std::copy(qkv.begin(), qkv.end(), qkv_d.data());
  std::copy(dctx.begin(), dctx.end(), dctx_d.data());
  Tensor<double> probs({B, H, S, S}), ctx_ref({B, S, dim}), dprobs({B, H, S, S}),
      dqkv_ref({B, S, 3 * dim});
  ops::attention_impl::attention_forward_composed<double, Cpu>(qkv_d, H, scale, probs, ctx_ref);
  ops::attention_impl::attention_backward_composed<double, Cpu>(qkv_d, probs, dctx_d, H, scale,
                                                                dprobs, dqkv_ref);
  const Vec lse_ref = attention_reference::log_sum_exp_rows(qkv_d.data(), B, H, S, hd, scale);
  Vec delta_ref(static_cast<std::size_t>(B * H * S));
  for (i64 b = 0; b < B; ++b)
    for (i64 h = 0; h < H; ++h)
      for (i64 i = 0; i < S; ++i) {
        double d = 0;
        for (i64 c = 0; c < hd; ++c)
          d += ctx_ref.data()[(b * S + i) * dim + h * hd + c] * dctx_d.data()[(b * S + i) * dim + h * hd + c];
        delta_ref[(b * H + h) * S + i] = d;
      }

  Guarded<A> lse(B * H * S), delta(B * H * S);
  Guarded<T> ctx(B * S * dim), dqkv(B * S * 3 * dim);
  const Geometry g = cuda::flash::make_geometry<T>(tile, static_cast<int>(hd));
  run_fused<Mma, T>(g, B, H, S, A(scale), qkv.data(), dctx.data(), lse.data(), ctx.data(),
                    delta.data(), dqkv.data());

  const std::string what = detail::str(label, " B=", B, " S=", S, " H=", H, " hd=", hd,
                                       " tile=", tile);
  check_close(what + " ctx", ctx.view({B, S, dim}), to_vec<double>(ctx_ref), rel);
  check_close(what + " lse", lse.view({B, H, S}), lse_ref, rel);
  check_close(what + " delta", delta.view({B, H, S}), delta_ref, rel);
  check_close(what + " dqkv", dqkv.view({B, S, 3 * dim}), to_vec<double>(dqkv_ref), rel);
  const bool guards = lse.intact() && ctx.intact() && delta.intact() && dqkv.intact();
  CHECK_MESSAGE(guards, what, ": a pass wrote outside its output");
}

// (B, S, H, hd): ragged and exact multiples of every tile, one token, hd below, at and above a
// multiple of 16 (padding columns), the ViT-S/B head (64) at 197 tokens, heads up to 128 wide,
// and widths that do not split into 16-byte chunks (6: float and bf16 rows go element by
// element; 9: double's too), besides the ones that do.
constexpr std::array<std::array<i64, 4>, 12> kShapes{{{2, 17, 3, 8},
                                                      {1, 65, 2, 16},
                                                      {2, 30, 3, 64},
                                                      {1, 197, 2, 64},
                                                      {1, 64, 1, 64},
                                                      {1, 5, 1, 4},
                                                      {2, 1, 2, 24},
                                                      {1, 33, 1, 80},
                                                      {1, 48, 1, 128},
                                                      {1, 129, 1, 20},
                                                      {1, 40, 2, 6},
                                                      {2, 23, 2, 9}}};

TEST_CASE_TEMPLATE("flash attention block programs: exact products match the composed form", T,
                   float, double) {
  std::uint64_t stream = 5000;
  for (const int tile : cuda::flash::kTiles)
    for (const auto& [B, S, H, hd] : kShapes) {
      check_shape<cuda::flash::SimtMma, T>("simt", B, S, H, hd, tile, kRel<T>, stream);
      stream += 2;
    }
}

TEST_CASE("flash attention block programs: TF32 operands stay within their budget") {
  // TF32 keeps 10 mantissa bits (unit roundoff 2^-11 ≈ 4.9e-4); the scores' error passes
  // through exp and the products, measured against the largest value of each result. 3e-3 is
  // the budget the CUDA parity test holds the tensor-core kernels to as well.
  std::uint64_t stream = 6000;
  for (const int tile : cuda::flash::kTiles)
    for (const auto& [B, S, H, hd] : kShapes) {
      check_shape<Tf32RoundedMma, float>("tf32", B, S, H, hd, tile, 3e-3, stream);
      stream += 2;
    }
}

// The budget of bf16 heads, against the composed attention in double of the same (bf16) inputs.
// The scores are exact products summed in float; p and dS are rounded to bf16 for the products
// that read them (relative error up to 2^-8 per term, independent from term to term); ctx and
// dqkv are rounded once to bf16 as they are stored (up to 2^-9 of the largest value), and δ
// comes from the rounded ctx. The worst error over every tile and shape here is 3.3e-3 of the
// largest value (dqkv, where dS·k and dSᵀ·q cancel); 5e-3 leaves room for other inputs, and a dS
// copy truncated to one bit less fails it.
constexpr double kBf16Budget = 5e-3;

TEST_CASE("flash attention block programs: 2×2 fragment blocks (the kernels' tensor-core "
          "products) match the composed form") {
  // The blocking of cuda::flash::BlockedMma, every edge (an odd number of fragment rows or
  // columns, one fragment, ragged tiles): float heads on TF32 fragments (the TF32 budget above),
  // bf16 heads on bf16 fragments (m16n16k16).
  std::uint64_t stream = 8000;
  for (const int tile : cuda::flash::kTiles)
    for (const auto& [B, S, H, hd] : kShapes) {
      check_shape<cuda::flash::BlockedMma<HostTf32>, float>("blocked", B, S, H, hd, tile, 3e-3,
                                                            stream);
      check_shape<cuda::flash::BlockedMma<HostBf16>, bf16>("blocked bf16", B, S, H, hd, tile,
                                                           kBf16Budget, stream);
      stream += 2;
    }
}

TEST_CASE("flash attention block programs: bf16 heads, bf16 operands, float arithmetic") {
  // The same programs with plain products of the bf16 operands in float: the arithmetic of the
  // tensor cores' bf16 products, in another order of summation.
  std::uint64_t stream = 7000;
  for (const int tile : cuda::flash::kTiles)
    for (const auto& [B, S, H, hd] : kShapes) {
      check_shape<cuda::flash::SimtMma, bf16>("bf16", B, S, H, hd, tile, kBf16Budget, stream);
      stream += 2;
    }
}

TEST_CASE("flash attention geometry: padded widths, aligned rows, sizes that grow with the tile") {
  using cuda::flash::make_geometry;
  using cuda::flash::shared_bytes;
  const Geometry g = make_geometry<float>(64, 20);
  CHECK(g.hdp == 32);
  CHECK(!g.copies());
  CHECK(g.ldp == g.ldt);
  // Every row starts 16 bytes past the last one's width: whole 16-byte chunks, and the strides
  // wmma needs (a multiple of 4 floats, of 8 bf16).
  CHECK(g.ldo * 4 % 16 == 0);
  CHECK(g.lda * 4 % 16 == 0);
  CHECK(g.ldt * 4 % 16 == 0);
  const Geometry h = make_geometry<bf16>(64, 64);
  CHECK(h.copies());
  CHECK(h.ldo == 72);
  CHECK(h.ldp == 72);
  CHECK(h.lda == 68);
  CHECK(h.ldt == 68);
  CHECK(make_geometry<double>(16, 64).ldo == 66);
  CHECK(make_geometry<float>(16, 64).hdp == 64);
  // Every buffer starts on a 128-byte boundary: a carve of odd sizes keeps the alignment.
  alignas(128) unsigned char smem[4096];
  cuda::flash::Carver carve{smem};
  carve.take<float>(3);
  float* second = carve.take<float>(5);
  CHECK(reinterpret_cast<std::uintptr_t>(second) % cuda::flash::kAlign == 0);
  // The backward's key pass holds the most; double needs twice float; bf16 heads less than
  // float ones (half the operand bytes, with p and dS copies besides).
  for (const int tile : cuda::flash::kTiles) {
    const Geometry f = make_geometry<float>(tile, 64);
    const Geometry d = make_geometry<double>(tile, 64);
    const Geometry b = make_geometry<bf16>(tile, 64);
    CHECK(shared_bytes(Program::Dkdv, f) > shared_bytes(Program::Forward, f));
    CHECK(double(shared_bytes(Program::Dkdv, d)) > 1.9 * double(shared_bytes(Program::Dkdv, f)));
    for (const Program p : {Program::Forward, Program::Dq, Program::Dkdv})
      CHECK(shared_bytes(p, b) < shared_bytes(p, f));
  }
  // ViT-B's head (64) at the 64-row tile: the sizes the CUDA launcher picks tiles from (the
  // forward: 87,808 bytes in float; in bf16 72,448, three blocks to an H100's SM).
  CHECK(shared_bytes(Program::Forward, make_geometry<float>(64, 64)) < 100 * 1024);
  CHECK(shared_bytes(Program::Forward, make_geometry<bf16>(64, 64)) < 227 * 1024 / 3);
  CHECK(shared_bytes(Program::Dq, make_geometry<bf16>(64, 64)) < 100 * 1024);
}

}  // namespace
}  // namespace moca::test
