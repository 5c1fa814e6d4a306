// A downstream program: includes the umbrella header, runs one GEMM and checks it exactly
// (integer-valued inputs, so float arithmetic is exact), and checks that a shape error throws.
#include <cstdio>
#include <moca/moca.hpp>

int main() {
  using namespace moca;
  Tensor<float> a({2, 3}), w({4, 3}), y({2, 4});
  for (std::int64_t i = 0; i < 2; ++i)
    for (std::int64_t k = 0; k < 3; ++k) a(i, k) = static_cast<float>(i + k);
  for (std::int64_t j = 0; j < 4; ++j)
    for (std::int64_t k = 0; k < 3; ++k) w(j, k) = static_cast<float>(j - k);
  ops::gemm(a, Trans::N, w, Trans::T, y);  // y = a · wᵀ

  int errors = 0;
  for (std::int64_t i = 0; i < 2; ++i)
    for (std::int64_t j = 0; j < 4; ++j) {
      float expected = 0;
      for (std::int64_t k = 0; k < 3; ++k) expected += static_cast<float>((i + k) * (j - k));
      if (y(i, j) != expected) {
        std::printf("y(%lld, %lld) = %g, expected %g\n", static_cast<long long>(i),
                    static_cast<long long>(j), y(i, j), expected);
        ++errors;
      }
    }
  // Shape errors reach the caller as moca::Error.
  bool threw = false;
  try {
    ops::gemm(a, Trans::N, w, Trans::N, y);
  } catch (const Error&) {
    threw = true;
  }
  if (!threw) {
    std::printf("gemm accepted incompatible shapes\n");
    ++errors;
  }
  if (errors != 0) return 1;
  std::printf("moca %s: gemm ok\n", kVersion);
  return 0;
}
