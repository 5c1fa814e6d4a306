// bf16: the bfloat16 storage type, float's range (8 exponent bits) at 8 bits of precision (7
// stored mantissa bits). The element type of mixed-precision tensors: values are stored in 16
// bits and computed in float.
//
//   bf16 h = 0.1f;                 // rounds to nearest, ties to even: 0.10009765625
//   float f = h;                   // exact
//   h += 1;                        // h = bf16(float(h) + 1): computed in float, rounded once
//   Tensor<bf16> x({4, 8});        // an ordinary tensor element type
//
// Arithmetic goes through the implicit conversion to float: `a * b` of two bf16 is a float
// product, and assigning the result to a bf16 rounds it. So an expression written for a generic T
// computes in float and rounds only where it stores a T, which is what a kernel over bf16
// storage should do. Conversion from double goes through float, as PyTorch's does; NaN becomes
// the canonical quiet NaN 0x7FC0, as in PyTorch. Every member is usable in CUDA device code
// (bit casts use __builtin_bit_cast, which std::bit_cast is built on but nvcc accepts in device
// functions).
#pragma once

#include <concepts>
#include <cstdint>
#include <limits>
#include <type_traits>

#if defined(__CUDACC__)
#define MOCA_BF16_HD __host__ __device__
#else
#define MOCA_BF16_HD
#endif

namespace moca {

class bf16 {
 public:
  constexpr bf16() = default;

  /// Rounds v to the nearest bf16 (ties to even; overflow to ±infinity).
  template <class A>
    requires std::is_arithmetic_v<A>
  MOCA_BF16_HD constexpr bf16(A v) noexcept : bits_(round_bits(static_cast<float>(v))) {}

  /// The exact value.
  MOCA_BF16_HD constexpr operator float() const noexcept {
    return __builtin_bit_cast(float, static_cast<std::uint32_t>(bits_) << 16);
  }

  /// The bf16 with these bits.
  MOCA_BF16_HD static constexpr bf16 from_bits(std::uint16_t bits) noexcept {
    bf16 h;
    h.bits_ = bits;
    return h;
  }
  MOCA_BF16_HD constexpr std::uint16_t bits() const noexcept { return bits_; }

  /// The bits of the bf16 nearest to f: ties to even, NaN to the canonical quiet NaN.
  MOCA_BF16_HD static constexpr std::uint16_t round_bits(float f) noexcept {
    const std::uint32_t u = __builtin_bit_cast(std::uint32_t, f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0u;
    // Adding 0x7fff rounds the dropped half down below the halfway point and up above it; the
    // kept half's lowest bit breaks the tie towards even. A carry into the exponent is the
    // correct next binade (or infinity).
    return static_cast<std::uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }

  // Computed in float, rounded once.
  template <class A>
  MOCA_BF16_HD constexpr bf16& operator+=(A v) noexcept { return *this = float(*this) + v; }
  template <class A>
  MOCA_BF16_HD constexpr bf16& operator-=(A v) noexcept { return *this = float(*this) - v; }
  template <class A>
  MOCA_BF16_HD constexpr bf16& operator*=(A v) noexcept { return *this = float(*this) * v; }
  template <class A>
  MOCA_BF16_HD constexpr bf16& operator/=(A v) noexcept { return *this = float(*this) / v; }
  MOCA_BF16_HD constexpr bf16 operator-() const noexcept {
    return from_bits(static_cast<std::uint16_t>(bits_ ^ 0x8000u));
  }

 private:
  std::uint16_t bits_ = 0;
};

static_assert(sizeof(bf16) == 2 && std::is_trivially_copyable_v<bf16>);

/// True for the types tensors compute with as real numbers: float, double and bf16.
template <class T>
inline constexpr bool is_floating_v = std::is_floating_point_v<T> || std::is_same_v<T, bf16>;

/// The type a T is computed and accumulated in: double for double, float otherwise (bf16 too).
template <class T>
using compute_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

/// A 32-bit word holding two bf16 values (the one at the lower address in the low half, on the
/// little-endian hosts and GPUs this library runs on) with `v` added to the half at bit `shift`
/// (0 or 16), rounded once as bf16's += rounds; the other half is kept. The update that the CUDA
/// backend's atomic bf16 addition swaps in with a 32-bit compare-and-swap.
MOCA_BF16_HD constexpr std::uint32_t add_to_bf16_half(std::uint32_t word, unsigned shift,
                                                     bf16 v) noexcept {
  const bf16 sum(float(bf16::from_bits(static_cast<std::uint16_t>((word >> shift) & 0xffffu))) +
                 float(v));
  return (word & ~(0xffffu << shift)) | (static_cast<std::uint32_t>(sum.bits()) << shift);
}

}  // namespace moca

template <>
class std::numeric_limits<moca::bf16> {
  using H = moca::bf16;

 public:
  static constexpr bool is_specialized = true;
  static constexpr bool is_signed = true;
  static constexpr bool is_integer = false;
  static constexpr bool is_exact = false;
  static constexpr bool has_infinity = true;
  static constexpr bool has_quiet_NaN = true;
  static constexpr bool has_signaling_NaN = true;
  static constexpr bool has_denorm_loss = false;
  static constexpr bool is_iec559 = false;
  static constexpr bool is_bounded = true;
  static constexpr bool is_modulo = false;
  static constexpr bool traps = false;
  static constexpr bool tinyness_before = false;
  static constexpr std::float_round_style round_style = std::round_to_nearest;
  static constexpr int digits = 8;
  static constexpr int digits10 = 2;
  static constexpr int max_digits10 = 4;
  static constexpr int radix = 2;
  static constexpr int min_exponent = -125;
  static constexpr int min_exponent10 = -37;
  static constexpr int max_exponent = 128;
  static constexpr int max_exponent10 = 38;

  static constexpr H min() noexcept { return H::from_bits(0x0080); }     // 2^-126
  static constexpr H lowest() noexcept { return H::from_bits(0xff7f); }  // -max()
  static constexpr H max() noexcept { return H::from_bits(0x7f7f); }     // (2 - 2^-7) · 2^127
  static constexpr H epsilon() noexcept { return H::from_bits(0x3c00); } // 2^-7
  static constexpr H round_error() noexcept { return H::from_bits(0x3f00); }  // 0.5
  static constexpr H infinity() noexcept { return H::from_bits(0x7f80); }
  static constexpr H quiet_NaN() noexcept { return H::from_bits(0x7fc0); }
  static constexpr H signaling_NaN() noexcept { return H::from_bits(0x7fa0); }
  static constexpr H denorm_min() noexcept { return H::from_bits(0x0001); }  // 2^-133
};
