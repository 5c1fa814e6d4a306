// The register-fragment attention kernels of bf16 heads (kernels/flash_mma.cuh) run on the host:
// the kernels' own code, compiled with tests/host_warps.hpp, which runs each block's 128 threads
// as host threads and emulates ldmatrix, mma.sync and the shuffles with the layouts of the PTX
// ISA. ctx, the log-sum-exp and dqkv are held to the CPU's float attention of the same bf16
// values at the budget of the GPU parity test (5e-3 normwise; lse 3e-3), over head widths of each
// of the four instantiations and token counts with ragged tiles; outputs start as NaN, and so
// does shared memory, so nothing left unwritten or read unwritten passes. The device runs the
// same code in tests/cuda/ops_cuda_test.cpp; this test lets the kernels' indexing be changed and
// checked without a GPU.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "host_warps.hpp"
#define MOCA_KERNELS_ON_HOST
#include <moca/backend/cuda/kernels/flash_mma.cuh>
#include <moca/moca.hpp>

#include "attention_reference.hpp"

namespace {

using namespace moca;
namespace fm = moca::cuda::kernels::flash_mma;

/// The three passes, as the launcher runs them on the device.
template <int NK>
void run_passes(int B, int H, int S, int hd, float scale, const bf16* qkv, float* lse, bf16* ctx,
                const bf16* dctx, float* delta, bf16* dqkv) {
  const HostDim3 grid{static_cast<unsigned>((S + fm::kRows - 1) / fm::kRows),
                      static_cast<unsigned>(H), static_cast<unsigned>(B)};
  host_warps::launch(fm::forward_kernel<NK>, grid, fm::kForwardBytes<NK>, S, H, hd, scale, qkv, lse,
                     ctx);
  host_warps::launch(fm::dq_kernel<NK>, grid, fm::kDqBytes<NK>, S, H, hd, scale, qkv,
                     static_cast<const float*>(lse), static_cast<const bf16*>(ctx), dctx, delta,
                     dqkv);
  host_warps::launch(fm::dkdv_kernel<NK>, grid, fm::kDkdvBytes<NK>, S, H, hd, scale, qkv,
                     static_cast<const float*>(lse), dctx, static_cast<const float*>(delta), dqkv);
}

/// ||got − expected|| / ||expected|| (NaN anywhere in got makes it NaN).
double relative_error(const std::vector<float>& expected, const std::vector<float>& got) {
  double d = 0, n = 0;
  for (std::size_t i = 0; i < expected.size(); ++i) {
    d += (double(got[i]) - expected[i]) * (double(got[i]) - expected[i]);
    n += double(expected[i]) * expected[i];
  }
  return std::sqrt(d / n);
}

std::vector<float> widened(const std::vector<bf16>& x) {
  return std::vector<float>(x.begin(), x.end());
}

/// `shift` > 0 adds shift to every query feature and subtracts it from every key feature, so that
/// every score is about −hd · shift² · scale: a log-sum-exp whose e^−lse overflows a float.
void check_shape(int B, int S, int H, int hd, float shift = 0) {
  CAPTURE(shift);
  CAPTURE(B);
  CAPTURE(S);
  CAPTURE(H);
  CAPTURE(hd);
  const int dim = H * hd;
  // bf16 inputs, and the float copies the CPU reference reads.
  Tensor<float> qkv32({B, S, 3 * dim}), dctx32({B, S, dim});
  fill_uniform(TensorView<float>(qkv32), Philox(7), 0, -2.0, 2.0);
  fill_uniform(TensorView<float>(dctx32), Philox(7), 1, -1.0, 1.0);
  std::vector<bf16> qkv(static_cast<std::size_t>(qkv32.numel())),
      dctx(static_cast<std::size_t>(dctx32.numel()));
  for (std::size_t i = 0; i < qkv.size(); ++i) {
    const std::size_t part = i % static_cast<std::size_t>(3 * dim) / static_cast<std::size_t>(dim);
    if (part < 2) qkv32.data()[i] += part == 0 ? shift : -shift;
    qkv[i] = bf16(qkv32.data()[i]);
    qkv32.data()[i] = float(qkv[i]);
  }
  for (std::size_t i = 0; i < dctx.size(); ++i) {
    dctx[i] = bf16(dctx32.data()[i]);
    dctx32.data()[i] = float(dctx[i]);
  }
  const bf16 scale_h(1.0f / std::sqrt(float(hd)));  // the layer's scale, rounded as it is
  const float scale = float(scale_h);

  Tensor<float> probs({B, H, S, S}), ctx({B, S, dim}), dprobs({B, H, S, S}), dqkv({B, S, 3 * dim});
  ops::attention_forward(qkv32, H, scale, probs, ctx);
  ops::attention_backward(qkv32, probs, ctx, dctx32, H, scale, dprobs, dqkv);

  const bf16 nan_bf16 = bf16::from_bits(0x7fc0);
  std::vector<bf16> gctx(ctx.numel(), nan_bf16), gdqkv(dqkv.numel(), nan_bf16);
  std::vector<float> glse(static_cast<std::size_t>(B * H * S), std::nanf("")),
      gdelta(glse.size(), std::nanf(""));
  auto run = [&]<int NK>() {
    run_passes<NK>(B, H, S, hd, scale, qkv.data(), glse.data(), gctx.data(), dctx.data(),
                   gdelta.data(), gdqkv.data());
  };
  switch ((hd + 15) / 16) {
    case 1:
      run.template operator()<1>();
      break;
    case 2:
      run.template operator()<2>();
      break;
    case 3:
      run.template operator()<3>();
      break;
    default:
      run.template operator()<4>();
      break;
  }

  const double ctx_err =
      relative_error(std::vector<float>(ctx.data(), ctx.data() + ctx.numel()), widened(gctx));
  const double dqkv_err =
      relative_error(std::vector<float>(dqkv.data(), dqkv.data() + dqkv.numel()), widened(gdqkv));
  INFO("ctx ", ctx_err, ", dqkv ", dqkv_err);
  CHECK(ctx_err <= 5e-3);
  CHECK(dqkv_err <= 5e-3);
  const std::vector<double> lse_ref =
      attention_reference::log_sum_exp_rows(qkv32.data(), B, H, S, hd, double(scale));
  double worst = 0;
  for (std::size_t i = 0; i < glse.size(); ++i)
    worst = std::max(worst, std::abs(double(glse[i]) - lse_ref[i]) / std::abs(lse_ref[i]));
  INFO("lse ", worst, " (first ", glse[0], ")");
  CHECK(worst < 3e-3);  // NaN fails too
  // δ = rowsum(do ∘ o), o as stored in bf16.
  double delta_worst = 0;
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < H; ++h)
      for (int i = 0; i < S; ++i) {
        double d = 0, scale_of = 0;
        for (int c = 0; c < hd; ++c) {
          const std::size_t at = (static_cast<std::size_t>(b) * S + i) * dim + h * hd + c;
          d += double(dctx[at]) * double(gctx[at]);
          scale_of += std::abs(double(dctx[at]) * double(gctx[at]));
        }
        const double got = gdelta[(static_cast<std::size_t>(b) * H + h) * S + i];
        delta_worst = std::max(delta_worst, std::abs(got - d) / std::max(scale_of, 1e-30));
      }
  INFO("delta ", delta_worst);
  CHECK(delta_worst < 1e-5);
}

}  // namespace

TEST_CASE("flash_mma on the host: every instantiation, ragged tiles, against the CPU") {
  // Widths 8 … 64 cover the four instantiations (16·NK features, the last step padded or not);
  // 17 and 65 tokens end a tile with 17 and 1 rows, 130 double-buffers three tiles in every
  // pass, 1 is a single row. Host threads are slow: the shapes are small.
  const int shapes[][4] = {{2, 17, 2, 8},  {1, 65, 1, 16}, {1, 33, 2, 24},  {1, 40, 1, 32},
                           {1, 50, 1, 40}, {1, 1, 2, 48},  {1, 130, 1, 64}, {1, 20, 1, 56}};
  for (const auto& [B, S, H, hd] : shapes) check_shape(B, S, H, hd);
}

TEST_CASE("flash_mma on the host: scores far below zero, keys past S in a partial tile") {
  // Scores near −140: e^−lse is past float's range, so the dq pass's keys past S (zero rows) must
  // be masked out, not left to multiply an infinite probability by a zero key.
  check_shape(1, 50, 1, 32, 5.0f);
}
