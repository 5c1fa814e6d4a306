// The packed GEMM built for two instruction-set targets in one program: the ymm kernel (from a
// file compiled without AVX-512) and the kernel of the default flags (zmm where the compiler
// targets AVX-512). Each build has its own linker names, so both run side by side, and both sum
// every element in the same order: their results must agree to the bit.
#include <doctest/doctest.h>

#include <cstring>
#include <vector>

#define MOCA_GEMM_TARGETS_DEFINE
#include "gemm_targets.hpp"
#include "reference.hpp"

using namespace moca;
using namespace moca::test;

bool moca::test::gemm_native(const GemmCall& call) { return run_packed_gemm(call); }
bool moca::test::head_native(const HeadCall& call) { return run_head(call); }

TEST_CASE("packed GEMM: the ymm and native kernels give the same bits, side by side") {
  struct Dims {
    std::int64_t M, N, K;
  };
  // Ragged tiles in both directions, several column panels, inner slices and row blocks; odd
  // inner slices (5, and 264 + 249), which the bf16 pair kernel closes with a zero.
  const Dims dims[] = {{7, 9, 5},      {61, 70, 300},   {400, 37, 700},
                       {13, 4200, 20}, {200, 96, 1100}, {9, 40, 513}};
  std::uint64_t stream = 3;
  int compared = 0, rounded = 0;
  for (const Dims& d : dims)
    for (int ta = 0; ta < 2; ++ta)
      for (int tb = 0; tb < 2; ++tb)
        for (int mode = 0; mode < 5; ++mode) {
          const Tensor<float> A = uniform<float>({d.M * d.K}, stream++);
          const Tensor<float> B = uniform<float>({d.K * d.N}, stream++);
          const Tensor<float> C0 = uniform<float>({d.M * d.N}, stream++);
          const Tensor<float> bias = uniform<float>({d.N}, stream++);
          std::vector<bf16> A16(A.data(), A.data() + A.numel());
          std::vector<bf16> B16(B.data(), B.data() + B.numel());
          // Modes: float with a bias; float accumulating; α and β; bf16 operands with β; bf16
          // operands with a bias.
          const bool half = mode >= 3;
          GemmCall call{ta == 1,
                        tb == 1,
                        d.M,
                        d.N,
                        d.K,
                        mode == 2 ? 0.7f : 1.0f,
                        mode == 0 || mode == 4 ? 0.0f
                        : mode == 1            ? 1.0f
                                               : -0.3f,
                        A.data(),
                        B.data(),
                        half ? A16.data() : nullptr,
                        half ? B16.data() : nullptr,
                        mode == 0 || mode == 4 ? bias.data() : nullptr,
                        nullptr};
          std::vector<float> ymm(C0.data(), C0.data() + C0.numel()), native = ymm;
          call.C = ymm.data();
          if (!gemm_ymm(call)) {
            MESSAGE("skipped: the compiler does not target AVX2 + FMA");
            return;
          }
          call.C = native.data();
          REQUIRE(gemm_native(call));
          CHECK_MESSAGE(std::memcmp(ymm.data(), native.data(), ymm.size() * sizeof(float)) == 0,
                        d.M, "x", d.N, "x", d.K, " trans ", ta, tb, " mode ", mode);
          ++compared;
          if (!half) continue;
          // The bf16 result rounded as the last inner slice is stored: the float result above,
          // rounded, from either build (C then only holds partial sums, and is not compared).
          std::vector<bf16> expected(ymm.size());
          for (std::size_t i = 0; i < ymm.size(); ++i) expected[i] = bf16(ymm[i]);
          // With β = 0 and one inner slice (K ≤ 256) no float C is needed at all.
          const bool no_c = mode == 4 && d.K <= 256;
          for (int build = 0; build < 2; ++build) {
            std::vector<float> partial(C0.data(), C0.data() + C0.numel());
            std::vector<bf16> out(expected.size(), bf16(1e30f));
            call.C = no_c ? nullptr : partial.data();
            call.out = out.data();
            REQUIRE((build == 0 ? gemm_ymm(call) : gemm_native(call)));
            call.out = nullptr;
            CHECK_MESSAGE(std::memcmp(out.data(), expected.data(), out.size() * sizeof(bf16)) == 0,
                          d.M, "x", d.N, "x", d.K, " trans ", ta, tb, " mode ", mode,
                          " rounded by the ", build == 0 ? "ymm" : "native", " build");
            ++rounded;
          }
        }
  CHECK(compared == 6 * 4 * 5);
  CHECK(rounded == 6 * 4 * 2 * 2);
#ifdef MOCA_CPU_SGEMM_BF16_PAIRS
  MESSAGE("compared the ymm kernel with the zmm kernel and its bf16 pair kernel");
#elif defined(MOCA_CPU_SGEMM_AVX512)
  MESSAGE("compared the ymm kernel with the zmm kernel");
#else
  MESSAGE("compared the ymm kernel with itself: this compiler does not target AVX-512");
#endif
}

TEST_CASE("attention head: the ymm and native register tiles give the same bits, side by side") {
  // Head widths of one, one and a half and four zmm vectors; token counts from one to past a
  // ViT-S/16 sequence, padded to 8 (half a zmm vector) or to 16. The head is one of two, so
  // that its rows are strided like a real qkv row.
  struct Dims {
    std::int64_t S, hd;
  };
  const Dims dims[] = {{1, 8}, {5, 24}, {17, 64}, {65, 64}, {49, 24}, {200, 64}, {197, 32}};
  std::uint64_t stream = 40;
  for (const Dims& d : dims) {
    const std::int64_t dim = 2 * d.hd, S = d.S;
    const Tensor<float> qkv = uniform<float>({S * 3 * dim}, stream++, -2, 2);
    const Tensor<float> dout = uniform<float>({S * dim}, stream++);
    struct Outputs {
      std::vector<float> probs, ctx, dqkv;
    };
    const auto run = [&](bool ymm, Outputs& o) {
      // Filled with a sentinel: each output element must be written by both builds alike.
      o.probs.assign(S * S, 3.0f);
      o.ctx.assign(S * dim, 3.0f);
      o.dqkv.assign(S * 3 * dim, 3.0f);
      const HeadCall call{S,           d.hd,           dim,          0.125f,       qkv.data(),
                          dout.data(), o.probs.data(), o.ctx.data(), o.dqkv.data()};
      return ymm ? head_ymm(call) : head_native(call);
    };
    Outputs ymm, native;
    if (!run(true, ymm)) {
      MESSAGE("skipped: the compiler does not target AVX2 + FMA");
      return;
    }
    REQUIRE(run(false, native));
    const auto same = [](const std::vector<float>& x, const std::vector<float>& y) {
      return std::memcmp(x.data(), y.data(), x.size() * sizeof(float)) == 0;
    };
    CHECK_MESSAGE(same(ymm.probs, native.probs), "probabilities S=", S, " hd=", d.hd);
    CHECK_MESSAGE(same(ymm.ctx, native.ctx), "ctx S=", S, " hd=", d.hd);
    CHECK_MESSAGE(same(ymm.dqkv, native.dqkv), "dqkv S=", S, " hd=", d.hd);
    // Not vacuous: the head wrote its outputs (the sentinel is gone from the head's columns).
    CHECK(native.ctx[0] != 3.0f);
    CHECK(native.dqkv[2 * dim + d.hd - 1] != 3.0f);
  }
}
