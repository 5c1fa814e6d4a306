// Counter-based random numbers (Philox-4x32-10, Salmon et al., SC 2011).
//
// A number is a pure function of (seed, stream, index): no hidden state advances, so a value does
// not depend on which thread or device draws it, nor on what was drawn before. Streams separate
// uses (initialisation of one tensor, the masks of one step, the augmentation of one sample):
//
//   Philox rng(seed);
//   float u = rng.uniform(stream, i);       // U[0, 1)
//   float z = rng.normal(stream, i);        // N(0, 1)
//
// To resume a run, store the seed and the counters the program derives streams from (step,
// sample index); nothing else is needed.
#pragma once

#include <array>
#include <cmath>
#include <cstdint>

namespace moca {

class Philox {
 public:
  using Block = std::array<std::uint32_t, 4>;

  explicit Philox(std::uint64_t seed = 0) : seed_(seed) {}
  std::uint64_t seed() const { return seed_; }

  /// The raw 128-bit block for counter (index, stream).
  Block block(std::uint64_t stream, std::uint64_t index) const {
    Block ctr = {static_cast<std::uint32_t>(index), static_cast<std::uint32_t>(index >> 32),
                 static_cast<std::uint32_t>(stream), static_cast<std::uint32_t>(stream >> 32)};
    std::uint32_t k0 = static_cast<std::uint32_t>(seed_);
    std::uint32_t k1 = static_cast<std::uint32_t>(seed_ >> 32);
    for (int round = 0; round < 10; ++round) {
      ctr = single_round(ctr, k0, k1);
      k0 += kWeyl0;
      k1 += kWeyl1;
    }
    return ctr;
  }

  /// 32 random bits: word (index % 4) of block index / 4.
  std::uint32_t bits(std::uint64_t stream, std::uint64_t index) const {
    return block(stream, index >> 2)[index & 3];
  }

  /// 64 random bits for index i (two words of one block).
  std::uint64_t bits64(std::uint64_t stream, std::uint64_t index) const {
    const Block b = block(stream, index >> 1);
    const int w = static_cast<int>(index & 1) * 2;
    return (static_cast<std::uint64_t>(b[w + 1]) << 32) | b[w];
  }

  /// Uniform float in [0, 1) with 24 random bits.
  float uniform(std::uint64_t stream, std::uint64_t index) const {
    return static_cast<float>(bits(stream, index) >> 8) * 0x1.0p-24f;
  }

  /// Uniform double in [0, 1) with 53 random bits.
  double uniform_double(std::uint64_t stream, std::uint64_t index) const {
    return static_cast<double>(bits64(stream, index) >> 11) * 0x1.0p-53;
  }

  /// Standard normal (Box-Muller on the two 64-bit halves of one block), in double.
  double normal(std::uint64_t stream, std::uint64_t index) const {
    const Block b = block(stream, index);
    const std::uint64_t a = (static_cast<std::uint64_t>(b[1]) << 32) | b[0];
    const std::uint64_t c = (static_cast<std::uint64_t>(b[3]) << 32) | b[2];
    const double u1 = (static_cast<double>(a >> 11) + 1.0) * 0x1.0p-53;  // (0, 1]: log is finite
    const double u2 = static_cast<double>(c >> 11) * 0x1.0p-53;
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
  }

  /// Uniform integer in [0, n) (n > 0), by 64-bit multiply-shift; bias is below 2^-32.
  std::uint64_t below(std::uint64_t n, std::uint64_t stream, std::uint64_t index) const {
    const unsigned __int128 x = static_cast<unsigned __int128>(bits64(stream, index)) * n;
    return static_cast<std::uint64_t>(x >> 64);
  }

 private:
  static constexpr std::uint32_t kMul0 = 0xD2511F53u;
  static constexpr std::uint32_t kMul1 = 0xCD9E8D57u;
  static constexpr std::uint32_t kWeyl0 = 0x9E3779B9u;
  static constexpr std::uint32_t kWeyl1 = 0xBB67AE85u;

  static Block single_round(const Block& c, std::uint32_t k0, std::uint32_t k1) {
    const std::uint64_t p0 = static_cast<std::uint64_t>(kMul0) * c[0];
    const std::uint64_t p1 = static_cast<std::uint64_t>(kMul1) * c[2];
    const auto hi0 = static_cast<std::uint32_t>(p0 >> 32), lo0 = static_cast<std::uint32_t>(p0);
    const auto hi1 = static_cast<std::uint32_t>(p1 >> 32), lo1 = static_cast<std::uint32_t>(p1);
    return {hi1 ^ c[1] ^ k0, lo1, hi0 ^ c[3] ^ k1, lo0};
  }

  std::uint64_t seed_;
};

}  // namespace moca
