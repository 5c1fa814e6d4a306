// Shape: the sizes of a tensor of rank 0 to 4, row-major (last dimension contiguous).
#pragma once

#include <array>
#include <cstdint>
#include <initializer_list>
#include <ostream>
#include <string>

#include "moca/core/check.hpp"

namespace moca {

class Shape {
 public:
  static constexpr int kMaxRank = 4;

  Shape() = default;
  Shape(std::initializer_list<std::int64_t> dims) {
    MOCA_CHECK(static_cast<int>(dims.size()) <= kMaxRank, "Shape: rank ", dims.size(),
               " exceeds the maximum rank ", kMaxRank);
    for (std::int64_t d : dims) {
      MOCA_CHECK(d >= 0, "Shape: negative size ", d);
      dims_[rank_++] = d;
    }
  }

  int rank() const { return rank_; }
  std::int64_t operator[](int i) const {
    MOCA_CHECK(i >= 0 && i < rank_, "Shape: dimension ", i, " out of range for ", *this);
    return dims_[i];
  }
  std::int64_t numel() const {
    std::int64_t n = 1;
    for (int i = 0; i < rank_; ++i) n *= dims_[i];
    return n;
  }
  /// Product of all dimensions but the last: the row count of the matrix view.
  std::int64_t leading() const {
    std::int64_t n = 1;
    for (int i = 0; i + 1 < rank_; ++i) n *= dims_[i];
    return n;
  }
  /// Size of the last dimension (1 for a scalar).
  std::int64_t last() const { return rank_ == 0 ? 1 : dims_[rank_ - 1]; }

  /// The same dimensions with the first one replaced.
  Shape with_first(std::int64_t n) const {
    MOCA_CHECK(rank_ >= 1, "Shape: a scalar has no first dimension");
    Shape s = *this;
    s.dims_[0] = n;
    return s;
  }

  friend bool operator==(const Shape& a, const Shape& b) {
    if (a.rank_ != b.rank_) return false;
    for (int i = 0; i < a.rank_; ++i)
      if (a.dims_[i] != b.dims_[i]) return false;
    return true;
  }

  friend std::ostream& operator<<(std::ostream& os, const Shape& s) {
    os << '[';
    for (int i = 0; i < s.rank_; ++i) os << (i ? ", " : "") << s.dims_[i];
    return os << ']';
  }
  std::string str() const { return detail::str(*this); }

 private:
  std::array<std::int64_t, kMaxRank> dims_{};
  int rank_ = 0;
};

}  // namespace moca
