// bf16: rounding (against PyTorch's and against an independent rounding from double), the exact
// widening, arithmetic that rounds once, its limits; then the CPU op set and a ViT in bf16
// storage against the same computation in float.
#include <doctest/doctest.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <fstream>
#include <limits>
#include <moca/core/bf16.hpp>
#include <moca/io/safetensors.hpp>
#include <moca/models/vit.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "reference.hpp"

using namespace moca;
using namespace moca::testing;

namespace {

std::uint32_t bits_of(float f) { return std::bit_cast<std::uint32_t>(f); }
float float_of(std::uint32_t b) { return std::bit_cast<float>(b); }

}  // namespace

TEST_CASE("bf16 rounds floats as PyTorch does (tests/data/bf16_reference.txt)") {
  std::ifstream in(std::string(MOCA_TEST_DATA_DIR) + "/bf16_reference.txt");
  REQUIRE_MESSAGE(in, "missing tests/data/bf16_reference.txt (tests/python/generate_bf16_reference.py)");
  std::string line;
  int rows = 0, mismatches = 0;
  while (std::getline(in, line)) {
    if (line.empty() || line[0] == '#') continue;
    std::istringstream fields(line);
    std::uint32_t f = 0, h = 0;
    fields >> std::hex >> f >> h;
    REQUIRE_FALSE(fields.fail());
    const bf16 rounded = float_of(f);
    if (rounded.bits() != h) {
      ++mismatches;
      INFO("float bits ", f, ": bf16 ", rounded.bits(), ", PyTorch ", h);
      CHECK(rounded.bits() == h);
    }
    ++rows;
  }
  CHECK(rows > 900);
  CHECK(mismatches == 0);
}

TEST_CASE("bf16 rounding agrees with a rounding from double over a sweep of float bit patterns") {
  // The safetensors encoder rounds the exact double value with integer arithmetic on the
  // mantissa: an independent implementation of the same rule (ties to even, gradual underflow,
  // overflow to infinity). A stride prime to 2^32 reaches every exponent and many mantissas.
  std::uint64_t checked = 0;
  for (std::uint64_t b = 0; b < (std::uint64_t{1} << 32); b += 65521) {
    const float f = float_of(static_cast<std::uint32_t>(b));
    if (std::isnan(f)) continue;
    const std::uint16_t want = detail::encode_narrow_float<8, 7>(static_cast<double>(f));
    if (bf16(f).bits() != want) {
      INFO("float bits ", b);
      CHECK(bf16(f).bits() == want);
    }
    ++checked;
  }
  CHECK(checked > 60000);
  // Every bf16 widens exactly and rounds back to itself (NaNs to the canonical NaN).
  for (std::uint32_t h = 0; h < 65536; ++h) {
    const bf16 x = bf16::from_bits(static_cast<std::uint16_t>(h));
    const float f = x;
    CHECK(bits_of(f) == (h << 16));
    if (std::isnan(f)) {
      CHECK(bf16(f).bits() == 0x7fc0);
    } else if (bf16(f).bits() != h) {
      CHECK(bf16(f).bits() == h);
    }
  }
}

TEST_CASE("bf16 arithmetic computes in float and rounds once; limits are bfloat16's") {
  bf16 x = 1.0f;
  x += 1.0f / 512;  // exactly half an ulp above 1: ties to even, stays 1
  CHECK(float(x) == 1.0f);
  x += 3.0f / 512;  // 1 + 3/512 rounds to 1 + 1/128
  CHECK(float(x) == 1.0f + 1.0f / 128);
  bf16 y = 3;
  y *= bf16(0.5f);
  CHECK(float(y) == 1.5f);
  y /= 3;
  CHECK(float(y) == 0.5f);
  y -= 1;
  CHECK(float(y) == -0.5f);
  CHECK(float(-y) == 0.5f);
  CHECK(float(bf16(0.1)) == 0.10009765625f);  // from double, via float
  CHECK(bf16(2.0f) > bf16(1.0f));
  CHECK(bf16(-0.0f) == bf16(0.0f));
  CHECK(std::signbit(float(bf16(-0.0f))));
  const bf16 a = 1.5f, b = 2.25f;
  const float product = a * b;  // a float product of the two widened values
  CHECK(product == 3.375f);

  using L = std::numeric_limits<bf16>;
  CHECK(float(L::max()) == std::ldexp(255.0f / 128.0f, 127));
  CHECK(float(L::lowest()) == -float(L::max()));
  CHECK(float(L::min()) == std::ldexp(1.0f, -126));
  CHECK(float(L::denorm_min()) == std::ldexp(1.0f, -133));
  CHECK(float(L::epsilon()) == std::ldexp(1.0f, -7));
  CHECK(float(L::epsilon()) == float(bf16::from_bits(0x3f81)) - 1.0f);
  CHECK(std::isinf(float(L::infinity())));
  CHECK(std::isnan(float(L::quiet_NaN())));
  CHECK(std::isnan(float(L::signaling_NaN())));
  CHECK(bf16(std::numeric_limits<float>::max()).bits() == L::infinity().bits());  // overflow
  CHECK(L::digits == 8);
  CHECK(is_floating_v<bf16>);
  CHECK(std::is_same_v<compute_t<bf16>, float>);
}
